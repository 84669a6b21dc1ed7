"""Batch-norm statistics of a frozen network: where they are, and how far a batch is from them.

A trained network's batch-norm layers keep the running mean and variance of their inputs over
the training data. Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", CVPR 2020, Eq. (4), regularise synthetic inputs ``x̂`` so that the batch
statistics they produce at every BN layer ``l`` match those stored ones:

    R_feature(x̂) = Σ_l ||μ_l(x̂) - E(μ_l(x) | X)||_2 + Σ_l ||σ²_l(x̂) - E(σ²_l(x) | X)||_2

where ``μ_l(x̂), σ²_l(x̂)`` ``(C_l,)`` are the mean and (biased) variance of the layer's *input*
over every dimension but the channel one, and ``E(·|X)`` are ``running_mean, running_var``
``(C_l,)``. As in the official code (NVlabs/DeepInversion, ``DeepInversionFeatureHook`` in
``deepinversion.py`` and ``cifar10/deepinversion_cifar10.py``): a forward hook reads the BN
layer's input, ``var`` is computed with ``unbiased=False``, each layer's term is
``norm(running_var - var, 2) + norm(running_mean - mean, 2)``, and the first BN layer may be
weighted more (``first_bn_multiplier``: 10 in ``imagenet_inversion.py``, absent (1) in the
CIFAR-10 script).

Shapes: a BN input is ``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)`` or ``(B, C, D, H, W)``; the
statistics are taken over ``B`` and every dimension after ``C``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from darkknowledge.errors import ConfigError, did_you_mean

__all__ = ["BNStatsHook", "batch_statistics", "bn_statistics_loss", "find_batchnorms"]


def _has_running_stats(module: nn.Module) -> bool:
    """A batch-norm layer (any ``_BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm, ...) with running statistics."""
    return (
        isinstance(module, _BatchNorm)
        and module.track_running_stats
        and isinstance(module.running_mean, torch.Tensor)
        and isinstance(module.running_var, torch.Tensor)
        and not isinstance(module.running_mean, nn.parameter.UninitializedBuffer)
    )


def find_batchnorms(model: nn.Module, paths: Iterable[str] | None = None) -> dict[str, _BatchNorm]:
    """The batch-norm layers of ``model`` that keep running statistics, by dotted path, in module order.

    Args:
        model: The (frozen) network, e.g. the teacher.
        paths: Dotted module paths to use (e.g. ``["bn1", "layer1.0.bn2"]``); None: every BN
            layer with running statistics.

    Returns:
        ``{path: layer}`` in the order ``model.named_modules()`` lists them (the first is the
        "first BN layer" of ``first_bn_multiplier``), whatever the order of ``paths``.

    Raises:
        ConfigError: ``model`` has no BN layer with running statistics (DeepInversion needs a
            teacher with batch-norm layers); a path names no module, or a module that is not
            such a BN layer (the message lists the BN paths there are).
    """
    found = {name: m for name, m in model.named_modules() if _has_running_stats(m)}
    if not found:
        raise ConfigError(
            f"model {type(model).__name__} has no batch-norm layer with running statistics (BatchNorm1d/2d/3d, "
            "SyncBatchNorm with track_running_stats=True); DeepInversion's feature regulariser needs a teacher "
            "with batch-norm layers: choose another teacher or another synthesizer"
        )
    if paths is None:
        return found
    wanted = list(paths)
    if not wanted:
        raise ConfigError(
            f"bn_layers: an empty list selects no layer; leave it out to use all of them ({', '.join(found)})"
        )
    names = dict(model.named_modules())
    for path in wanted:
        if path in found:
            continue
        if path not in names:
            why = "names no module of the model"
        else:
            why = f"is a {type(names[path]).__name__}, not a batch-norm layer with running statistics"
        raise ConfigError(
            f"bn_layers: {path!r} {why}.{did_you_mean(path, found)} Batch-norm layers: {', '.join(found)}"
        )
    chosen = set(wanted)
    return {name: m for name, m in found.items() if name in chosen}


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a BN layer's input (float32 at least).

    Args:
        x: ``(B, C, *)``: ``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)``, ...

    Returns:
        ``(mean, var)``, each ``(C,)``; ``var`` divides by the number of values (``unbiased=False``).
    """
    if x.dim() < 2:
        raise ConfigError(f"a batch-norm input needs a batch and a channel dimension (got shape {tuple(x.shape)})")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0)  # (C,), (C,)
    return mean, var


def bn_statistics_loss(
    means: Sequence[torch.Tensor],
    vars: Sequence[torch.Tensor],
    running_means: Sequence[torch.Tensor],
    running_vars: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """R_feature of Yin et al. 2020, Eq. (4): ``Σ_l w_l (||μ_l - μ̂_l||_2 + ||σ²_l - σ̂²_l||_2)``.

    Args:
        means: Batch means ``μ_l(x̂)``, one ``(C_l,)`` per layer.
        vars: Batch (biased) variances ``σ²_l(x̂)``, one ``(C_l,)`` per layer.
        running_means: The layers' ``running_mean`` ``(C_l,)`` (``E(μ_l | X)``); no gradient flows to them.
        running_vars: The layers' ``running_var`` ``(C_l,)`` (``E(σ²_l | X)``).
        weights: Per-layer weights ``w_l`` (default: 1 each; the official code's
            ``first_bn_multiplier`` is ``w_0``).

    Returns:
        A scalar (0-d) tensor; 0 when every batch statistic equals the running one.

    Raises:
        ConfigError: The sequences differ in length, or no layer is given.
    """
    n = len(means)
    if n == 0 or not (len(vars) == len(running_means) == len(running_vars) == n):
        raise ConfigError(
            f"bn_statistics_loss needs the same number (>= 1) of means, vars, running means and "
            f"running vars (got {len(means)}, {len(vars)}, {len(running_means)}, {len(running_vars)})"
        )
    w = [1.0] * n if weights is None else [float(v) for v in weights]
    if len(w) != n:
        raise ConfigError(f"bn_statistics_loss: {len(w)} weights for {n} layers")
    total = means[0].new_zeros((), dtype=torch.float32)
    for wl, mu, var, rmu, rvar in zip(w, means, vars, running_means, running_vars):
        if mu.shape != rmu.shape or var.shape != rvar.shape:
            raise ConfigError(
                f"bn_statistics_loss: batch statistics of shape {tuple(mu.shape)} do not fit running "
                f"statistics of shape {tuple(rmu.shape)}"
            )
        d_mean = torch.linalg.vector_norm(rmu.detach().to(mu.dtype) - mu)  # ||E(μ) - μ(x̂)||_2, scalar
        d_var = torch.linalg.vector_norm(rvar.detach().to(var.dtype) - var)  # ||E(σ²) - σ²(x̂)||_2, scalar
        total = total + wl * (d_mean + d_var)
    return total


class BNStatsHook:
    """While active (``with BNStatsHook(layers) as hook:``), records the batch statistics of each
    layer's input on every forward; ``loss()`` is R_feature over the last forward.

    The hooks exist only inside the ``with`` block, so forwards of the same network elsewhere (a
    task's own teacher forward) neither pay for them nor overwrite what they hold. A layer run
    twice in one forward keeps the statistics of its last call (as the official hook does).

    Args:
        layers: ``{path: bn layer}`` (:func:`find_batchnorms`), in the order of the weights.
        first_bn_multiplier: Weight of the first layer's term (the others weigh 1).
    """

    def __init__(self, layers: dict[str, _BatchNorm], first_bn_multiplier: float = 1.0) -> None:
        if not layers:
            raise ConfigError("BNStatsHook needs at least one batch-norm layer")
        self.layers = dict(layers)
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> BNStatsHook:
        self.stats = {}
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._recorder(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recorder(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            self.stats[name] = batch_statistics(inputs[0])

        return hook

    def clear(self) -> None:
        """Forget the recorded statistics (call before a forward to be sure what ``loss`` reads)."""
        self.stats = {}

    def loss(self) -> torch.Tensor:
        """R_feature (Eq. 4) over the layers that ran since the last ``clear``, first one weighted.

        Raises:
            ConfigError: No layer ran (the network did not run inside the block, or none of the
                selected layers is on its forward path).
        """
        ran = [name for name in self.layers if name in self.stats]
        if not ran:
            raise ConfigError(
                f"none of the batch-norm layers {', '.join(self.layers)} ran in the forward pass: "
                "run the network inside the BNStatsHook block, or select layers on its forward path"
            )
        first = next(iter(self.layers))
        weights = [self.first_bn_multiplier if name == first else 1.0 for name in ran]
        means = [self.stats[name][0] for name in ran]
        vars_ = [self.stats[name][1] for name in ran]
        # layers with running statistics only (find_batchnorms)
        running_means = cast("list[torch.Tensor]", [self.layers[name].running_mean for name in ran])
        running_vars = cast("list[torch.Tensor]", [self.layers[name].running_var for name in ran])
        return bn_statistics_loss(means, vars_, running_means, running_vars, weights)
