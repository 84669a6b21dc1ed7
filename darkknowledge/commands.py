"""What ``dk run``, ``dk distill``, ``dk train`` and ``dk eval`` do (the CLI parses, this runs)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from darkknowledge.build import build_model, build_objective, check_config, seed_everything
from darkknowledge.config import RunConfig
from darkknowledge.engine.checkpoint import export_model, read_export
from darkknowledge.engine.distributed import DistContext, init_distributed
from darkknowledge.engine.metrics import evaluate
from darkknowledge.report import group_rows, render_report, table_lines, verdict
from darkknowledge.rundir import choose_run_dir
from darkknowledge.session import Session

log = logging.getLogger(__name__)


def _session(cfg: RunConfig, out: str | Path | None, resume: bool, progress: bool) -> Session:
    check_config(cfg)  # every name and param checked before anything is built or written
    run_dir = choose_run_dir(cfg.name, out, resume)
    return Session(cfg, run_dir, resume=resume, progress=progress)


def _student_stage_name(cfg: RunConfig) -> str:
    return "+".join(cfg.losses) or "student"


def compare(cfg: RunConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``dk run``: teacher once, then per seed a baseline and a distilled student from one init.

    Returns:
        ``{"run_dir", "rows", "verdict", "report"}``.
    """
    if cfg.teacher is None:
        raise ValueError(f"recipe {cfg.name!r} has no teacher; `dk run` compares a distilled student with a baseline")
    s = _session(cfg, out, resume, progress)
    teacher, _ = s.teacher()
    method = _student_stage_name(cfg)
    for seed in cfg.seeds:
        seed_everything(seed)
        init = build_model(cfg.student, s.bundle.info, "student")
        state = copy.deepcopy(init.state_dict())
        baseline = build_model(cfg.student, s.bundle.info, "student")
        baseline.load_state_dict(state)
        s.train_stage(f"baseline-s{seed}", "baseline", baseline, build_objective({"ce": {}}), seed)
        student = build_model(cfg.student, s.bundle.info, "student")
        student.load_state_dict(state)
        s.train_stage(f"{method}-s{seed}", "student", student, build_objective(cfg.losses), seed,
                      teacher=teacher, with_transfer=True)
    rows = group_rows(s.run.results)
    notes = ["data: " + "; ".join(line.strip() for line in s.bundle.describe().splitlines())]
    if cfg.data.use_transfer and s.bundle.transfer is not None and len(s.bundle.transfer):
        notes.append(f"the distilled student also sees {len(s.bundle.transfer)} unlabeled transfer samples "
                     "(teacher soft labels only); the baseline cannot use them without labels")
    text = render_report(f"{cfg.name}: {cfg.teacher.name} -> {cfg.student.name}", rows, notes)
    report = s.run.write_text("report.md", text)
    return {"run_dir": s.run.path, "rows": rows, "verdict": verdict(rows), "report": report, "table": table_lines(rows)}


def distill(cfg: RunConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``dk distill``: one distilled student (seed ``cfg.seed``); exports ``student.pt``."""
    if cfg.teacher is None:
        raise ValueError(f"recipe {cfg.name!r} has no teacher section; use `dk train` to train a model alone")
    s = _session(cfg, out, resume, progress)
    teacher, t_entry = s.teacher()
    seed_everything(cfg.seed)
    student = build_model(cfg.student, s.bundle.info, "student")
    entry = s.train_stage(f"{_student_stage_name(cfg)}-s{cfg.seed}", "student", student,
                          build_objective(cfg.losses), cfg.seed, teacher=teacher, with_transfer=True)
    exported = _export(s, student, entry)
    return {"run_dir": s.run.path, "teacher": t_entry, "student": entry, "exported": exported, "model": student}


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
    entry = s.train_stage(f"{which}-ce-s{cfg.seed}", "baseline", model, build_objective({"ce": {}}), cfg.seed,
                          train_cfg=train_cfg)
    exported = _export(s, model, entry, name=f"{which}.pt")
    return {"run_dir": s.run.path, "student": entry, "exported": exported, "model": model}


def _export(s: Session, model: Any, entry: dict[str, Any], name: str = "student.pt") -> Path | None:
    if s.run.path is None or not s.dist.is_main:
        return None
    from darkknowledge.build import model_spec

    return export_model(model, s.run.path / name, model_spec(model),
                        {"data": s.cfg.data.model_dump(mode="json"), "result": entry})


def evaluate_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``dk eval``: rebuild an exported model and evaluate it on its dataset's test split."""
    from darkknowledge.build import build_data, make_loaders
    from darkknowledge.config import ModelConfig, validate_config
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
