"""Turn a validated config into objects: data, loaders, models, objective.

Everything here runs before training and fails with clear errors (unknown names, bad
params, bad tap paths, teacher/student mismatch), before any checkpoint is written.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

import numpy as np
import torch
from torch import nn

from darkknowledge.config import ModelConfig, RunConfig
from darkknowledge.data import (
    Augment,
    BatchLoader,
    DataBundle,
    DatasetInfo,
    TensorData,
    load_dataset,
)
from darkknowledge.engine.checkpoint import load_exported, load_weights
from darkknowledge.engine.distributed import DistContext
from darkknowledge.errors import CheckpointError, ConfigError
from darkknowledge.losses.objective import Objective
from darkknowledge.models import MODELS, create_model
from darkknowledge.validation import validate_kwargs


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_config(cfg: RunConfig, given: Collection[str] = ()) -> None:
    """Check every registry name and params mapping of ``cfg`` without loading data or training.

    The losses are parsed (and their parameters validated) by the one parser that builds them
    (``Objective.from_config``); a term's schedule keys are typed there too.

    Args:
        cfg: The validated config.
        given: Config paths whose object the caller passes itself (``data``, ``student``,
            ``teacher``): nothing to look up for them (the Python API).
    """
    from darkknowledge.data import DATASETS
    from darkknowledge.schemes.base import resolve_scheme

    resolve_scheme(cfg.scheme.name, cfg.scheme.params)
    if "data" not in given:
        validate_kwargs(DATASETS.get(cfg.data.name), cfg.data.params, "data.params", exclude=("root", "split_seed"))
    for where, spec in (("student", cfg.student), *cfg.all_teachers()):
        if spec is not None and where not in given and ":" not in spec.name:
            validate_kwargs(MODELS.get(spec.name), spec.params, f"{where}.params")
    if cfg.losses:
        build_objective(cfg.losses)
    for where, spec in cfg.all_teachers():
        if where not in given:
            cfg.teacher_train(spec, where)


def build_data(cfg: RunConfig) -> DataBundle:
    """Load the configured dataset (with its validation split and transfer set); with
    ``data.holdout=val`` the run evaluates on the validation split, never the test split."""
    return load_dataset(
        cfg.data.name, root=cfg.data.root, split_seed=cfg.data.split_seed,
        val_fraction=cfg.data.val_fraction, holdout=cfg.data.holdout, **cfg.data.params,
    )


def make_loaders(
    cfg: RunConfig,
    bundle: DataBundle,
    seed: int,
    device: torch.device,
    dist: DistContext,
    with_transfer: bool = False,
    train: bool = True,
) -> tuple[BatchLoader | None, BatchLoader, BatchLoader | None]:
    """Train (optionally with the unlabeled transfer set appended), test and val loaders.

    With ``train=False`` the training split is not touched (a task that brings its own training
    batches, e.g. a data-free student's synthetic ones) and the first loader is None.
    """
    norm = bundle.info.normalization
    common: dict[str, Any] = dict(rank=dist.rank, world_size=dist.world_size, normalize=norm, device=device,
                                  device_data_mb=cfg.data.device_data_mb)
    test_loader = BatchLoader(bundle.test, cfg.data.eval_batch_size, shuffle=False, **common)
    val_loader = (
        BatchLoader(bundle.val, cfg.data.eval_batch_size, shuffle=False, **common)
        if bundle.val is not None and len(bundle.val)
        else None
    )
    if not train:
        return None, test_loader, val_loader
    train = bundle.train
    if with_transfer and cfg.data.use_transfer and bundle.transfer is not None and len(bundle.transfer):
        if not (isinstance(train, TensorData) and isinstance(bundle.transfer, TensorData)):
            raise ConfigError("data.use_transfer: a transfer set needs in-memory tensor datasets")
        train = TensorData(torch.cat([train.x, bundle.transfer.x]), torch.cat([train.y, bundle.transfer.y]))
    aug_cfg = cfg.data.augment
    augment = Augment(**aug_cfg.model_dump()) if aug_cfg.enabled() else None
    train_loader = BatchLoader(train, cfg.data.batch_size, shuffle=True, seed=seed, augment=augment,
                               num_workers=cfg.data.num_workers, **common)
    return train_loader, test_loader, val_loader


def build_model(spec: ModelConfig, info: DatasetInfo, where: str = "student") -> nn.Module:
    """Create a model for the dataset (``num_classes``/``input_shape`` filled in) and load weights.

    Args:
        spec: Name, params and optional ``checkpoint`` (an exported model file).
        info: The dataset's class count and input shape.
        where: Config path for error messages.
    """
    params = {"num_classes": info.num_classes, "input_shape": tuple(info.input_shape), **spec.params}
    if spec.checkpoint:
        saved_spec, state = load_exported(spec.checkpoint)
        if saved_spec.get("name") != spec.name:
            raise CheckpointError(
                f"{where}.checkpoint {spec.checkpoint!r} holds a {saved_spec.get('name')!r} model, "
                f"but {where}.name is {spec.name!r}"
            )
        params = {**params, **saved_spec.get("params", {})}
    if params.get("num_classes") != info.num_classes:
        raise ConfigError(
            f"{where}: the model predicts {params.get('num_classes')} classes but dataset {info.name!r} has "
            f"{info.num_classes}; teacher and student logits must match the data's classes "
            f"(drop {where}.params.num_classes, or use a checkpoint trained on this dataset)"
        )
    try:
        model = create_model(spec.name, **params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if spec.checkpoint:
        load_weights(model, state, spec.checkpoint, where=f"{where}.checkpoint")  # one line if they do not fit
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The ``{"name", "params"}`` that rebuilds a zoo model (set by ``create_model``)."""
    name = getattr(model, "dk_name", None)
    if name is None:
        return {"name": type(model).__name__, "params": {}, "custom": True}
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in getattr(model, "dk_params", {}).items()}
    return {"name": name, "params": params}


def build_objective(losses: dict[str, Any], where: str = "losses") -> Objective:
    """The objective of a ``losses:`` mapping (each term parsed and validated once)."""
    return Objective.from_config(losses, where=where)
