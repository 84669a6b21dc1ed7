"""The Python API: the same runs as the CLI, with models and data as Python objects.

Example:
    >>> import darkknowledge as dk
    >>> teacher = dk.train("cnn1d", "mnist1d", epochs=20)["model"]
    >>> out = dk.distill("mlp", teacher, "mnist1d", losses={"kd": {"T": 4.0}}, epochs=20)
    >>> out["model"], out["student"]["last_acc"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.config import ModelConfig, RunConfig, deep_merge, validate_config
from darkknowledge.data import DataBundle, DatasetInfo, TensorData
from darkknowledge.data.fingerprint import fingerprint
from darkknowledge.errors import ConfigError
from darkknowledge.runs.build import build_model, build_objective, check_config, model_spec, seed_everything
from darkknowledge.runs.session import Session
from darkknowledge.schemes.offline import offline_task

DataLike = str | DataBundle | tuple


def _bundle(data: DataLike, num_classes: int | None) -> tuple[dict[str, Any], DataBundle | None]:
    """A dataset name becomes ``data.name``; tensors/bundles are used as they are."""
    if isinstance(data, str):
        return {"name": data}, None
    if isinstance(data, DataBundle):
        return {"name": data.info.name}, data
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, tuple) for d in data):
        (x, y), (xt, yt) = data
        x, y, xt, yt = (torch.as_tensor(v) for v in (x, y, xt, yt))
        k = num_classes or int(max(y.max(), yt.max())) + 1
        info = DatasetInfo(name="tensors", num_classes=k, input_shape=tuple(x.shape[1:]),
                           fingerprint=fingerprint("tensors", {}, [("x", x), ("y", y), ("xt", xt), ("yt", yt)]))
        return {"name": "tensors"}, DataBundle(train=TensorData(x, y.long()), test=TensorData(xt, yt.long()), info=info)
    raise ConfigError(
        f"data: expected a dataset name (see `dk list datasets`), a DataBundle, or ((x, y), (x_test, y_test)) "
        f"tensors; got {type(data).__name__}"
    )


def _model_cfg(model: str | nn.Module) -> tuple[dict[str, Any], nn.Module | None]:
    if isinstance(model, str):
        return {"name": model}, None
    if isinstance(model, nn.Module):
        return {"name": getattr(model, "dk_name", type(model).__name__)}, model
    raise ConfigError(f"expected a model name or an nn.Module, got {type(model).__name__}")


def _config(data_cfg: dict[str, Any], epochs: int, batch_size: int | None, lr: float | None, optimizer: str | None,
            seed: int, config: dict[str, Any] | None, **parts: Any) -> RunConfig:
    raw: dict[str, Any] = {"name": "api", "seed": seed, "data": data_cfg, "train": {"epochs": epochs}, **parts}
    if batch_size is not None:
        raw["data"]["batch_size"] = batch_size
    opt = raw["train"].setdefault("optimizer", {})
    if lr is not None:
        opt["lr"] = lr
    if optimizer is not None:
        opt["name"] = optimizer
    return validate_config(deep_merge(raw, config or {}))


def _session(cfg: RunConfig, bundle: DataBundle | None, out: str | Path | None, resume: bool) -> Session:
    if bundle is None:
        check_config(cfg)
    return Session(cfg, Path(out) if out is not None else None, resume=resume, progress=True, bundle=bundle)


def _instantiate(given: nn.Module | None, spec: dict[str, Any], s: Session, where: str, seed: int) -> nn.Module:
    if given is not None:
        return given
    seed_everything(seed)
    return build_model(ModelConfig(**spec), s.bundle.info, where)


def distill(
    student: str | nn.Module,
    teacher: str | nn.Module,
    data: DataLike,
    losses: dict[str, dict[str, Any]] | None = None,
    epochs: int = 10,
    *,
    batch_size: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Distill ``teacher`` into ``student`` on ``data`` and return the trained student.

    Args:
        student: A zoo model name or any ``nn.Module`` (trained in place).
        teacher: A trained ``nn.Module``, or a zoo name (then it is trained first, and cached).
        data: A dataset name, a ``DataBundle``, or ``((x, y), (x_test, y_test))`` tensors.
        losses: Objective terms, e.g. ``{"kd": {"T": 4.0}}`` (default) or ``{"ce": {}, "kd": {"alpha": 1}}``.
        epochs: Training epochs of the student.
        batch_size, lr, optimizer: Shortcuts into ``data.batch_size`` / ``train.optimizer``.
        seed: Seed of the student's initialisation and data order.
        num_classes: Class count for raw tensors (default: from the labels).
        out: Run folder for checkpoints, metrics and results (None: nothing written).
        resume: Continue the run in ``out``.
        config: Any further config keys as a nested mapping (e.g. ``{"train": {"amp": "bf16"}}``).

    Returns:
        ``{"model": trained student, "student": results entry, "teacher": teacher entry or None}``.
    """
    data_cfg, bundle = _bundle(data, num_classes)
    s_cfg, s_mod = _model_cfg(student)
    t_cfg, t_mod = _model_cfg(teacher)
    cfg = _config(data_cfg, epochs, batch_size, lr, optimizer, seed, config, student=s_cfg, teacher=t_cfg,
                  losses=losses or {"kd": {}})
    s = _session(cfg, bundle, out, resume)
    t_entry = None
    if t_mod is None:
        t_mod, t_entry = s.teacher()
    model = _instantiate(s_mod, s_cfg, s, "student", seed)
    stage = "+".join(cfg.losses) + f"-s{seed}"
    if cfg.scheme.name != "offline":
        raise ConfigError(f"dk.distill trains offline (a given teacher teaches the student); scheme "
                          f"{cfg.scheme.name!r} runs from a recipe: `dk distill {cfg.scheme.name}` or "
                          "darkknowledge.commands.distill(load_config(...))")
    task = offline_task(model, build_objective(cfg.losses), t_mod, cache=cfg.cache)
    entry = s.train_stage(stage, "student", task, seed, with_transfer=True, label="+".join(cfg.losses))[0]
    return {"model": model, "student": entry, "teacher": t_entry, "spec": model_spec(model)}


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
) -> dict[str, Any]:
    """Train ``model`` alone (cross-entropy by default); same arguments as :func:`distill`.

    Returns:
        ``{"model": trained model, "result": results entry}``.
    """
    data_cfg, bundle = _bundle(data, num_classes)
    m_cfg, m_mod = _model_cfg(model)
    cfg = _config(data_cfg, epochs, batch_size, lr, optimizer, seed, config, student=m_cfg,
                  losses=losses or {"ce": {}})
    s = _session(cfg, bundle, out, resume)
    net = _instantiate(m_mod, m_cfg, s, "model", seed)
    task = offline_task(net, build_objective(cfg.losses))
    entry = s.train_stage(f"{m_cfg['name']}-s{seed}", "baseline", task, seed, label="+".join(cfg.losses))[0]
    return {"model": net, "result": entry, "spec": model_spec(net)}
