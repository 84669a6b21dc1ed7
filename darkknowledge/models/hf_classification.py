"""Hugging Face ``transformers`` classification models, named ``hf:SOURCE``.

``SOURCE`` is one of:

* a local folder written by ``save_pretrained`` (or a hub id such as ``microsoft/resnet-18`` where
  the machine can reach the hub): ``AutoModelFor...Classification.from_pretrained(SOURCE)``, its
  trained weights loaded (``pretrained: false`` builds the folder's architecture with random
  weights instead);
* a ``transformers`` model type (``resnet``, ``vit``, ``bert``, ``distilbert``, ...): a new,
  randomly initialised model built from a config, ``params.config`` giving its fields (no
  download).

An existing folder wins over a model type of the same name. The task follows from the data:
an image ``(C, H, W)`` input builds an image classifier, token ids ``(L,)`` a sequence
classifier (``task`` says it explicitly; a folder's ``config.json`` ``architectures`` are read
first). ``num_classes`` becomes the config's ``num_labels``; a built config also takes the
image's channels and size (``num_channels``, ``image_size``) unless ``config`` sets them.

The model stays the ``transformers`` model itself, so tap paths are its own module paths
(``resnet.encoder.stages.1``, ``bert.encoder.layer.0``, ``vit.layers.0``); its ``forward`` returns
a ``ModelOutput`` whose ``.logits`` ``(B, num_classes)`` the engine reads. Stage outputs of a
convolutional model are maps ``(B, C, H, W)``; a transformer layer's are ``(B, L, d)`` (tokens
first) and its pooler's vectors ``(B, d)``.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn

from darkknowledge.errors import ConfigError, did_you_mean

INSTALL = "pip install transformers"
"""What installs the library (it is also in the ``lm`` and ``loops`` extras)."""

Task = Literal["image", "sequence"]
TASKS: dict[str, tuple[str, str]] = {
    "image": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "sequence": ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
}
"""Task -> (the ``transformers`` auto class, the name of its model-type -> class mapping)."""

_ARCH_SUFFIX: dict[str, str] = {"ForImageClassification": "image", "ForSequenceClassification": "sequence"}
_BLOCK_CONTAINERS = (
    "encoder.stages",
    "encoder.layer",
    "encoder.layers",
    "layers",
    "transformer.layer",
    "encoder.block",
    "stages",
    "blocks",
)
"""Where ``transformers`` models keep their stages / layers, under the base model's prefix."""


def require_transformers(full_name: str) -> ModuleType:
    """The ``transformers`` module, or a ConfigError naming how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ConfigError(
            f"model {full_name!r} needs the optional package 'transformers', which is not "
            f"installed. Install it with: {INSTALL}"
        ) from None


def _quiet(tf: ModuleType) -> None:
    """Keep ``transformers``' loading progress bars and reports off the run's display."""
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()


def _task_of(
    task: str | None, input_shape: tuple[int, ...] | None, architectures: list[str] | None, full_name: str
) -> str:
    """The classification task: given, else from a saved config's architectures, else from the input's rank."""
    from_shape = None
    if input_shape is not None:
        from_shape = {3: "image", 1: "sequence"}.get(len(input_shape))
    from_arch = None
    for arch in architectures or []:
        from_arch = next((t for suffix, t in _ARCH_SUFFIX.items() if arch.endswith(suffix)), from_arch)
    chosen = task or from_arch or from_shape
    if chosen is None:
        raise ConfigError(
            f"model {full_name!r}: cannot tell the task from input shape {input_shape}; give params.task: image "
            "(inputs (C, H, W)) or sequence (token ids (L,))"
        )
    want_rank = 3 if chosen == "image" else 1
    if input_shape is not None and len(input_shape) != want_rank:
        what = (
            "an image classifier reads images (C, H, W)"
            if chosen == "image"
            else "a sequence classifier reads token ids (L,)"
        )
        raise ConfigError(f"model {full_name!r}: {what}, but the data's inputs have shape {tuple(input_shape)}")
    return chosen


def _check_config_keys(tf: ModuleType, model_type: str, overrides: dict[str, Any], full_name: str) -> None:
    """Every key of ``params.config`` is a field of the model type's config (none silently ignored)."""
    known = set(tf.AutoConfig.for_model(model_type).to_dict())
    for key in overrides:
        if key not in known:
            raise ConfigError(
                f"model {full_name!r}: params.config.{key}: not a field of {model_type!r}'s config."
                f"{did_you_mean(key, sorted(known))} Valid fields: {', '.join(sorted(known))}."
            )


def _fit_input(
    config: Any, task: str, input_shape: tuple[int, ...] | None, given: dict[str, Any], full_name: str
) -> None:
    """Give a built config the data's channels and image size (unless ``given`` sets them); check a
    sequence fits the position embeddings."""
    if input_shape is None:
        return
    if task == "image":
        channels, height, width = input_shape
        if hasattr(config, "num_channels") and "num_channels" not in given:
            config.num_channels = int(channels)
        if hasattr(config, "image_size") and "image_size" not in given:
            config.image_size = int(height) if height == width else [int(height), int(width)]
        return
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and input_shape[0] > positions:
        raise ConfigError(
            f"model {full_name!r}: sequences of {input_shape[0]} tokens exceed the config's "
            f"max_position_embeddings={positions}; set params.config.max_position_embeddings"
        )


def _check_saved_input(config: Any, task: str, input_shape: tuple[int, ...] | None, full_name: str) -> None:
    """A saved image model's channels and image size (where its config fixes them) match the data's."""
    if input_shape is None or task != "image":
        return
    channels, height, width = input_shape
    saved = getattr(config, "num_channels", None)
    if isinstance(saved, int) and saved != channels:
        raise ConfigError(
            f"model {full_name!r}: the saved model reads {saved}-channel images but the data's have "
            f"{channels} channels (inputs {tuple(input_shape)})"
        )
    size = getattr(config, "image_size", None)
    if size is not None:
        want = [size, size] if isinstance(size, int) else list(size)
        if want != [height, width]:
            raise ConfigError(
                f"model {full_name!r}: the saved model reads {want[0]}x{want[1]} images but the data's "
                f"are {height}x{width}; resize the data, or build the model from a config"
            )


def hf_feature_taps(model: nn.Module) -> list[str]:
    """Stage / layer output paths of a ``transformers`` model, shallow to deep; ``[]`` when none is found.

    Looks under the base model's prefix (``resnet``, ``vit``, ``bert``) for its stages or layers
    (``encoder.stages``, ``encoder.layer``, ``layers``, ``transformer.layer``, ...).

    Args:
        model: The built model.
    """
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    roots = [f"{prefix}." if prefix and prefix in modules else "", ""]
    for root in dict.fromkeys(roots):
        for container in _BLOCK_CONTAINERS:
            parent = modules.get(root + container)
            if parent is None:
                continue
            children = [f"{root}{container}.{name}" for name, _ in parent.named_children()]
            if children:
                return children
    return []


def _fixed_taps(taps: tuple[str, ...]) -> list[str]:
    """Return a copy of ``taps`` (bound with functools.partial so the model stays picklable)."""
    return list(taps)


def _saved_architectures(folder: Path) -> list[str] | None:
    """``architectures`` of a saved model's ``config.json``, or None."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = data.get("architectures") if isinstance(data, dict) else None
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else None


def _auto_class(tf: ModuleType, task: str) -> Any:
    return getattr(tf, TASKS[task][0])


def _model_types(task: str) -> list[str]:
    """Model types that have a classifier for ``task``."""
    mapping = getattr(importlib.import_module("transformers.models.auto.modeling_auto"), TASKS[task][1])
    return sorted(mapping)


def _from_folder(
    tf: ModuleType,
    source: str,
    task: str | None,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
    overrides: dict[str, Any],
    pretrained: bool,
    ignore_mismatched_sizes: bool,
    full_name: str,
) -> nn.Module:
    """A saved model (a local folder, or a hub id): its weights, or its architecture at random."""
    folder = Path(source)
    task = _task_of(task, input_shape, _saved_architectures(folder) if folder.is_dir() else None, full_name)
    try:
        config = tf.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model {full_name!r}: {source!r} is neither a folder holding a saved transformers "
            f"model (config.json) nor a model type ({exc})"
        ) from None
    _check_config_keys(tf, config.model_type, overrides, full_name)
    for key, value in overrides.items():
        setattr(config, key, value)
    _check_saved_input(config, task, input_shape, full_name)
    if num_classes is not None and config.num_labels != num_classes:
        if pretrained and not ignore_mismatched_sizes:
            raise ConfigError(
                f"model {full_name!r}: the saved model predicts {config.num_labels} classes but the data has "
                f"{num_classes}; set params.ignore_mismatched_sizes: true to start a new classifier head "
                "(the rest of the weights are loaded)"
            )
        config.num_labels = num_classes
    auto = _auto_class(tf, task)
    try:
        if not pretrained:
            return auto.from_config(config)
        return auto.from_pretrained(
            source, config=config, ignore_mismatched_sizes=ignore_mismatched_sizes, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model {full_name!r}: cannot load a {task} classifier from {source!r}: {exc}") from None


def _from_config(
    tf: ModuleType,
    model_type: str,
    task: str | None,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
    overrides: dict[str, Any],
    full_name: str,
) -> nn.Module:
    """A new, randomly initialised model of ``model_type`` built from a config."""
    task = _task_of(task, input_shape, None, full_name)
    types = _model_types(task)
    if model_type not in types:
        raise ConfigError(
            f"model {full_name!r}: transformers has no {task} classifier of model type "
            f"{model_type!r}.{did_you_mean(model_type, types)} Model types with one: {', '.join(types)}."
        )
    _check_config_keys(tf, model_type, overrides, full_name)
    try:
        config = tf.AutoConfig.for_model(model_type, **overrides)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model {full_name!r}: bad params.config {overrides}: {exc}") from None
    _fit_input(config, task, input_shape, overrides, full_name)
    if num_classes is not None:
        config.num_labels = num_classes
    try:
        return _auto_class(tf, task).from_config(config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"model {full_name!r}: cannot build a {task} classifier from params.config {overrides}: {exc}"
        ) from None


def create_hf_classifier(
    name: str,
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
    task: Task | None = None,
    config: dict[str, Any] | None = None,
    pretrained: bool = True,
    ignore_mismatched_sizes: bool = False,
) -> nn.Module:
    """Build a ``transformers`` image or sequence classifier from a saved folder or a config.

    Args:
        name: A folder written by ``save_pretrained`` (or a hub id), else a model type (``resnet``).
        num_classes: The config's ``num_labels`` (None: a saved model keeps its own).
        input_shape: One input without the batch dim: ``(C, H, W)`` images or ``(L,)`` token ids.
        task: ``image`` or ``sequence``; None: from the saved architecture or ``input_shape``.
        config: Config fields: the whole config of a model type (random init), or overrides of
            a saved model's (e.g. ``hidden_dropout_prob``).
        pretrained: For a saved model: load its weights (True) or only its architecture.
        ignore_mismatched_sizes: For a saved model with another class count: start a new head.

    Returns:
        The ``transformers`` model, with ``feature_taps()`` set (see :func:`hf_feature_taps`).

    Raises:
        ConfigError: transformers missing, unknown model type or folder, a config field the
            model type lacks, a class count or input that does not fit.
    """
    full_name = f"hf:{name}"
    tf = require_transformers(full_name)
    _quiet(tf)
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
    overrides = dict(config or {})
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if Path(name).is_dir() or (name not in CONFIG_MAPPING and "/" in name):
        model = _from_folder(
            tf, name, task, shape, num_classes, overrides, pretrained, ignore_mismatched_sizes, full_name
        )
    elif name in CONFIG_MAPPING:
        if not pretrained or ignore_mismatched_sizes:
            raise ConfigError(
                f"model {full_name!r}: pretrained / ignore_mismatched_sizes apply to a saved model "
                f"(a folder); {name!r} is a model type, built from params.config with random weights"
            )
        model = _from_config(tf, name, task, shape, num_classes, overrides, full_name)
    else:
        raise ConfigError(
            f"model {full_name!r}: {name!r} is neither a folder nor a transformers model type."
            f"{did_you_mean(name, list(CONFIG_MAPPING))} A folder must exist and hold a model "
            "written by save_pretrained."
        )
    model.train()  # from_pretrained returns eval(); a new zoo model is in training mode
    model.feature_taps = functools.partial(_fixed_taps, tuple(hf_feature_taps(model)))  # type: ignore[assignment]  # a plain attribute
    return model
