"""``dk run`` for a language-model recipe (``kind: lm``): the plan of arms, seeds and variants."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from darkknowledge.engine.checkpoint import safe_load
from darkknowledge.lm.config import LMRunConfig
from darkknowledge.runs.lm_eval import generations
from darkknowledge.runs.lm_report import lm_rows, render_lm_report, table_lines, verdicts
from darkknowledge.runs.lm_session import LMSession, _reads_teacher
from darkknowledge.runs.rundir import choose_run_dir

log = logging.getLogger(__name__)


def _label(losses: dict[str, Any]) -> str:
    parts = []
    for name, spec in losses.items():
        params = {k: v for k, v in (spec or {}).items() if k not in ("weight", "loss")}
        weight = (spec or {}).get("weight")
        text = (spec or {}).get("loss", name) + (
            f"({', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""
        )
        parts.append(f"{weight}·{text}" if weight not in (None, 1, 1.0) else text)
    return " + ".join(parts)


def baseline_arm(cfg: LMRunConfig) -> str | None:
    """The arm trained alone (reads no teacher), whose perplexity the others are compared with."""
    return next(
        (a for a, spec in cfg.arms.items() if not any(_reads_teacher(n, s) for n, s in spec.losses.items())), None
    )


def run_lm(
    cfg: LMRunConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train the teacher's students over seeds, arm by arm, then the variants; write the report.

    Returns:
        ``{"run_dir", "rows", "table", "verdict", "report"}``.
    """
    run_dir = choose_run_dir(cfg.name, out, resume, identity={"command": "run", "model": None, "name": cfg.name})
    s = LMSession(cfg, run_dir, resume, progress)
    try:
        teacher = s.teacher_entry()
        for seed in cfg.seeds:
            for arm, spec in cfg.arms.items():
                kind = spec.cache or cfg.cache.kind
                s.train_arm(f"{arm}-s{seed}", arm, spec.losses, kind, seed, _label(spec.losses))
        base = baseline_arm(cfg)
        if cfg.variants.caches:
            rows = lm_rows(s.run.results, base)
            variant_arm: str | None = cfg.variants.of
            if variant_arm == "best":
                kd = [r for r in rows if r["reads_teacher"]]
                variant_arm = min(kd, key=lambda r: r["val_ppl"])["arm"] if kd else None
            if variant_arm is not None:
                spec = cfg.arms[variant_arm]
                for kind in cfg.variants.caches:
                    if kind == (spec.cache or cfg.cache.kind):
                        continue
                    for seed in cfg.seeds:
                        s.train_arm(
                            f"{variant_arm}@{kind}-s{seed}", variant_arm, spec.losses, kind, seed, _label(spec.losses)
                        )
        rows = lm_rows(s.run.results, base)
        samples = _samples(s, cfg)
        found = [e.get(k) for e in s.run.results for k in ("teacher_cache", "kl_cache")]
        caches = list({c["path"]: c for c in found if c}.values())  # each once (read back on --resume)
        params = next(r["params"] for r in s.run.results if r.get("role") in ("student", "baseline"))
        notes = [
            f"data: {_describe_data(s.data_facts)}",
            (
                f"student: {cfg.student.family} {cfg.student.hidden_size}d x {cfg.student.layers} layers "
                f"({params / 1e6:.2f}M parameters, {s.vocab:,}-token vocabulary shared with the teacher); "
                f"{cfg.train.epochs} epochs, batch {cfg.data.batch_size} x {cfg.data.block_len} tokens"
            ),
            (
                "each arm at a seed starts from the same initialisation and sees the same batches; teacher "
                "outputs come from caches built once (the teacher does not run while students train)"
            ),
        ]
        if cfg.variants.caches:
            notes.append(
                f"variants: {cfg.variants.of} arm re-trained from {', '.join(cfg.variants.caches)} caches "
                "(best = lowest validation perplexity among distilled arms)"
            )
        title = f"{cfg.name}: {cfg.teacher.path or cfg.teacher.source} -> {cfg.student.family} student"
        text = render_lm_report(title, rows, teacher, notes, caches, base, samples, cfg.eval.prompts)
        report = s.run.write_text("report.md", text)
        lines = table_lines(rows, teacher)
        return {
            "run_dir": s.run.path,
            "rows": rows,
            "table": lines,
            "verdict": "\n".join(verdicts(rows, base)),
            "report": report,
            "name": cfg.name,
        }
    finally:
        s.close()


def _samples(s: LMSession, cfg: LMRunConfig) -> dict[str, list[str]] | None:
    """Greedy generations of the teacher and of each arm's first-seed student."""
    if not cfg.eval.prompts or not s.dist.is_main:
        return None
    models = {"teacher": s.teacher_model}
    seed = cfg.seeds[0]
    for arm in cfg.arms:
        student = s.student(seed)
        path = s.run.stage_dir(f"{arm}-s{seed}")
        if path is None or not (path / "model.pt").is_file():
            continue
        student.load_state_dict(safe_load(path / "model.pt")["state_dict"])
        models[arm] = student
    return generations(models, s.tokenizer, cfg.eval.prompts, cfg.eval.max_new_tokens, s.device)


def _describe_data(facts: dict[str, Any]) -> str:
    keys = (
        "source",
        "documents",
        "train_blocks",
        "val_blocks",
        "heldout_blocks",
        "train_tokens",
        "heldout_tokens",
        "block_len",
    )

    def show(value: Any) -> str:
        if isinstance(value, dict):  # e.g. documents per split
            return " + ".join(f"{show(v)} {k}" for k, v in value.items())
        return f"{value:,}" if isinstance(value, int) else str(value)

    return ", ".join(f"{k} {show(facts[k])}" for k in keys if k in facts)
