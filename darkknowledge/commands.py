"""What ``dk run``, ``dk distill``, ``dk train`` and ``dk eval`` do (the CLI parses, this runs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from darkknowledge.config import RunConfig
from darkknowledge.engine.checkpoint import export_model, read_export
from darkknowledge.engine.distributed import DistContext, init_distributed
from darkknowledge.engine.metrics import evaluate
from darkknowledge.runs.build import build_model, check_config, model_spec, seed_everything
from darkknowledge.runs.context import RunContext
from darkknowledge.runs.report import group_rows, render_report, table_lines, verdict
from darkknowledge.runs.rundir import choose_run_dir
from darkknowledge.runs.session import Session
from darkknowledge.schemes.base import resolve_scheme

log = logging.getLogger(__name__)


def _session(cfg: RunConfig, out: str | Path | None, resume: bool, progress: bool) -> Session:
    check_config(cfg)  # every name and param checked before anything is built or written
    run_dir = choose_run_dir(cfg.name, out, resume)
    return Session(cfg, run_dir, resume=resume, progress=progress)


def compare(cfg: RunConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``dk run``: per seed, a baseline (the student alone, cross-entropy) and the recipe's scheme
    from the same initialisation; pre-trained teachers are trained once and shared.

    Returns:
        ``{"run_dir", "rows", "verdict", "report", "table"}``.
    """
    cls, params = resolve_scheme(cfg.scheme.name, cfg.scheme.params)
    s = _session(cfg, out, resume, progress)
    ctx = RunContext(s, transfer=params.transfer)
    cls.check(ctx, cfg.seeds[0], params)  # scheme-specific errors (bad stage paths, peers) before any training
    for seed in cfg.seeds:
        s.train_alone(f"baseline-s{seed}", "baseline", ctx.student(seed), seed)
        cls.run(ctx, seed, params)
    rows = group_rows(s.run.results)
    notes = ["data: " + "; ".join(line.strip() for line in s.bundle.describe().splitlines())]
    if any(e.get("transfer") for e in s.run.results):
        notes.append(f"the distilled student also sees {len(s.bundle.transfer)} unlabeled transfer samples "
                     "(teacher soft labels only); the baseline cannot use them without labels")
    notes += [n for n in getattr(cls, "report_notes", ())]
    described = [e["teacher_cache"] for e in s.run.results if e.get("teacher_cache")]
    flat = [c for d in described for c in (d if isinstance(d, list) else [d])]  # multi_teacher: one per teacher
    caches = {c["path"]: c for c in flat}
    for c in caches.values():
        notes.append(f"teacher-output cache: {c['size_mb']:.2f} MB ({c['dtype']}, {c['views']} view(s), "
                     f"{'memory-mapped' if c['mapped'] else 'in memory'}) at {c['path']}; the teacher ran "
                     "once to fill it and not during the students' training")
    teachers = "+".join(spec.name for _, spec in cfg.all_teachers())
    head = f"{teachers} -> {cfg.student.name}" if teachers else cfg.student.name
    title = f"{cfg.name}: {head}" + (f" ({cfg.scheme.name})" if cfg.scheme.name != "offline" else "")
    text = render_report(title, rows, notes)
    report = s.run.write_text("report.md", text)
    return {"run_dir": s.run.path, "rows": rows, "verdict": verdict(rows), "report": report, "table": table_lines(rows)}


def distill(cfg: RunConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``dk distill``: the recipe's scheme for one seed (``cfg.seed``); exports ``student.pt``."""
    cls, params = resolve_scheme(cfg.scheme.name, cfg.scheme.params)
    s = _session(cfg, out, resume, progress)
    ctx = RunContext(s, transfer=params.transfer)
    entries = cls.run(ctx, cfg.seed, params)
    entry = entries[0]
    student = ctx.exports[entry["name"]]
    exported = _export(s, student, entry)
    teachers = [e for e in s.run.results if e.get("role") == "teacher"]
    return {"run_dir": s.run.path, "teacher": teachers[0] if teachers else None, "student": entry,
            "entries": entries, "exported": exported, "model": student}


def train(cfg: RunConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True,
          which: str = "student") -> dict[str, Any]:
    """``dk train``: the config's student (or teacher) alone with cross-entropy."""
    spec = cfg.student if which == "student" else cfg.teacher
    if spec is None:
        raise ValueError(f"recipe {cfg.name!r} has no {which} section")
    s = _session(cfg, out, resume, progress)
    seed_everything(cfg.seed)
    model = build_model(spec, s.bundle.info, which)
    train_cfg = cfg.train if which == "student" else cfg.teacher_train()
    entry = s.train_alone(f"{which}-ce-s{cfg.seed}", "baseline", model, cfg.seed, train_cfg=train_cfg)
    exported = _export(s, model, entry, name=f"{which}.pt")
    return {"run_dir": s.run.path, "student": entry, "exported": exported, "model": model}


def _export(s: Session, model: Any, entry: dict[str, Any], name: str = "student.pt") -> Path | None:
    if s.run.path is None or not s.dist.is_main:
        return None
    return export_model(model, s.run.path / name, model_spec(model),
                        {"data": s.cfg.data.model_dump(mode="json"), "result": entry})


def evaluate_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``dk eval``: rebuild an exported model and evaluate it on its dataset's test split."""
    from darkknowledge.config import ModelConfig, validate_config
    from darkknowledge.runs.build import build_data, make_loaders
    from darkknowledge.engine.device import select_device

    payload = read_export(path)
    spec, state = payload["spec"], payload["state_dict"]
    raw = {"data": payload.get("data") or {}, **(overrides or {})}
    cfg = validate_config(raw)
    dist: DistContext = init_distributed("cpu")
    device = select_device(cfg.train.device)
    bundle = build_data(cfg)
    model = build_model(ModelConfig(name=spec["name"], params=spec.get("params", {})), bundle.info, "model")
    model.load_state_dict(state)
    model.to(device)
    _, test_loader, _ = make_loaders(cfg, bundle, 0, device, dist)
    metrics = evaluate(model, test_loader, dist)
    return {"model": spec["name"], "params": spec.get("params", {}), "data": cfg.data.name, **metrics}
