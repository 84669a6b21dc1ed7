"""What ``dk run``, ``dk distill``, ``dk train`` and ``dk eval`` do (the CLI parses, this runs)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from darkknowledge.config import (
    ModelConfig,
    RunConfig,
    apply_overrides,
    parse_override,
    validate_config,
)
from darkknowledge.data.bundle import num_samples
from darkknowledge.engine.checkpoint import export_model, read_export
from darkknowledge.engine.distributed import DistContext, init_distributed
from darkknowledge.engine.eta import PlannedStage, for_seeds
from darkknowledge.engine.loggers import check_loggers
from darkknowledge.engine.metrics import evaluate
from darkknowledge.errors import ConfigError
from darkknowledge.lm.config import LMRunConfig, is_lm_recipe, validate_lm_config
from darkknowledge.recipes import read_recipe
from darkknowledge.runs import lm_run
from darkknowledge.runs.build import (
    build_model,
    check_config,
    model_spec,
    seed_everything,
)
from darkknowledge.runs.context import RunContext
from darkknowledge.runs.diagnosis import teacher_lines
from darkknowledge.runs.parts_report import parts_sections
from darkknowledge.runs.preflight import PreflightContext, preflight
from darkknowledge.runs.report import group_rows, render_report, table_lines, verdict
from darkknowledge.runs.run_plots import run_figures
from darkknowledge.runs.rundir import RunDir, choose_run_dir, trained_stages
from darkknowledge.runs.session import Session
from darkknowledge.runs.student_report import student_section
from darkknowledge.schemes.base import resolve_scheme

log = logging.getLogger(__name__)


def _session(
    cfg: RunConfig,
    out: str | Path | None,
    resume: bool,
    progress: bool,
    plan: Callable[[PreflightContext], Any] | None = None,
    transfer: bool | None = None,
    command: str = "run",
    model: str | None = None,
    seeds: Sequence[int] | None = None,
) -> Session:
    """The run's session, after every check that needs no training: the config's names and
    params, the loggers of ``log`` (their packages), the run folder to use (``--resume``
    without ``--out`` finds the latest folder of the same ``command``, ``--model`` and recipe),
    then the preflight (``plan`` dry-run on one batch per stage), before the run folder is
    written. The session then locks the folder and checks it (a resume against the recorded
    config and command, see ``runs/resume.py``). The stages the preflight played, repeated for
    each of ``seeds`` after the first (the seed ``plan`` plays), are the plan of the run's ETA."""
    check_config(cfg)  # every name and param checked before anything is built or written
    identity = {"command": command, "model": model}
    run_dir = choose_run_dir(cfg.name, out, resume, identity={**identity, "name": cfg.name})
    check_loggers(cfg.log, run_dir)
    planned: list[PlannedStage] = []
    bundle = preflight(cfg, plan, transfer, planned=planned) if plan is not None else None
    s = Session(cfg, run_dir, resume=resume, progress=progress, bundle=bundle, identity=identity)
    if plan is not None:
        s.clock.plan([p for p in for_seeds(planned, seeds or ()) if p.per_seed or not s.teacher_is_cached(p.family)])
    return s


def compare(
    cfg: RunConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """``dk run``: per seed, a baseline (the student alone, cross-entropy) and the recipe's scheme
    from the same initialisation; pre-trained teachers are trained once and shared.

    Returns:
        ``{"run_dir", "rows", "verdict", "report", "table", "teachers"}`` (``teachers``: the report's
        lines about the teachers, see :func:`~darkknowledge.runs.diagnosis.teacher_lines`).
    """
    cls, params = resolve_scheme(cfg.scheme.name, cfg.scheme.params)

    def plan(ctx: RunContext, seed: int = cfg.seeds[0]) -> None:
        _teacher_first(cfg, ctx, cls)
        ctx.train_alone(f"baseline-s{seed}", ctx.student(seed), seed, role="baseline")
        cls.run(ctx, seed, params)

    s = _session(cfg, out, resume, progress, plan, params.transfer, command="run", seeds=cfg.seeds)
    with s:  # closes the loggers (the MLflow run's status) and releases the folder, also on failure
        return _compare(s, cfg, cls, params)


def _teacher_first(cfg: RunConfig, ctx: RunContext, scheme: Any) -> None:
    """The run's one pre-trained teacher, trained (or loaded) before the baselines when the scheme is
    taught by it: their fidelity to it is the students' reference. The preflight plays the same order
    (the ETA's plan)."""
    if scheme.pretrained_teacher and cfg.teacher is not None and len(cfg.all_teachers()) == 1:
        ctx.teacher()


def _compare(s: Session, cfg: RunConfig, cls: Any, params: Any) -> dict[str, Any]:
    """The body of :func:`compare`, in its open session."""
    ctx = RunContext(s, transfer=params.transfer)
    _teacher_first(cfg, ctx, cls)
    for seed in cfg.seeds:
        s.train_alone(f"baseline-s{seed}", "baseline", ctx.student(seed), seed)
        cls.run(ctx, seed, params)
    rows = group_rows(s.run.results)
    notes = ["data: " + "; ".join(line.strip() for line in s.bundle.describe().splitlines())]
    if any(e.get("transfer") for e in s.run.results):
        transfer = num_samples(s.bundle.split("transfer"))
        notes.append(
            f"the distilled student also sees {transfer} unlabeled transfer samples "
            "(teacher soft labels only); the baseline cannot use them without labels"
        )
    notes += list(getattr(cls, "report_notes", ()))
    notes += view_notes(cfg, s.bundle.info)
    described = [e["teacher_cache"] for e in s.run.results if e.get("teacher_cache")]
    flat = [c for d in described for c in (d if isinstance(d, list) else [d])]  # multi_teacher: one per teacher
    caches = {c["path"]: c for c in flat}
    for c in caches.values():
        notes.append(
            f"teacher-output cache: {c['size_mb']:.2f} MB ({c['dtype']}, {c['views']} view(s), "
            f"{'memory-mapped' if c['mapped'] else 'in memory'}) at {c['path']}; the teacher ran "
            "once to fill it and not during the students' training"
        )
    teachers = "+".join(spec.name for _, spec in cfg.all_teachers())
    head = f"{teachers} -> {cfg.student.name}" if teachers else cfg.student.name
    title = f"{cfg.name}: {head}" + (f" ({cfg.scheme.name})" if cfg.scheme.name != "offline" else "")
    writes = s.run.path if s.run.path is not None and s.run.writer else None
    sections = run_figures(writes, s.run.results, rows, s.metrics.records())
    parts = parts_sections(writes, s.run.results) if writes is not None else []
    sections += ([""] if sections and parts else []) + parts
    student = student_section(writes, s.run.results)
    sections += ([""] if sections and student else []) + student  # the report ends with what decides deployment
    text = render_report(title, rows, notes, sections)
    report = s.run.write_text("report.md", text)
    return {
        "run_dir": s.run.path,
        "rows": rows,
        "verdict": verdict(rows),
        "report": report,
        "table": table_lines(rows),
        "teachers": teacher_lines(rows),  # each teacher's calibration and training fit; a memorised one's warning
        "name": cfg.name,
    }


def is_lm_run(recipe: str | None) -> bool:
    """Whether ``recipe`` (a shipped name or a path; None: the quickstart) is a language-model run (``kind: lm``)."""
    return recipe is not None and is_lm_recipe(read_recipe(recipe))


def lm_config(recipe: str, overrides: Sequence[str] = ()) -> LMRunConfig:
    """A language-model recipe (shipped name or path) with dotted overrides, validated."""
    return validate_lm_config(apply_overrides(read_recipe(recipe), overrides))


def run_lm(
    cfg: LMRunConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """``dk run`` of a language-model recipe (see :mod:`darkknowledge.runs.lm_run`)."""
    return lm_run.run_lm(cfg, out, resume, progress)


def distill(
    cfg: RunConfig, out: str | Path | None = None, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """``dk distill``: the recipe's scheme for one seed (``cfg.seed``); exports ``student.pt``."""
    cls, params = resolve_scheme(cfg.scheme.name, cfg.scheme.params)
    s = _session(
        cfg, out, resume, progress, lambda ctx: cls.run(ctx, cfg.seed, params), params.transfer, command="distill"
    )
    with s:
        ctx = RunContext(s, transfer=params.transfer)
        entries = cls.run(ctx, cfg.seed, params)
        entry = entries[0]
        student = ctx.exports[entry["name"]]
        exported = _export(s, student, entry)
    teachers = [e for e in s.run.results if e.get("role") == "teacher"]
    return {
        "run_dir": s.run.path,
        "teacher": teachers[0] if teachers else None,
        "student": entry,
        "entries": entries,
        "exported": exported,
        "model": student,
    }


def train(
    cfg: RunConfig,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    which: str = "student",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """``dk train``: the config's student (or teacher) alone with cross-entropy.

    The student trains with ``train`` and ``seed``. The teacher trains as ``dk run`` would
    train it: ``train`` with ``teacher.train`` merged over it, seeded with ``teacher.seed``;
    command-line ``overrides`` of ``train.*`` and ``seed`` are about the model being trained,
    so for the teacher they apply on top of those (``train.epochs=2`` trains the teacher
    2 epochs, ``seed=1`` sets ``teacher.seed``) and the run folder's ``config.yaml`` records them
    as ``teacher.train`` / ``teacher.seed``. It is recorded with role ``teacher``.

    Args:
        cfg: The validated config (``overrides`` already applied).
        out: The run folder (default: a new ``runs/<name>[-N]``).
        resume: Continue the run in ``out``.
        progress: Show progress bars on a terminal.
        which: ``student`` or ``teacher``.
        overrides: The command line's ``key=value`` overrides.

    Returns:
        ``{"run_dir", "student": the results entry, "exported": the model file, "model"}``.

    Raises:
        ConfigError: ``which`` is neither, or the recipe has no such model.
    """
    if which not in ("student", "teacher"):
        raise ConfigError(f"--model {which!r}: expected 'student' or 'teacher'")
    if which == "teacher":
        if cfg.teacher is None:
            raise ConfigError(f"--model teacher: recipe {cfg.name!r} has no `teacher:` section to train")
        if cfg.teacher.checkpoint:
            raise ConfigError(
                f"--model teacher: teacher.checkpoint is set ({cfg.teacher.checkpoint!r}), so the "
                "teacher is already trained; drop teacher.checkpoint to train it here"
            )
        cfg = _teacher_overrides(cfg, overrides)
    spec: ModelConfig
    if which == "teacher":
        assert cfg.teacher is not None  # checked above
        spec, seed, role, train_cfg = cfg.teacher, cfg.teacher.seed, "teacher", cfg.teacher_train()
    else:
        spec, seed, role, train_cfg = cfg.student, cfg.seed, "baseline", cfg.train

    def plan(ctx: RunContext) -> None:
        seed_everything(seed)
        ctx.train_alone(f"{which}-ce-s{seed}", build_model(spec, ctx.info, which), seed, role=role, train_cfg=train_cfg)

    s = _session(cfg, out, resume, progress, plan, command="train", model=which)
    with s:
        seed_everything(seed)
        model = build_model(spec, s.bundle.info, which)
        entry = s.train_alone(f"{which}-ce-s{seed}", role, model, seed, train_cfg=train_cfg)
        exported = _export(s, model, entry, name=f"{which}.pt")
    return {"run_dir": s.run.path, "student": entry, "exported": exported, "model": model}


def _teacher_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """``cfg`` with the ``train.*`` and ``seed`` overrides also set as ``teacher.train.*`` / ``teacher.seed``."""
    moved = []
    for text in overrides:
        path, _ = parse_override(text)
        value = text.partition("=")[2]
        if path[0] == "train":
            moved.append(f"teacher.{'.'.join(path)}={value}")
        elif path == ["seed"]:
            moved.append(f"teacher.seed={value}")
    if not moved:
        return cfg
    moved_cfg = validate_config(apply_overrides(cfg.model_dump(mode="json"), moved))
    moved_cfg.teacher_train()  # the merged settings, checked before anything is built
    return moved_cfg


def _export(s: Session, model: Any, entry: dict[str, Any], name: str = "student.pt") -> Path | None:
    if s.run.path is None or not s.dist.is_main:
        return None
    return export_model(
        model, s.run.path / name, model_spec(model), {"data": s.cfg.data.model_dump(mode="json"), "result": entry}
    )


def evaluate_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``dk eval``: rebuild an exported model and evaluate it on its dataset's test split.

    Args:
        path: An exported model (``student.pt``, a stage's ``model.pt``).
        overrides: Raw config keys merged over the export's recorded ``data`` section (e.g.
            ``{"data": {"name": "digits"}}``); naming another dataset drops the recorded
            ``data.params``, which belong to the recorded dataset.

    Raises:
        CheckpointError: The file is unreadable or malformed, holds a custom (non-zoo) model,
            its weights do not fit its spec, or it was trained on inputs of another shape or
            with another number of classes than the dataset it is evaluated on.
        ConfigError: Bad overrides.
    """
    model, spec, cfg, test_loader, dist = _rebuild(path, overrides)
    metrics = evaluate(model, test_loader, dist)
    return {"model": spec["name"], "params": spec.get("params", {}), "data": cfg.data.name, **metrics}


def _rebuild(path: str | Path, overrides: dict[str, Any] | None) -> tuple[Any, dict[str, Any], RunConfig, Any, Any]:
    """An exported model rebuilt from its spec, with its weights, on its recorded dataset:
    ``(model, spec, cfg, test_loader, dist)`` (see :func:`evaluate_checkpoint`)."""
    from darkknowledge.config import ModelConfig, deep_merge, validate_config
    from darkknowledge.engine.checkpoint import check_export_fits, load_weights
    from darkknowledge.engine.device import select_device
    from darkknowledge.errors import CheckpointError
    from darkknowledge.runs.build import build_data, make_loaders

    hint = "Give a model exported by `dk distill`/`dk train` (student.pt) or a stage's model.pt."
    payload = read_export(path, hint=hint)
    spec, state = payload["spec"], payload["state_dict"]
    if spec.get("custom"):
        raise CheckpointError(
            f"{str(path)!r} holds a custom model ({spec['name']}), which `dk eval` cannot rebuild: "
            "load its weights into your own class with darkknowledge.engine.checkpoint.load_exported"
        )
    recorded = payload.get("data")
    recorded = recorded if isinstance(recorded, dict) else {}
    overrides = dict(overrides or {})
    data_over = overrides.get("data")
    data_over = data_over if isinstance(data_over, dict) else {}
    if data_over.get("name", recorded.get("name")) != recorded.get("name"):
        recorded = {k: v for k, v in recorded.items() if k != "params"}  # the recorded dataset's own params
    cfg = validate_config(deep_merge({"data": recorded}, overrides))
    dist: DistContext = init_distributed("cpu")
    device = select_device(cfg.train.device)
    bundle = build_data(cfg)
    info = bundle.info
    view = spec.get("input")  # a cross-modal student reads its own view of the data
    check_export_fits(payload, path, info.name, info.input_shape_of(view, "model input"), info.num_classes)
    model = build_model(
        ModelConfig(
            name=spec["name"],
            params=spec.get("params", {}),
            input=view,
            ops=spec.get("ops", "plain"),
            quantize=spec.get("quantize"),
        ),
        info,
        "model",
    )
    load_weights(model, state, path)
    model.to(device)
    _, test_loader, _ = make_loaders(cfg, bundle, 0, device, dist, train=False, primary=view)
    _probe(model, next(iter(test_loader)).x[:2], path, info.name)
    return model, spec, cfg, test_loader, dist


def export_run(
    run: str | Path,
    stage: str | None = None,
    out: str | Path | None = None,
    formats: Sequence[str] = ("safetensors", "onnx", "torch_export"),
) -> dict[str, Any]:
    """``dk export``: a run's student as safetensors + a rebuildable spec, ONNX and a ``torch.export``
    program (where the model allows), with its size, FLOPs and CPU latency.

    Args:
        run: A run folder (its student: the ``student.pt`` of ``dk distill``, else the first
            stage whose result has role ``student``), a stage folder, or an exported ``.pt`` file.
        stage: The stage to export (a stage folder name of the run) instead of the student.
        out: Output folder (default ``<run>/export/<stage>``).
        formats: Any of ``safetensors``, ``onnx``, ``torch_export``.

    Returns:
        ``{"source", "out", "formats": {format: {path, ok, reason?, max_abs_diff?}}, "profile"}``.

    Raises:
        CheckpointError: Nothing exportable found at ``run`` (the stages that are, listed).
    """
    import dataclasses

    import torch

    from darkknowledge.students.export import export_student
    from darkknowledge.students.profile import profile_model

    source, name = _export_source(Path(run), stage)
    model, spec, cfg, test_loader, _ = _rebuild(source, None)
    model.to(torch.device("cpu")).eval()
    example = next(iter(test_loader)).x[:1].to("cpu")  # (1, *input_shape): a real test input
    target = Path(out) if out is not None else source.parent / "export" / name
    written = export_student(
        model, {**spec, "data": cfg.data.model_dump(mode="json")}, target, example, formats=tuple(formats)
    )
    profile = profile_model(
        model,
        example,
        batch_n=cfg.data.batch_size,
        repeats=cfg.profile.repeats,
        warmup=cfg.profile.warmup,
        quant_bits_default=cfg.profile.quant_bits,
    )
    return {"source": source, "out": target, "formats": written, "profile": dataclasses.asdict(profile)}


def _export_source(run: Path, stage: str | None) -> tuple[Path, str]:
    """The exported ``.pt`` file ``dk export`` reads for ``run`` and ``stage``, and its name."""
    from darkknowledge.errors import CheckpointError

    if run.is_file():
        return run, run.stem
    if not run.is_dir():
        raise CheckpointError(f"dk export: {str(run)!r} is neither a run folder nor an exported model file")
    stages = trained_stages(run)
    if stage is not None:
        if not (run / stage / "model.pt").is_file():
            raise CheckpointError(
                f"dk export: run {str(run)!r} has no trained stage {stage!r}; its stages: {', '.join(stages) or 'none'}"
            )
        return run / stage / "model.pt", stage
    if (run / "model.pt").is_file():  # a stage folder
        return run / "model.pt", run.name
    if (run / "student.pt").is_file():  # dk distill
        return run / "student.pt", "student"
    students = [
        e["name"]
        for e in RunDir(run, writer=False).results
        if e.get("role") == "student" and (run / e["name"] / "model.pt").is_file()
    ]
    if not students:
        raise CheckpointError(
            f"dk export: run {str(run)!r} has no trained student yet; name a stage with --stage "
            f"(its stages: {', '.join(stages) or 'none'})"
        )
    return run / students[0] / "model.pt", students[0]


def _probe(model: Any, x: Any, path: str | Path, dataset: str) -> None:
    """Run ``model`` on two test inputs: a model whose spec records no input shape (an external
    one) and that cannot take this dataset's inputs fails here in one line, not mid-evaluation."""
    import torch

    from darkknowledge.errors import CheckpointError

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"the model in {str(path)!r} cannot take dataset {dataset!r}'s inputs of shape "
            f"{tuple(x.shape[1:])}: {first}"
        ) from None
    finally:
        model.train(was_training)


def view_notes(cfg: RunConfig, info: Any) -> list[str]:
    """On a paired dataset: which view each model reads (the baseline and the student read the
    student's; only the teacher reads its own, at training time)."""
    if info.views is None:
        return []
    reads = [
        f"{where} reads `{spec.input or info.view}` {info.input_shape_of(spec.input)}"
        for where, spec in [("student (and the baseline)", cfg.student), *cfg.all_teachers()]
        if spec is not None
    ]
    return [
        "cross-modal: " + "; ".join(reads) + ". The student and the baseline are trained and evaluated on the "
        "student's view only: the baseline is the student alone on its modality with the labels it has, the "
        "student is taught across modalities"
    ]
