"""Small helpers shared by the zoo: activation lookup, input-shape checks, tap lists."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import nn

from darkknowledge.errors import ConfigError

ActivationName = Literal["relu", "gelu", "silu", "tanh", "elu", "leaky_relu", "sigmoid"]
"""Activation names the zoo builders accept."""

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


def fan_out_init(model: nn.Module, linear_std: float | None = None) -> None:
    """He (fan-out) normal init of every conv, BN weight 1 / bias 0, linear biases 0 (as the
    WRN / RepDistiller CIFAR models do); linear weights normal with ``linear_std`` when given,
    else left at PyTorch's default.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            fan_out = math.prod(m.kernel_size) * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def make_activation(name: str, where: str) -> nn.Module:
    """Return a fresh (never in-place) activation module.

    In-place activations are avoided throughout the zoo: a forward hook that captured the
    tensor an in-place op later overwrites would silently see the wrong values.

    Args:
        name: One of ``ActivationName``.
        where: Config path for the error message, e.g. ``"model 'mlp'"``.

    Raises:
        ConfigError: Unknown activation name.
    """
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"{where}.activation: unknown activation {name!r}. Valid: {', '.join(_ACTIVATIONS)}."
        ) from None


def check_positive(where: str, **values: int | Sequence[int]) -> None:
    """Raise ``ConfigError`` unless every given int (or every int in a sequence) is >= 1.

    Args:
        where: Config path for the error message.
        **values: ``param_name=value`` pairs to check.
    """
    for key, value in values.items():
        items = [value] if isinstance(value, int) else list(value)
        if any(int(v) < 1 for v in items):
            raise ConfigError(f"{where}.{key}: must be >= 1 (got {value!r})")


def check_dropout(where: str, p: float, key: str = "dropout") -> None:
    """Raise ``ConfigError`` unless ``0 <= p < 1``."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{where}.{key}: dropout must be in [0, 1) (got {p!r})")


def image_channels(where: str, input_shape: Sequence[int]) -> int:
    """Channel count of an image-like per-sample shape ``(C, H, W)`` or ``(H, W)`` (then 1).

    Args:
        where: Config path for the error message.
        input_shape: Per-sample shape without the batch dim.

    Raises:
        ConfigError: The shape is not 2-D or 3-D, or has a non-positive entry.
    """
    shape = tuple(input_shape)
    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        raise ConfigError(f"{where}.input_shape: expected an image shape (C, H, W) or (H, W), got {shape!r}")
    return shape[0] if len(shape) == 3 else 1


def sequence_channels_length(where: str, input_shape: Sequence[int]) -> tuple[int, int]:
    """``(channels, length)`` of a 1-D signal shape ``(L,)`` (then 1 channel) or ``(C, L)``.

    Raises:
        ConfigError: The shape is not 1-D or 2-D, or has a non-positive entry.
    """
    shape = tuple(input_shape)
    if len(shape) not in (1, 2) or any(s < 1 for s in shape):
        raise ConfigError(f"{where}.input_shape: expected a signal shape (L,) or (C, L), got {shape!r}")
    return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])


def flat_features(where: str, input_shape: Sequence[int]) -> int:
    """Number of features of a per-sample shape once flattened.

    Raises:
        ConfigError: Empty shape or a non-positive entry.
    """
    shape = tuple(input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"{where}.input_shape: expected a non-empty shape of positive sizes, got {shape!r}")
    return math.prod(shape)


def to_jsonable(value: Any) -> Any:
    """Turn a builder parameter into plain JSON data (tuples -> lists, unknown objects -> str).

    Args:
        value: A (validated) keyword-argument value.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return str(value)
