"""Derived views: batched transforms that turn one view of a sample into another.

Cross-modal distillation trains a teacher on one view of each sample and a student on
another (privileged information: Lopez-Paz, Bottou, Schölkopf & Vapnik, "Unifying
distillation and privileged information", ICLR 2016, Section 5, experiment 5, where the
teacher reads 28x28 MNIST digits and the student the same digits at 7x7). A dataset can
name a view that is *derived* on the fly from another view by a transform registered here,
so a built-in dataset becomes a paired set without new files. The loader calls the
transform on whole batches, after scaling, augmentation and normalisation of the source view.

A view transform is a registered function ``f(x, **params) -> Tensor``:

* ``x`` is a floating-point batch ``(B, *in_shape)``; the result is ``(B, *out_shape)``.
* It is pure, deterministic, differentiable and keeps ``x``'s device and dtype.
* Its keyword parameters carry type hints (ranges with ``Annotated[..., Field(...)]``), so
  :func:`view_transform` validates a recipe's params before anything runs.

Built in (shapes per batch, ``B`` the batch size):

* ``downsample``: ``(B, C, H, W) -> (B, C, h, w)``, ``(B, C, L) -> (B, C, l)``, ``(B, L) -> (B, l)``.
* ``profile``: ``(B, C, H, W) -> (B, C, H)``, ``(B, C, W)`` or ``(B, C, H + W)``.
* ``render``: ``(B, C, L) -> (B, C, height, L)``, ``(B, L) -> (B, 1, height, L)``.
* ``flatten``: ``(B, *S) -> (B, prod(S))``.

Example:
    >>> to_small = view_transform("downsample", {"size": 7})
    >>> to_small(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 1, 7, 7])
    >>> view_shape("profile", {}, (1, 28, 28))
    (1, 56)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field

from darkknowledge.errors import (
    ConfigError,
    DarkKnowledgeError,
    RegistryError,
    ShapeError,
)
from darkknowledge.registry import Registry
from darkknowledge.validation import signature_fields, validate_kwargs

ViewFn = Callable[..., torch.Tensor]
"""``f(x: Tensor (B, *in_shape), **params) -> Tensor (B, *out_shape)``."""

VIEW_TRANSFORMS: Registry[ViewFn] = Registry("view transform")

INPUT_ARG = "x"
"""The batch argument of every view transform (not a user parameter)."""

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _size(value: Any) -> Any:
    """Pydantic check of ``downsample``'s size: a positive int or a pair of them."""
    if _is_count(value):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_count(v) for v in value):
        return tuple(value)
    raise ValueError("size must be a positive int or a pair (h, w) of positive ints, e.g. 7 or (7, 7)")


def _value_range(value: Any) -> Any:
    """Pydantic check of ``render``'s range: ``"sample"`` or finite ``(lo, hi)`` with ``lo < hi``."""
    if value == "sample":
        return value
    numbers = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )
    if not numbers or not value[0] < value[1]:
        raise ValueError("range must be 'sample' or finite numbers (lo, hi) with lo < hi, e.g. (-3, 3)")
    return (float(value[0]), float(value[1]))


Size = Annotated[PositiveInt | tuple[PositiveInt, PositiveInt], BeforeValidator(_size)]
ValueRange = Annotated[tuple[float, float] | Literal["sample"], BeforeValidator(_value_range)]


def register_view_transform(name: str, check: Callable[..., None] | None = None) -> Callable[[ViewFn], ViewFn]:
    """Decorator registering a view transform under ``name``.

    The function takes the batch as its first argument ``x`` and its parameters as keywords
    with type hints and (where sensible) defaults. ``check(**params)``, if given, is called by
    :func:`view_transform` on the validated parameters (all of them, defaults included) to
    reject combinations no single type hint can, raising ``ConfigError``.

    Example:
        >>> @register_view_transform("negate")
        ... def negate(x: torch.Tensor) -> torch.Tensor:
        ...     return -x
    """

    def decorator(fn: ViewFn) -> ViewFn:
        fn.check = check  # type: ignore[attr-defined]  # an attribute on the function
        return VIEW_TRANSFORMS.register(name)(fn)

    return decorator


def list_view_transforms() -> list[str]:
    """Names of all registered view transforms, sorted."""
    return VIEW_TRANSFORMS.names()


@dataclass(frozen=True)
class ViewTransform:
    """A view transform with validated parameters, called on batches.

    Attributes:
        name: The registered name.
        params: Every parameter the function receives (defaults included), e.g. for a fingerprint.
        fn: The registered function.
    """

    name: str
    params: Mapping[str, Any]
    fn: ViewFn = field(repr=False, compare=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the transform to a batch ``x`` of shape ``(B, *in_shape)``."""
        return self.fn(x, **self.params)


def view_transform(name: str, params: Mapping[str, Any] | None = None, where: str | None = None) -> ViewTransform:
    """Look up the view transform ``name`` and bind its validated ``params``.

    Args:
        name: A registered view transform (see :func:`list_view_transforms`).
        params: Its keyword parameters (from a recipe or the API); None means none.
        where: Config path shown in errors (default ``"view.<name>"``).

    Returns:
        A callable ``ViewTransform`` mapping ``(B, *in_shape)`` to ``(B, *out_shape)``.

    Raises:
        ConfigError: Unknown name (listing the valid ones), unknown, missing, ill-typed or
            out-of-range parameter.
    """
    try:
        fn = VIEW_TRANSFORMS.get(name)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    where = where or f"view.{name}"
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"{where}: params must be a mapping of parameter names to values, got {params!r}")
    params = dict(params or {})
    fields = signature_fields(fn, exclude=(INPUT_ARG,))
    missing = [k for k, (_, default) in fields.items() if default is ... and k not in params]
    if missing:
        raise ConfigError(
            f"{where}: missing required parameter {missing[0]!r} of view transform {name!r} "
            f"(its parameters: {', '.join(fields)})"
        )
    checked = validate_kwargs(fn, params, where=where, exclude=(INPUT_ARG,))
    resolved = {k: default for k, (_, default) in fields.items() if default is not ...}
    resolved.update(checked)
    check = getattr(fn, "check", None)
    if check is not None:
        check(**resolved)
    return ViewTransform(name=name, params=resolved, fn=fn)


def view_shape(
    name: str, params: Mapping[str, Any] | None, in_shape: tuple[int, ...], where: str | None = None
) -> tuple[int, ...]:
    """The sample shape a view transform outputs for samples of shape ``in_shape``.

    Runs the transform on a float32 zero batch of shape ``(1, *in_shape)`` on the CPU.

    Args:
        name: A registered view transform.
        params: Its parameters.
        in_shape: One source sample's shape (no batch dim), e.g. ``(1, 28, 28)``.
        where: Config path shown in parameter errors (default ``"view.<name>"``).

    Returns:
        One output sample's shape, e.g. ``(1, 7, 7)``.

    Raises:
        ConfigError: Bad name or params, or ``in_shape`` not a tuple of positive ints.
        ShapeError: The transform does not accept samples of shape ``in_shape`` (the message
            names the shape and what the transform expects).
    """
    transform = view_transform(name, params, where=where)
    shape = tuple(in_shape) if isinstance(in_shape, (tuple, list)) else None
    if shape is None or not all(_is_count(d) for d in shape):
        raise ConfigError(f"view {name!r}: in_shape must be a tuple of positive ints, got {in_shape!r}")
    with torch.no_grad():
        try:
            out = transform(torch.zeros((1, *shape)))
        except DarkKnowledgeError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ShapeError(
                f"view transform {name!r} with params {dict(transform.params)} does not accept "
                f"samples of shape {shape}: {exc}"
            ) from None
    return tuple(out.shape[1:])


def _expect(x: torch.Tensor, name: str, ndims: tuple[int, ...] | None, layout: str) -> None:
    """Raise one clear error unless ``x`` is a floating-point tensor with one of ``ndims`` dims
    (None: any batch, at least one dim)."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        got = x.dtype if torch.is_tensor(x) else type(x).__name__
        raise ConfigError(f"view transform {name!r} needs a floating-point tensor, got {got}")
    if x.ndim == 0 or (ndims is not None and x.ndim not in ndims):
        raise ShapeError(
            f"view transform {name!r} expects {layout}; got a batch of shape {tuple(x.shape)} "
            f"(sample shape {tuple(x.shape[1:])})"
        )


def _check_downsample(size: Any, mode: str, antialias: bool) -> None:
    """``antialias`` only goes with ``mode="bilinear"``."""
    if antialias and mode != "bilinear":
        raise ConfigError(f"view.downsample.antialias: only mode 'bilinear' antialiases (mode is {mode!r})")


@register_view_transform("downsample", check=_check_downsample)
def downsample(
    x: torch.Tensor,
    size: Size,
    mode: Literal["area", "bilinear", "nearest"] = "area",
    antialias: bool = False,
) -> torch.Tensor:
    """Reduce the resolution of images or 1-D signals.

    The privileged-information experiment of Lopez-Paz, Bottou, Schölkopf & Vapnik
    ("Unifying distillation and privileged information", ICLR 2016, Section 5, experiment 5)
    gives the teacher 28x28 MNIST digits and the student the same digits downscaled to 7x7
    (``size=7``). The paper does not say how; its released code resizes with PIL's bilinear
    filter, which with current Pillow equals ``mode="bilinear", antialias=True``.

    Modes: ``"area"`` averages the input cells each output cell covers (adaptive average
    pooling: exact block means when the size divides the input, e.g. 28 -> 7 averages 4x4
    blocks); ``"bilinear"`` interpolates linearly (``align_corners=False``; ``antialias``
    widens the filter by the scale factor, as PIL does); ``"nearest"`` picks one input cell.

    Args:
        x: ``(B, C, H, W)`` images, ``(B, C, L)`` or ``(B, L)`` signals, floating point.
        size: Output ``(h, w)`` (an int means ``h = w``) for images; an int ``l`` for signals.
            Each must be at most the input's size (this transform does not upsample).
        mode: ``"area"`` (default), ``"bilinear"`` or ``"nearest"``.
        antialias: Only with ``mode="bilinear"``.

    Returns:
        ``(B, C, h, w)``, ``(B, C, l)`` or ``(B, l)``.
    """
    _expect(x, "downsample", (2, 3, 4), "images (B, C, H, W) or signals (B, C, L) / (B, L)")
    _check_downsample(size=size, mode=mode, antialias=antialias)
    if x.ndim == 4:
        target = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        grid = x  # (B, C, H, W)
    elif isinstance(size, int):
        target = (1, size)
        grid = (x if x.ndim == 3 else x.unsqueeze(1)).unsqueeze(-2)  # (B, C, 1, L)
    else:
        raise ShapeError(
            f"view.downsample.size: a 1-D signal takes one int size, got {size!r} "
            f"for a batch of shape {tuple(x.shape)} (sample shape {tuple(x.shape[1:])})"
        )
    have = tuple(grid.shape[-2:])
    if target[0] > have[0] or target[1] > have[1]:
        raise ShapeError(
            f"view.downsample.size: {size!r} is larger than the input, sample shape "
            f"{tuple(x.shape[1:])}; downsample only reduces"
        )
    if mode == "area":
        out = F.adaptive_avg_pool2d(grid, target)  # (B, C, h, w)
    elif mode == "bilinear":
        # antialiased kernels lack half precision on some devices: compute those in float32
        wide = grid.float() if antialias and grid.dtype not in (torch.float32, torch.float64) else grid
        out = F.interpolate(wide, size=target, mode="bilinear", align_corners=False, antialias=antialias)
        out = out.to(x.dtype)  # (B, C, h, w)
    else:
        out = F.interpolate(grid, size=target, mode="nearest")
    if x.ndim == 4:
        return out  # (B, C, h, w)
    out = out.squeeze(-2)  # (B, C, l)
    return out if x.ndim == 3 else out.squeeze(1)  # (B, C, l) or (B, l)


@register_view_transform("profile")
def profile(x: torch.Tensor, axes: Literal["rows", "columns", "both"] = "both") -> torch.Tensor:
    """Intensity profiles of images: an image becomes a 1-D signal.

    ``rows[b, c, i] = mean_j x[b, c, i, j]`` (one value per row, length H) and
    ``columns[b, c, j] = mean_i x[b, c, i, j]`` (one value per column, length W).

    Args:
        x: ``(B, C, H, W)`` floating-point images.
        axes: ``"rows"``, ``"columns"`` or ``"both"`` (default: rows then columns,
            concatenated along the length).

    Returns:
        ``(B, C, H)``, ``(B, C, W)`` or ``(B, C, H + W)``.
    """
    _expect(x, "profile", (4,), "images (B, C, H, W)")
    rows = x.mean(dim=-1)  # (B, C, H)
    columns = x.mean(dim=-2)  # (B, C, W)
    if axes == "rows":
        return rows
    if axes == "columns":
        return columns
    return torch.cat([rows, columns], dim=-1)  # (B, C, H + W)


@register_view_transform("render")
def render(
    x: torch.Tensor,
    height: PositiveInt = 16,
    range: ValueRange = (-3.0, 3.0),  # the recipe's parameter name (shadows the builtin here)
    width: PositiveFloat | None = None,
) -> torch.Tensor:
    """Render 1-D signals as 2-D images, like a plot of the trace on a sensor.

    Each position ``l`` of channel ``c`` becomes a column whose rows light up where the
    value ``v = x[b, c, l]`` lies, a gaussian of standard deviation ``width``:

    ``image[b, c, r, l] = exp(-(y_r - v)^2 / (2 * width^2))``

    The ``height`` rows cover the value range ``[lo, hi]`` in equal bins, highest values at
    the top: row ``r`` sits at the bin centre ``y_r = hi - (r + 1/2) * (hi - lo) / height``.
    Values outside the range fade off the image. A single trace ``(B, L)`` renders as one
    channel.

    Args:
        x: ``(B, C, L)`` or ``(B, L)`` floating-point signals.
        height: Number of rows (default 16).
        range: ``(lo, hi)`` in signal units (default ``(-3, 3)``, suiting standardised
            signals), or ``"sample"``: each sample's own min and max over all its channels
            and positions (a constant sample ``v`` uses ``(v - 1, v + 1)``).
        width: Gaussian standard deviation in signal units (default ``(hi - lo) / height``,
            one row).

    Returns:
        ``(B, C, height, L)``, or ``(B, 1, height, L)`` for ``(B, L)`` input; values in ``[0, 1]``.
    """
    _expect(x, "render", (2, 3), "signals (B, C, L) or (B, L)")
    v = (x if x.ndim == 3 else x.unsqueeze(1)).unsqueeze(-2)  # (B, C, 1, L)
    steps = (torch.arange(height, device=x.device, dtype=x.dtype) + 0.5) / height  # (height,) bin centres in (0, 1)
    if range == "sample":
        values = x.flatten(1)  # (B, C * L)
        lo, hi = values.amin(dim=1), values.amax(dim=1)  # (B,) each
        constant = hi <= lo  # (B,)
        lo = torch.where(constant, lo - 1.0, lo).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        hi = torch.where(constant, hi + 1.0, hi).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    else:
        lo, hi = (torch.tensor(float(end), device=x.device, dtype=x.dtype) for end in range)  # () each
    rows = hi - (hi - lo) * steps.view(-1, 1)  # (height, 1), or (B, 1, height, 1) per sample
    sigma = (hi - lo) / height if width is None else width  # () / (B, 1, 1, 1) tensor, or a float
    return torch.exp(-((rows - v) ** 2) / (2 * sigma**2))  # (B, C, height, L)


@register_view_transform("flatten")
def flatten(x: torch.Tensor) -> torch.Tensor:
    """Flatten each sample to a vector (e.g. images for an MLP student).

    Args:
        x: ``(B, *S)`` floating-point batch, ``S`` possibly empty.

    Returns:
        ``(B, prod(S))`` (``(B, 1)`` when ``S`` is empty).
    """
    _expect(x, "flatten", None, "a batch (B, *S)")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # (B, prod(S))
