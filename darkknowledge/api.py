"""The Python API: the same runs as the CLI, with models and data as Python objects.

Example:
    >>> import darkknowledge as dk
    >>> teacher = dk.train("cnn1d", "mnist1d", epochs=20).model
    >>> out = dk.distill("mlp", teacher, "mnist1d", losses={"kd": {"T": 4.0}}, epochs=20)
    >>> out.model, out.accuracy, out.epochs[-1]
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from darkknowledge.config import ModelConfig, RunConfig, deep_merge, validate_config
from darkknowledge.data import DataBundle
from darkknowledge.data.batch import INPUT_ATTR, input_name
from darkknowledge.data.catalog import with_validation
from darkknowledge.data.given import LOADING_KEYS, DataLike, given_data, mixable, validation_source
from darkknowledge.engine.metrics import evaluate
from darkknowledge.errors import ConfigError
from darkknowledge.models import count_params
from darkknowledge.runs import default_objective
from darkknowledge.runs.build import (
    build_model,
    build_objective,
    check_config,
    make_loaders,
    model_spec,
    seed_everything,
)
from darkknowledge.runs.default_objective import default_config
from darkknowledge.runs.measures import teacher_measures
from darkknowledge.runs.outcome import TrainResult, epoch_rows
from darkknowledge.runs.session import Session
from darkknowledge.schemes.base import resolve_scheme
from darkknowledge.schemes.keep_better import require_validation, selection
from darkknowledge.schemes.offline import OfflineParams, offline_task


def _model_cfg(model: str | nn.Module, where: str) -> tuple[dict[str, Any], nn.Module | None]:
    if isinstance(model, str):
        return {"name": model}, None
    if isinstance(model, nn.Module):
        return {"name": getattr(model, "dk_name", type(model).__name__)}, model
    raise ConfigError(
        f"{where}: expected a model name (see `dk list models`) or an nn.Module, got {type(model).__name__}"
    )


def _config(
    data_cfg: dict[str, Any],
    epochs: int,
    batch_size: int | None,
    lr: float | None,
    optimizer: str | None,
    seed: int,
    config: dict[str, Any] | None,
    **parts: Any,
) -> RunConfig:
    if config is not None and not isinstance(config, dict):
        raise ConfigError(
            f"config: expected a mapping of config keys, e.g. {{'train': {{'amp': 'bf16'}}}}; "
            f"got {type(config).__name__}"
        )
    raw: dict[str, Any] = {"name": "api", "seed": seed, "data": data_cfg, "train": {"epochs": epochs}, **parts}
    if batch_size is not None:
        raw["data"]["batch_size"] = batch_size
    opt = raw["train"].setdefault("optimizer", {})
    if lr is not None:
        opt["lr"] = lr
    if optimizer is not None:
        opt["name"] = optimizer
    cfg = validate_config(deep_merge(raw, config or {}))
    if (config or {}).get("seeds") is not None:
        raise ConfigError(
            f"config.seeds: the Python API trains one seed (seed={seed}); pass seed=..., or call it once per seed"
        )
    return cfg


def _check(cfg: RunConfig, bundle: DataBundle | None, given: dict[str, nn.Module]) -> None:
    """Every name and parameter the config holds, checked before data is loaded or anything trained.

    With everything named, these are a recipe's checks (``check_config``). A model or data
    passed as an object has nothing to look up; config keys that would only shape a named
    model or dataset are an error there, not silently ignored.
    """
    for where, module in given.items():
        spec = cfg.student if where == "student" else cfg.teacher
        assert spec is not None  # a given teacher is in the config
        # `input` (the view it reads on a paired dataset) applies to a given module too
        extra = sorted(k for k in spec.model_dump(exclude_defaults=True) if k not in ("name", "input"))
        if extra or spec.name != _model_cfg(module, where)[0]["name"]:
            keys = ", ".join(f"{where}.{k}" for k in extra or ["name"])
            raise ConfigError(
                f"{keys}: the {where} is given as an nn.Module ({type(module).__name__}), so these "
                f"settings would not apply; drop them from config, or pass the {where} by name"
            )
    if bundle is not None:
        set_keys = cfg.data.model_dump(exclude_defaults=True)
        extra = [k for k in LOADING_KEYS if k in set_keys]
        if extra:
            raise ConfigError(
                f"{', '.join('data.' + k for k in extra)}: the data is given as tensors or a "
                "DataBundle, so these loading settings would not apply; drop them, or pass a "
                "dataset name (`dk list datasets`)"
            )
    check_config(cfg, given=[*given, *(["data"] if bundle is not None else [])])


def _session(
    cfg: RunConfig, bundle: DataBundle | None, out: str | Path | None, resume: bool, given: tuple[str, ...] = ()
) -> Session:
    """The run's session; ``given``: the models passed as modules (a given teacher is not trained in the run)."""
    identity = {"given": list(given)} if given else None
    if bundle is not None and cfg.data.val_fraction > 0:  # given data: carved as a named dataset's would be
        bundle = with_validation(bundle, cfg.data.val_fraction, cfg.data.split_seed)
    return Session(
        cfg, Path(out) if out is not None else None, resume=resume, progress=True, bundle=bundle, identity=identity
    )


def _instantiate(given: nn.Module | None, spec: ModelConfig, s: Session, where: str, seed: int) -> nn.Module:
    """The given module (marked with the view it reads), or the model ``spec`` names, built with its
    params (``config={"student": {"params": ...}}`` included) from ``seed``."""
    if given is not None:
        return _reads_view(given, spec.input, s, where)
    seed_everything(seed)
    return build_model(spec, s.bundle.info, where)


def _reads_view(model: nn.Module, view: str | None, s: Session, where: str) -> nn.Module:
    """On a paired dataset, mark a given module with the view it reads (``config: {where: {input: VIEW}}``)."""
    if s.bundle.info.views is not None:
        view = view or s.bundle.info.view
        s.bundle.info.input_shape_of(view, f"{where}.input")
        setattr(model, INPUT_ATTR, view)
    return model


@contextmanager
def _lent(model: nn.Module | None) -> Iterator[None]:
    """Lend a user's module to the run and give it back as it came, also on error: the
    train/eval mode of every submodule, ``requires_grad`` of every parameter, and its device
    (a frozen teacher is put in ``eval()`` without gradients, and moved to the run's device)."""
    if model is None:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    try:
        yield
    finally:
        if len(devices) == 1:
            model.to(next(iter(devices)))
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def distill(
    student: str | nn.Module,
    teacher: str | nn.Module,
    data: DataLike,
    losses: dict[str, dict[str, Any]] | None = None,
    epochs: int | None = None,
    *,
    batch_size: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    baseline: bool = False,
) -> TrainResult:
    """Distill ``teacher`` into ``student`` on ``data`` and return the trained student.

    Args:
        student: A zoo model name or any ``nn.Module`` (trained in place).
        teacher: A trained ``nn.Module``, or a zoo name (then it is trained first, and cached).
        data: A dataset name, a ``DataBundle``, or ``((x, y), (x_test, y_test))`` tensors.
        losses: Objective terms, e.g. ``{"kd": {"T": 4.0}}`` or ``{"ce": {}, "kd": {"alpha": 1}}``. None
            (default): function matching, chosen with ``dk bench small-data`` (see the README's table
            and :mod:`darkknowledge.runs.default_objective`): KL(teacher || student) at T=1
            (``{"kd": {"T": 1, "alpha": 1}}``) on mixup views of the training inputs (``data.augment.mixup``
            1.0 unless ``config`` sets mixing; a mixed input has no label, only the teacher teaches
            on it), for 10 epochs but at least 30,000 optimizer steps (``train.min_steps``) unless
            ``epochs`` or ``config``'s train budget is given; and the same student trained alone too,
            the better of the two on a validation split delivered (``scheme.params.keep_better``; the
            split is 10% of the training data, ``data.val_fraction``, unless the data has its own or
            ``config`` sets one). Token-id inputs keep Hinton KD (``{"kd": {}}``: T=4, alpha=0.9)
            without mixing.
        epochs: Training epochs of the student (default 10; with the default objective, 10 but at
            least 30,000 steps).
        batch_size: Shortcut for ``data.batch_size``.
        lr: Shortcut for ``train.optimizer.lr``.
        optimizer: Shortcut for ``train.optimizer.name``.
        seed: Seed of the student's initialisation and data order.
        num_classes: Class count for raw tensors (default: from the labels).
        out: Run folder for checkpoints, metrics and results (None: nothing written).
        resume: Continue the run in ``out``.
        config: Any further config keys as a nested mapping (e.g. ``{"train": {"amp": "bf16"}}``).
        baseline: Also train the same student alone (cross-entropy, stage ``baseline-s<seed>``) from
            the same initialisation (a copy of the student before training), with the same epochs,
            optimizer and data order, as ``dk run`` does; ``result.baseline`` holds it and
            ``result.verdict`` / ``print(result)`` compare the two with the table and verdict ``dk run``
            prints. A teacher given as a module is then evaluated too (``result.teacher``: its test
            accuracy and calibration), so that the verdict can tell whether it had anything to transfer.

    Defaults differ from the shipped recipes (``dk run``): ``epochs=10``, the optimizer's own
    defaults (AdamW, lr 1e-3, no weight decay, cosine schedule), the dataset's default size, no
    validation split (but for the default objective's choice) and no unlabeled transfer set unless
    ``config`` asks for them
    (e.g. ``{"data": {"params": {"transfer_samples": 20000}}}`` for MNIST-1D). A teacher
    given by name trains with the same settings as the student unless ``config["teacher"]["train"]``
    says otherwise.

    Returns:
        A :class:`~darkknowledge.runs.outcome.TrainResult`: ``model`` (the trained student),
        ``accuracy``, ``best_accuracy``, ``agreement`` and ``kl_to_teacher`` (its fidelity to the
        teacher on the test split), ``epochs`` (per-epoch loss terms and test accuracy), ``entry``
        (its results entry), ``teacher`` (the trained teacher's entry, None for a given module
        without a baseline), ``spec``, ``run_dir``, ``baseline`` and ``verdict`` (with
        ``baseline=True``); ``print(result)`` shows what ``dk distill`` prints. A
        teacher given as a module comes back in the train/eval mode, ``requires_grad`` state and
        device it came in, also when training fails. With ``keep_better`` (the default objective),
        ``result.kept`` says which student was delivered: ``"distilled"`` (``student``, trained in
        place) or ``"alone"`` (then ``result.model`` is the copy trained alone, ``result.distilled``
        the distilled student's result, and ``student`` holds the distilled weights); both results
        entries record the choice (``selection``) and ``print(result)`` says it.

    Raises:
        ConfigError: A bad name, parameter or config key (before any data is loaded or trained).
    """
    data_cfg, bundle = given_data(data, num_classes)
    s_cfg, s_mod = _model_cfg(student, "student")
    t_cfg, t_mod = _model_cfg(teacher, "teacher")
    if losses is None:  # the default objective: function matching, patiently (runs/default_objective.py)
        losses, config = default_config(
            config, mixable(bundle), epochs is not None, validation_source(data_cfg, bundle)
        )
    cfg = _config(
        data_cfg,
        default_objective.EPOCHS if epochs is None else epochs,
        batch_size,
        lr,
        optimizer,
        seed,
        config,
        student=s_cfg,
        teacher=t_cfg,
        losses=losses,
    )
    if cfg.scheme.name != "offline":
        raise ConfigError(
            f"scheme: dk.distill trains offline (a given teacher teaches the student); scheme "
            f"{cfg.scheme.name!r} runs from a recipe: `dk distill {cfg.scheme.name}` or "
            "darkknowledge.commands.distill(load_config(...))"
        )
    if cfg.teachers:
        raise ConfigError(
            "teachers: dk.distill takes one teacher; several teachers run from a recipe (`dk distill multi_teacher`)"
        )
    _check(cfg, bundle, {k: m for k, m in (("student", s_mod), ("teacher", t_mod)) if m is not None})
    s = _session(cfg, bundle, out, resume, given=("teacher",) if t_mod is not None else ())
    params = resolve_scheme(cfg.scheme.name, cfg.scheme.params)[1]  # offline (checked above): typed params
    keep_better = isinstance(params, OfflineParams) and params.keep_better
    if keep_better:  # before the teacher trains
        require_validation(s.bundle.val is not None)
    t_entry = None
    if t_mod is None:
        t_mod, t_entry = s.teacher()
        lent = None
    else:
        lent = _reads_view(t_mod, cfg.teacher.input if cfg.teacher else None, s, "teacher")
    model = _instantiate(s_mod, cfg.student, s, "student", seed)
    alone = copy.deepcopy(model) if baseline or keep_better else None  # the same init, before either trains
    stage = "+".join(cfg.losses) + f"-s{seed}"
    with _lent(lent):
        if lent is not None:
            s.reference = lent  # the run's teacher: the student's (and baseline's) fidelity is to it
            if alone is not None:  # the verdict then says whether the teacher had anything to transfer
                t_entry = _given_teacher_entry(s, lent, seed)
        base = None
        if alone is not None:  # first, as in `dk run`
            b_stage = f"baseline-s{seed}"
            b_entry = s.train_alone(b_stage, "baseline", alone, seed)
            base = TrainResult(
                alone, b_entry, model_spec(alone), epoch_rows(s.metrics.records(b_stage)), t_entry, _folder(s)
            )
        task = offline_task(model, build_objective(cfg.losses), t_mod, cache=cfg.cache)
        entry = s.train_stage(stage, "student", task, seed, with_transfer=True, label="+".join(cfg.losses))[0]
    records = epoch_rows(s.metrics.records(stage))
    result = TrainResult(model, entry, model_spec(model), records, t_entry, _folder(s), baseline=base)
    if not keep_better or base is None:
        return result
    choice = selection(base.entry, entry)
    for e in (base.entry, entry):
        e["selection"] = choice
        s.run.add_result(e, cfg.name)
    return result.keeping(choice)


def _given_teacher_entry(s: Session, teacher: nn.Module, seed: int) -> dict[str, Any]:
    """The results entry of a teacher given as a module, evaluated on the test split (accuracy, calibration);
    recorded in the run's results. Its training data is unknown, so its training accuracy is not measured."""
    teacher.to(s.device)
    _, test_loader, _ = make_loaders(s.cfg, s.bundle, seed, s.device, s.dist, train=False, primary=input_name(teacher))
    try:
        metrics = evaluate(teacher, test_loader, s.dist)
    finally:
        teacher.to("cpu")
    entry = {
        "name": "teacher",
        "role": "teacher",
        "model": _model_cfg(teacher, "teacher")[0]["name"],
        "seed": None,
        "params": count_params(teacher),
        "source": "given",
        "train_seconds": 0.0,
        "last_acc": metrics["top1"],
        "last_top5": metrics.get("top5"),
        **teacher_measures(s, teacher, seed, train_split=False),
    }
    s.run.add_result(entry, s.cfg.name)
    return entry


def train(
    model: str | nn.Module,
    data: DataLike,
    epochs: int = 10,
    *,
    losses: dict[str, dict[str, Any]] | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    config: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` alone (cross-entropy by default); same arguments and defaults as :func:`distill`.

    The model is measured as the teacher it may become: its entry records its calibration on the
    test split (``ece``, %, 15 equal-width bins) and its fit of the training split, evaluated without
    augmentation (``train_acc``, and ``train_confidence``: the mean top softmax probability there);
    ``print(result)`` warns when it has memorised the training set (accuracy >= 99.9%, mean top
    probability > 0.99: its soft targets there are near one-hot, and function matching is what helps).
    When ``config`` carves a validation split (``{"data": {"val_fraction": 0.1}}``, a named dataset), the
    model is selected on it: the returned weights, ``result.accuracy`` and the entry's ``last_acc`` are
    those of the epoch best on the validation split (never on the test split); without one, the last
    epoch's.

    Returns:
        A :class:`~darkknowledge.runs.outcome.TrainResult` (``model``, ``accuracy``, ``epochs``,
        ``entry``, ``spec``, ``run_dir``; ``print(result)`` shows what ``dk train`` prints).

    Raises:
        ConfigError: A bad name, parameter or config key (before any data is loaded or trained).
    """
    data_cfg, bundle = given_data(data, num_classes)
    m_cfg, m_mod = _model_cfg(model, "model")
    cfg = _config(data_cfg, epochs, batch_size, lr, optimizer, seed, config, student=m_cfg, losses=losses or {"ce": {}})
    unused = [k for k in ("teacher", "teachers", "scheme") if k in cfg.model_dump(exclude_defaults=True)]
    if unused:
        raise ConfigError(
            f"{', '.join(unused)}: dk.train trains one model alone, so these settings would not "
            "apply; use dk.distill for a teacher"
        )
    _check(cfg, bundle, {"student": m_mod} if m_mod is not None else {})
    s = _session(cfg, bundle, out, resume)
    net = _instantiate(m_mod, cfg.student, s, "model", seed)
    task = offline_task(net, build_objective(cfg.losses))
    stage = f"{m_cfg['name']}-s{seed}"
    entry = s.train_stage(stage, "baseline", task, seed, label="+".join(cfg.losses), as_teacher=True)[0]
    return TrainResult(net, entry, model_spec(net), epoch_rows(s.metrics.records(stage)), run_dir=_folder(s))


def _folder(s: Session) -> Path | None:
    """The session's run folder, or None when it writes nothing (``out=None``)."""
    return None if s.run.path is None else Path(s.run.path)
