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
from darkknowledge.data.batch import INPUT_ATTR, input_name
from darkknowledge.data.bundle import num_samples
from darkknowledge.data.paired import (
    check_view_in_split,
    concat,
    plan_views,
    split_views,
)
from darkknowledge.engine.checkpoint import load_exported, load_weights
from darkknowledge.engine.distributed import DistContext
from darkknowledge.errors import CheckpointError, ConfigError
from darkknowledge.losses.objective import Objective
from darkknowledge.models import MODELS, create_model
from darkknowledge.students.build import (
    convert,
    derivation,
    quant_spec,
    resolved_family,
)
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
            resolved_family(spec.name, spec.params, spec.width, spec.depth, where)
        if spec is not None and spec.quantize is not None:
            quant_spec(spec.quantize, f"{where}.quantize")
    if cfg.losses:
        build_objective(cfg.losses)
    for where, spec in cfg.all_teachers():
        if where not in given:
            cfg.teacher_train(spec, where)


def build_data(cfg: RunConfig) -> DataBundle:
    """Load the configured dataset (with its validation split and transfer set); with
    ``data.holdout=val`` the run evaluates on the validation split, never the test split."""
    bundle = load_dataset(
        cfg.data.name,
        root=cfg.data.root,
        split_seed=cfg.data.split_seed,
        val_fraction=cfg.data.val_fraction,
        holdout=cfg.data.holdout,
        train_subset=cfg.data.train_samples,
        **cfg.data.params,
    )
    return with_views(cfg, bundle)


def with_views(cfg: RunConfig, bundle: DataBundle) -> DataBundle:
    """``bundle`` with the recipe's derived views (``data.views``) and checks that every model's
    ``input`` view exists, and that the student's can be read on the split it is evaluated on."""
    bundle = plan_views(bundle, cfg.data.views)
    specs = [("student", cfg.student), *cfg.all_teachers()]
    for where, spec in specs:
        if spec is not None and spec.input is not None:
            bundle.info.input_shape_of(spec.input, f"{where}.input")
    if bundle.info.views is not None:
        if cfg.student is not None:
            check_view_in_split(bundle.info, bundle.test, cfg.student.input or bundle.info.view, "test", "student")
        for where, spec in cfg.all_teachers():  # a teacher trained here is evaluated on the test split too
            if spec is not None and not spec.checkpoint:
                check_view_in_split(bundle.info, bundle.test, spec.input or bundle.info.view, "test", where)
    return bundle


def run_views(cfg: RunConfig, info: DatasetInfo) -> tuple[str, ...]:
    """The views this run's models read (every batch carries them), or () for single-view data."""
    if info.views is None:
        return ()
    specs = [s for _, s in [("student", cfg.student), *cfg.all_teachers()] if s is not None]
    return tuple(dict.fromkeys(s.input or info.view for s in specs)) or (info.view,)


def make_loaders(
    cfg: RunConfig,
    bundle: DataBundle,
    seed: int,
    device: torch.device,
    dist: DistContext,
    with_transfer: bool = False,
    train: bool = True,
    primary: str | None = None,
) -> tuple[BatchLoader | None, BatchLoader, BatchLoader | None]:
    """Train (optionally with the unlabeled transfer set appended), test and val loaders.

    With ``train=False`` the training split is not touched (a task that brings its own training
    batches, e.g. a data-free student's synthetic ones) and the first loader is None. On a
    paired dataset every batch carries the views the run's models read, and ``x`` is view
    ``primary`` (the trained model's; None: the stored input).
    """
    norm = bundle.info.normalization
    inputs = tuple(dict.fromkeys((*run_views(cfg, bundle.info), *([primary] if primary else ()))))
    common: dict[str, Any] = dict(
        rank=dist.rank,
        world_size=dist.world_size,
        normalize=norm,
        device=device,
        device_data_mb=cfg.data.device_data_mb,
        views=bundle.info.views,
    )
    test_loader = BatchLoader(
        bundle.test, cfg.data.eval_batch_size, shuffle=False, **_readable(common, bundle.test, inputs, primary)
    )
    val_loader = (
        BatchLoader(
            bundle.val, cfg.data.eval_batch_size, shuffle=False, **_readable(common, bundle.val, inputs, primary)
        )
        if bundle.val is not None and num_samples(bundle.val)
        else None
    )
    if not train:
        return None, test_loader, val_loader
    data = bundle.train
    if with_transfer and cfg.data.use_transfer and bundle.transfer is not None and num_samples(bundle.transfer):
        if not (isinstance(data, TensorData) and isinstance(bundle.transfer, TensorData)):
            raise ConfigError("data.use_transfer: a transfer set needs in-memory tensor datasets")
        data = concat(data, bundle.transfer)
    aug_cfg = cfg.data.augment
    augment = Augment(**aug_cfg.model_dump()) if aug_cfg.enabled() else None
    train_loader = BatchLoader(
        data,
        cfg.data.batch_size,
        shuffle=True,
        seed=seed,
        augment=augment,
        num_workers=cfg.data.num_workers,
        inputs=inputs,
        primary=primary,
        **common,
    )
    return train_loader, test_loader, val_loader


def _readable(common: dict[str, Any], data: Any, inputs: tuple[str, ...], primary: str | None) -> dict[str, Any]:
    """Loader arguments for an evaluation split: the views it can give (a modality missing at
    test time is normal; the model that reads it is then not evaluated there)."""
    plan = common["views"]
    if plan is None:
        return common
    have = split_views(data)
    able = tuple(v for v in inputs if all(s in have for s in plan.needs([v])[0]))
    return {**common, "inputs": able, "primary": primary if primary in able else None}


def build_model(spec: ModelConfig, info: DatasetInfo, where: str = "student") -> nn.Module:
    """Create a model for the dataset (``num_classes``/``input_shape`` filled in) and load weights.

    Args:
        spec: Name, params and optional ``checkpoint`` (an exported model file).
        info: The dataset's class count and input shape.
        where: Config path for error messages.
    """
    shape = info.input_shape_of(spec.input, f"{where}.input")
    name, own = resolved_family(spec.name, spec.params, spec.width, spec.depth, where)
    params = {"num_classes": info.num_classes, "input_shape": tuple(shape), **own}
    if spec.checkpoint:
        saved_spec, state = load_exported(spec.checkpoint)
        if saved_spec.get("name") != name:
            shrunk = f" ({spec.name} at width {spec.width}, depth {spec.depth})" if name != spec.name else ""
            raise CheckpointError(
                f"{where}.checkpoint {spec.checkpoint!r} holds a {saved_spec.get('name')!r} model, "
                f"but {where} builds {name!r}{shrunk}"
            )
        params = {**params, **saved_spec.get("params", {})}
        if saved_spec.get("ops", "plain") != spec.ops:
            raise CheckpointError(
                f"{where}.checkpoint {spec.checkpoint!r} holds a model with ops "
                f"{saved_spec.get('ops', 'plain')!r}, but {where}.ops is {spec.ops!r}"
            )
    if params.get("num_classes") != info.num_classes:
        raise ConfigError(
            f"{where}: the model predicts {params.get('num_classes')} classes but dataset {info.name!r} has "
            f"{info.num_classes}; teacher and student logits must match the data's classes "
            f"(drop {where}.params.num_classes, or use a checkpoint trained on this dataset)"
        )
    try:
        model = create_model(name, **params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    # a full-precision checkpoint starts a quantized model (QAT from trained weights): load, then quantize
    float_start = bool(spec.checkpoint) and spec.quantize is not None and saved_spec.get("quantize") is None
    convert(model, spec.ops, None if float_start else spec.quantize, where)  # efficient ops, fake quantization
    if spec.checkpoint:
        load_weights(model, state, spec.checkpoint, where=f"{where}.checkpoint")  # one line if they do not fit
    if float_start:
        convert(model, "plain", spec.quantize, where)
    if info.views is not None:
        setattr(model, INPUT_ATTR, spec.input or info.view)  # the view it reads (see data.batch.model_input)
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The ``{"name", "params"}`` that rebuilds a zoo model (set by ``create_model``)."""
    name = getattr(model, "dk_name", None)
    if name is None:
        return {"name": type(model).__name__, "params": {}, "custom": True}
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in getattr(model, "dk_params", {}).items()}
    view = input_name(model)
    return {"name": name, "params": params, **derivation(model), **({"input": view} if view is not None else {})}


def build_objective(losses: dict[str, Any], where: str = "losses") -> Objective:
    """The objective of a ``losses:`` mapping (each term parsed and validated once)."""
    return Objective.from_config(losses, where=where)
