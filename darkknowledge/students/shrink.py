"""Simplified students: a teacher's zoo family rebuilt thinner (width) and shallower (depth).

Gou, Yu, Maybank & Tao, "Knowledge Distillation: A Survey", IJCV 2021, Sec. 6: the most common
student is a simplified teacher, with fewer layers and fewer channels in each layer. Thinner is
MobileNets' width multiplier (Howard et al., arXiv:1704.04861, 2017,
Sec. 3.3: ``alpha`` thins every layer uniformly, cutting cost and parameters by about
``alpha^2``); shallower keeps the stages, so the stage outputs that feature losses pair
(FitNets' hints, Romero et al. ICLR 2015; attention transfer, Zagoruyko & Komodakis ICLR 2017)
stay at the same resolutions under the same tap names (CRD's pairs such as ``resnet32x4 ->
resnet8x4`` or ``wrn_40_2 -> wrn_16_2``: same stages, fewer blocks or channels per stage).

For a family with channel counts ``c`` and ``n`` layers or blocks in a stage (the counts
are integers)::

    c' = max(1, round(c * width))      n' = max(1, round(n * depth))      (rounded half up)

for every channel count and every stage; the number of stages is kept. Family rules on top:

* ``mobilenetv2`` scales its own ``width_mult`` (Sandler et al., CVPR 2018, Sec. 6.1: the
  multiplier thins every layer but the last 1x1 conv, 1280 channels, which only widens), at
  least 1/16 so that every layer keeps a channel;
* ``shufflenetv1`` (3 groups): stem, stage widths and each stage's growth stay multiples of 12
  (a quarter-width bottleneck of a multiple of the groups), growing stage to stage;
* ``shufflenetv2``: stage widths stay even (the split in two halves); a stage's depth counts
  its down-sampling unit (RepDistiller's 3, 7, 3 basic blocks are 4, 8, 4 units); the
  1024-channel head only widens (Ma et al., ECCV 2018, Table 5: 1024 for 0.5x to 1.5x);
* ``lenet*``: one conv per stage and no deeper form: ``depth`` must round to 1.
* ``residual_pair`` (a student beside an assistant) is not a family: shrink its parts.

A rule is ``fn(params, width, depth) -> (name, params)``: ``params`` are the teacher's builder
parameters checked and completed with the builder's defaults (``num_classes``/``input_shape``
aside); the result names a registered model (a family's generic builder, e.g. ``resnet20`` ->
``resnet_cifar``) whose parameters rebuild the student with ``create_model(name,
num_classes=..., input_shape=..., **params)``, and an exported ``{name, params}`` rebuilds it too.
``width = depth = 1`` rebuilds the teacher's architecture (same parameter count).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from darkknowledge.errors import ConfigError
from darkknowledge.models import MODELS
from darkknowledge.models._common import to_jsonable
from darkknowledge.models.lenet import LENET5_HALF_WIDTHS, LENET5_WIDTHS
from darkknowledge.models.shufflenet_cifar import V1_CHANNEL_STEP
from darkknowledge.models.wrn import wrn_layout
from darkknowledge.registry import Registry
from darkknowledge.validation import signature_fields, validate_kwargs

logger = logging.getLogger(__name__)

ShrinkRule = Callable[[dict[str, Any], float, float], tuple[str, dict[str, Any]]]
"""``fn(params, width, depth) -> (registered model name, builder params)``."""

SHRINK_RULES: Registry[ShrinkRule] = Registry("shrink rule")
"""Model name -> the rule that shrinks it."""

DATA_PARAMS = ("num_classes", "input_shape")
"""Builder parameters the data sets: carried over unchanged, never filled with defaults."""

_EPS = 1e-9  # 1.5 computed as 1.4999999999999998 still rounds up


def register_shrink(*names: str) -> Callable[[ShrinkRule], ShrinkRule]:
    """Decorator that registers a shrink rule under every model name in ``names``.

    Example:
        >>> @register_shrink("my_net")  # a registered model "my_net" with a ``channels`` parameter
        ... def shrink_my_net(params, width, depth):
        ...     return "my_net", {**params, "channels": scale(params["channels"], width)}
    """

    def decorator(rule: ShrinkRule) -> ShrinkRule:
        for name in names:
            SHRINK_RULES.register(name)(rule)
        return rule

    return decorator


def scale(count: int, factor: float) -> int:
    """``max(1, round(count * factor))``, rounded half up (``scale(3, 0.5) == 2``)."""
    return max(1, math.floor(count * factor + 0.5 + _EPS))


def scale_to_step(count: int, factor: float, step: int) -> int:
    """``count * factor`` rounded half up to a multiple of ``step``, at least ``step``."""
    return step * max(1, math.floor(count * factor / step + 0.5 + _EPS))


def scale_widths(widths: Sequence[int], width: float) -> tuple[int, ...]:
    """Every channel count times ``width`` (see :func:`scale`)."""
    return tuple(scale(c, width) for c in widths)


def scale_blocks(blocks: Sequence[int], depth: float, family: str) -> tuple[int, ...]:
    """Blocks (or layers) of every stage times ``depth``, each stage keeping at least one.

    Logs a warning when ``depth != 1`` leaves every count as it was (e.g. one block per stage).
    """
    out = tuple(scale(n, depth) for n in blocks)
    if depth != 1 and out == tuple(blocks):
        logger.warning(
            "%s: depth %g leaves the layers per stage %s unchanged (each stage keeps at least one)",
            family,
            depth,
            list(blocks),
        )
    return out


def check_multiplier(value: Any, key: str, where: str = "student") -> float:
    """``value`` as a float when it is a finite number > 0.

    Raises:
        ConfigError: ``value`` is not a number, or is <= 0, nan or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        what = "channels" if key == "width" else "layers per stage"
        raise ConfigError(
            f"{where}.{key}: must be a finite number > 0 that multiplies the teacher's {what} "
            f"(0.5 halves them, 1 keeps them), got {value!r}"
        )
    return float(value)


def with_layout(rule: ShrinkRule, layout: Mapping[str, Any]) -> ShrinkRule:
    """A rule for a fixed-layout name (``resnet20``): ``rule`` on its params plus ``layout``."""

    def fixed(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
        return rule({**params, **layout}, width, depth)

    return fixed


def register_layouts(rule: ShrinkRule, layouts: Mapping[str, Mapping[str, Any]]) -> None:
    """Register ``rule`` for every fixed-layout name of a family, with that name's layout."""
    for name, layout in layouts.items():
        SHRINK_RULES.add(name, with_layout(rule, layout))


# ---------------------------------------------------------------------------- simple stacks
@register_shrink("mlp")
def shrink_mlp(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Hidden widths times ``width``; Linear layers per block times ``depth``."""
    (layers,) = scale_blocks((params["block_layers"],), depth, "mlp")
    return "mlp", {**params, "hidden": scale_widths(params["hidden"], width), "block_layers": layers}


def conv_stack_rule(name: str) -> ShrinkRule:
    """The rule of a 1-D conv stack (``cnn1d``, ``dscnn1d``): ``channels`` times ``width``; layers
    per block (``block_layers``) times ``depth``; the ``depth`` blocks (the stages) kept."""

    def rule(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
        (layers,) = scale_blocks((params["block_layers"],), depth, name)
        return name, {**params, "channels": scale(params["channels"], width), "block_layers": layers}

    return rule


register_shrink("cnn1d")(conv_stack_rule("cnn1d"))
register_shrink("dscnn1d")(conv_stack_rule("dscnn1d"))


@register_shrink("cnn2d")
def shrink_cnn2d(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Block channels and the hidden layer times ``width`` (no hidden layer stays none); convs
    per block times ``depth``."""
    (layers,) = scale_blocks((params["block_layers"],), depth, "cnn2d")
    hidden = scale(params["hidden"], width) if params["hidden"] > 0 else 0
    return "cnn2d", {
        **params,
        "channels": scale_widths(params["channels"], width),
        "hidden": hidden,
        "block_layers": layers,
    }


@register_shrink("lenet")
def shrink_lenet(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Conv channels and the hidden width times ``width``; LeNet-5 has one conv per stage."""
    if scale_blocks((1, 1, 1), depth, "lenet") != (1, 1, 1):
        raise ConfigError(
            f"LeNet-5 has one conv per stage and no deeper form: depth must round one layer to "
            f"one (depth < 1.5), got {depth:g}; use 'cnn2d' for a deeper student"
        )
    return "lenet", {**params, "widths": scale_widths(params["widths"], width)}


register_layouts(shrink_lenet, {"lenet5": {"widths": LENET5_WIDTHS}, "lenet5_half": {"widths": LENET5_HALF_WIDTHS}})


# ---------------------------------------------------------------------------------- ResNets
@register_shrink("resnet_cifar")
def shrink_resnet_cifar(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Stem and stage widths times ``width``; BasicBlocks per stage times ``depth``."""
    return "resnet_cifar", {
        "blocks": scale_blocks(params["blocks"], depth, "resnet_cifar"),
        "widths": scale_widths(params["widths"], width),
    }


_CIFAR, _CIFAR_X4 = (16, 16, 32, 64), (32, 64, 128, 256)
RESNET_CIFAR_LAYOUTS: dict[str, dict[str, Any]] = {
    **{f"resnet{6 * n + 2}": {"blocks": (n, n, n), "widths": _CIFAR} for n in (1, 2, 3, 5, 7, 9, 18)},
    "resnet8x4": {"blocks": (1, 1, 1), "widths": _CIFAR_X4},
    "resnet32x4": {"blocks": (5, 5, 5), "widths": _CIFAR_X4},
}
"""The fixed CIFAR ResNets as ``resnet_cifar`` parameters (depth ``6n + 2``: ``n`` per stage)."""
register_layouts(shrink_resnet_cifar, RESNET_CIFAR_LAYOUTS)


@register_shrink("resnet_imagenet")
def shrink_resnet_imagenet(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Stage widths (the stem follows the first) times ``width``; blocks per stage times ``depth``."""
    return "resnet_imagenet", {
        "blocks": scale_blocks(params["blocks"], depth, "resnet_imagenet"),
        "widths": scale_widths(params["widths"], width),
        "stem": params["stem"],
    }


_BASIC_WIDTHS = (64, 128, 256, 512)
RESNET_IMAGENET_LAYOUTS: dict[str, dict[str, Any]] = {
    "resnet18": {"blocks": (2, 2, 2, 2), "widths": _BASIC_WIDTHS, "stem": "imagenet"},
    "resnet34": {"blocks": (3, 4, 6, 3), "widths": _BASIC_WIDTHS, "stem": "imagenet"},
    "resnet18_cifar": {"blocks": (2, 2, 2, 2), "widths": _BASIC_WIDTHS, "stem": "cifar"},
    "resnet34_cifar": {"blocks": (3, 4, 6, 3), "widths": _BASIC_WIDTHS, "stem": "cifar"},
}
"""The fixed four-stage BasicBlock ResNets as ``resnet_imagenet`` parameters."""
register_layouts(shrink_resnet_imagenet, RESNET_IMAGENET_LAYOUTS)


@register_shrink("resnet_bottleneck_cifar")
def shrink_resnet_bottleneck(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Bottleneck widths (stage outputs are 4x, the stem follows the first) times ``width``;
    bottlenecks per stage times ``depth``."""
    return "resnet_bottleneck_cifar", {
        "blocks": scale_blocks(params["blocks"], depth, "resnet_bottleneck_cifar"),
        "planes": scale_widths(params["planes"], width),
    }


register_layouts(shrink_resnet_bottleneck, {"resnet50_cifar": {"blocks": (3, 4, 6, 3), "planes": (64, 128, 256, 512)}})


@register_shrink("wide_resnet")
def shrink_wide_resnet(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Stem and stage widths times ``width``; blocks per stage times ``depth``; dropout kept."""
    return "wide_resnet", {
        "blocks": scale_blocks(params["blocks"], depth, "wide_resnet"),
        "widths": scale_widths(params["widths"], width),
        "dropout": params["dropout"],
    }


@register_shrink("wrn")
def shrink_wrn(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """WRN-depth-widen as ``wide_resnet`` (``n = (depth - 4) / 6`` blocks per stage, widths
    ``16, 16k, 32k, 64k``), then shrunk."""
    blocks, widths = wrn_layout(params["depth"], params["widen"])
    return shrink_wide_resnet({"blocks": blocks, "widths": widths, "dropout": params["dropout"]}, width, depth)


WRN_LAYOUTS: dict[str, dict[str, int]] = {
    f"wrn_{d}_{k}": {"depth": d, "widen": k} for d, k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10))
}
"""The fixed Wide ResNets as ``wrn`` parameters."""
register_layouts(shrink_wrn, WRN_LAYOUTS)


# ---------------------------------------------------------------------------------- VGG
@register_shrink("vgg")
def shrink_vgg(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Block widths times ``width``; convs per block times ``depth`` (five blocks kept)."""
    return "vgg", {
        "layers": scale_blocks(params["layers"], depth, "vgg"),
        "widths": scale_widths(params["widths"], width),
    }


_VGG_WIDTHS = (64, 128, 256, 512, 512)
VGG_LAYOUTS: dict[str, tuple[int, ...]] = {
    "vgg8": (1, 1, 1, 1, 1),
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
"""The fixed VGGs: convs per block (widths 64, 128, 256, 512, 512)."""
register_layouts(shrink_vgg, {n: {"layers": layers, "widths": _VGG_WIDTHS} for n, layers in VGG_LAYOUTS.items()})


# ------------------------------------------------------------------------- efficient nets
MOBILENETV2_NARROWEST = 16
"""Base channels of MobileNetV2's narrowest layer: ``width_mult`` below 1/16 leaves it none."""


@register_shrink("mobilenetv2")
def shrink_mobilenetv2(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """``width_mult`` times ``width`` (at least 1/16); blocks of each of the seven groups times ``depth``."""
    mult = params["width_mult"] * width
    floor = 1.0 / MOBILENETV2_NARROWEST
    if mult < floor:
        logger.warning(
            "mobilenetv2: width_mult %g raised to %g, the least that leaves every layer a channel", mult, floor
        )
        mult = floor
    return "mobilenetv2", {**params, "width_mult": mult, "blocks": scale_blocks(params["blocks"], depth, "mobilenetv2")}


@register_shrink("shufflenetv1")
def shrink_shufflenetv1(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Stem and stage widths times ``width`` on multiples of 12, each stage at least 12 above the
    previous; bottlenecks per stage times ``depth``."""
    step = V1_CHANNEL_STEP
    stem = scale_to_step(params["stem_channels"], width, step)
    widths, previous = [], stem
    for c in params["widths"]:
        previous = max(previous + step, scale_to_step(c, width, step))
        widths.append(previous)
    return "shufflenetv1", {
        "widths": tuple(widths),
        "blocks": scale_blocks(params["blocks"], depth, "shufflenetv1"),
        "stem_channels": stem,
    }


@register_shrink("shufflenetv2")
def shrink_shufflenetv2(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Stage widths times ``width`` (even), the stem too, the head only when ``width > 1``; the
    units of each stage (its down-sampling block plus the basic blocks) times ``depth``."""
    units = scale_blocks([n + 1 for n in params["blocks"]], depth, "shufflenetv2")
    last = params["last_channels"]
    return "shufflenetv2", {
        "widths": tuple(scale_to_step(c, width, 2) for c in params["widths"]),
        "blocks": tuple(u - 1 for u in units),
        "stem_channels": scale(params["stem_channels"], width),
        "last_channels": scale(last, width) if width > 1 else last,
    }


@register_shrink("residual_pair")
def shrink_residual_pair(params: dict[str, Any], width: float, depth: float) -> tuple[str, dict[str, Any]]:
    """Not a family: always raises."""
    raise ConfigError(
        "'residual_pair' is a student beside a residual assistant, not a model family: shrink "
        "its 'student' and 'assistant' specs instead"
    )


# ------------------------------------------------------------------------------- the entry
def shrinkable() -> list[str]:
    """Model names that have a shrink rule (``residual_pair`` excluded: its rule refuses)."""
    return [n for n in SHRINK_RULES.names() if n != "residual_pair"]


def _completed(builder: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` plus the builder's defaults for every other parameter but the data's."""
    out = dict(params)
    for key, (_, default) in signature_fields(builder, exclude=DATA_PARAMS).items():
        if key not in out and default is not ...:
            out[key] = default
    return out


def shrink_spec(
    name: str, params: Mapping[str, Any], width: float = 1.0, depth: float = 1.0, where: str = "student"
) -> tuple[str, dict[str, Any]]:
    """The registered model spec of ``name``'s family shrunk by ``width`` and ``depth``.

    Args:
        name: The teacher's registered model name (``resnet32x4``, ``cnn1d``, ...).
        params: The teacher's builder parameters (``num_classes``/``input_shape`` may be among
            them and are passed through; missing ones take the builder's defaults).
        width: Multiplier of every channel count (> 0; 0.5 halves them).
        depth: Multiplier of the layers or blocks in every stage (> 0; each stage keeps one).
        where: Config path for errors (``student``).

    Returns:
        ``(model name, params)``: a registered name and JSON-able builder parameters;
        ``create_model(name, **params)`` (with ``num_classes``/``input_shape`` when not in
        them) builds the student, with the teacher's stages and tap names.

    Raises:
        ConfigError: A multiplier that is not a finite number > 0, a model without a rule (the
            message lists the shrinkable ones), bad teacher params, or a family rule refusing.

    Example:
        >>> shrink_spec("resnet32x4", {}, width=0.5, depth=0.2)
        ('resnet_cifar', {'blocks': [1, 1, 1], 'widths': [16, 32, 64, 128]})
    """
    width = check_multiplier(width, "width", where)
    depth = check_multiplier(depth, "depth", where)
    if name not in SHRINK_RULES or name not in MODELS:
        raise ConfigError(
            f"{where}: model {name!r} has no width/depth shrink rule. Shrinkable families: {', '.join(shrinkable())}."
        )
    builder = MODELS.get(name)
    checked = validate_kwargs(builder, dict(params), where=f"{where}.params")
    data = {k: checked.pop(k) for k in DATA_PARAMS if k in checked}
    try:
        new_name, new_params = SHRINK_RULES.get(name)(_completed(builder, checked), width, depth)
    except ValueError as exc:  # a ConfigError of a family rule, or a bad layout (a WRN depth not 6n + 4)
        raise ConfigError(f"{where}: model {name!r}: {exc}") from None
    new_params = {**data, **new_params}
    validate_kwargs(MODELS.get(new_name), new_params, where=f"{where} (model {name!r} shrunk to {new_name!r})")
    return new_name, to_jsonable(new_params)
