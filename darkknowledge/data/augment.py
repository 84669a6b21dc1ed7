"""Reproducible batch-level augmentation: draw parameters once, apply them anywhere.

Augmentation is split in two so that every random choice is explicit data:

* ``draw(n, generator, sample_shape)`` makes all random choices for ``n`` samples on the
  CPU from a ``torch.Generator`` and returns them as a dict of per-sample tensors (leading
  dim ``n``). The loader draws once per *global* batch and slices each rank's rows with
  ``slice_params``, so DDP and a single process see the same augmented views; a teacher
  output cache can store or re-draw the same parameters and replay them.
* ``apply(x, params)`` is deterministic and runs on whatever device ``x`` is on.

Transforms, in this order: mixing with a partner sample (mixup, cutmix; see
:mod:`darkknowledge.data.mixing`: the partner is drawn as a dataset index and the loader fetches
it), horizontal flip (last dim), random crop with zero padding (CIFAR-style: translate by up to
``crop_padding`` pixels, zero fill), random shift (the same kind of zero-filled translation,
meant for 1-D signals such as MNIST-1D), amplitude scaling (each sample multiplied by its own
factor, meant for 1-D signals; on images it scales the brightness), and additive gaussian noise
(jitter). Inputs are ``(B, D)`` tabular features, ``(B, L)`` or ``(B, C, L)`` signals (1-D: the
last dim moves) or ``(B, C, H, W)`` images (2-D: the last two dims move). The loader applies
augmentation after scaling ``uint8`` to ``[0, 1]`` and before normalisation, so zero padding is
black and ``noise`` is in ``[0, 1]`` pixel units for images (standardised units for
pre-normalised data).

Function matching (Beyer et al., CVPR 2022) distils on mixed inputs, which no label describes:
a mixed sample carries the label ``UNLABELED``, and a stage without a teacher (a teacher's own
training, a baseline) drops the mixing (``without_mixing``) and keeps the other transforms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from darkknowledge.data.batch import to_device
from darkknowledge.data.mixing import draw_mix, mix
from darkknowledge.errors import ConfigError
from darkknowledge.validation import validate_kwargs

AugmentParams = dict[str, torch.Tensor]
"""Per-sample draws: ``flip`` (n,) bool, ``crop`` / ``shift`` (n, 2) int64 ``(dy, dx)``,
``noise`` (n, *sample_shape) float32, ``scale`` (n,) float32; mixing's ``mix_partner`` (n,)
int64 (a dataset index), ``mix_lam`` (n,) float32 and ``mix_box`` (n, 4) int64 (``data.mixing``)."""


def _translate(x: torch.Tensor, offsets: torch.Tensor, dim: int) -> torch.Tensor:
    """Shift each sample of ``x`` by its own offset along ``dim``, filling with zeros.

    ``out[b, ..., i, ...] = x[b, ..., i - offsets[b], ...]`` where that index exists, else 0.

    Args:
        x: ``(B, ...)`` tensor.
        offsets: ``(B,)`` integer offsets on ``x.device``.
        dim: Dimension to translate along (positive).
    """
    size = x.shape[dim]
    positions = torch.arange(size, device=x.device)  # (size,)
    source = positions.unsqueeze(0) - offsets.unsqueeze(1)  # (B, size)
    valid = (source >= 0) & (source < size)  # (B, size)
    view = [x.shape[0]] + [1] * (x.ndim - 1)
    view[dim] = size
    index = source.clamp(0, size - 1).view(view).expand_as(x)  # (B, ...) like x
    moved = torch.gather(x, dim, index)
    return moved * valid.view(view).to(x.dtype)


def slice_params(params: AugmentParams, start: int, stop: int) -> AugmentParams:
    """Rows ``[start:stop]`` of every drawn tensor (one rank's part of a global draw)."""
    return {k: v[start:stop] for k, v in params.items()}


def params_to(params: AugmentParams, device: torch.device | str, non_blocking: bool = False) -> AugmentParams:
    """Move every drawn tensor to ``device`` (``non_blocking``: through pinned memory, see
    :func:`~darkknowledge.data.batch.to_device`)."""
    if non_blocking:
        return {k: to_device(v, torch.device(device)) for k, v in params.items()}
    return {k: v.to(device) for k, v in params.items()}


@dataclass(frozen=True)
class Augment:
    """Batch augmentation settings.

    Attributes:
        hflip: Flip the last dim with probability 1/2.
        crop_padding: Random crop after zero padding by this many pixels (0 = off).
        shift: Random translation by up to this many steps with zero fill (0 = off).
        noise: Standard deviation of additive gaussian noise (jitter; 0 = off).
        scale: Multiply each sample by a factor drawn uniformly from ``[1 - scale, 1 + scale]``
            (amplitude scaling; 0 = off, below 1).
        mixup: Beta concentration ``a`` of mixup's weight ``lam ~ Beta(a, a)`` (1: uniform;
            0 = off). Mixed inputs carry no label (see :mod:`darkknowledge.data.mixing`).
        cutmix: Beta concentration of cutmix's kept area (0 = off); with ``mixup`` too, each
            mixed sample is one or the other with probability 1/2.
        mix_prob: Probability that a sample is mixed (needs ``mixup`` or ``cutmix``); the others
            keep their label.
    """

    hflip: bool = False
    crop_padding: int = 0
    shift: int = 0
    noise: float = 0.0
    scale: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0

    def __post_init__(self) -> None:
        for name in ("crop_padding", "shift", "noise", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.augment.{name}: must be >= 0 (got {getattr(self, name)!r})")
        if not 0 <= self.scale < 1:
            raise ConfigError(f"data.augment.scale: must be in [0, 1) (got {self.scale!r}); 0.2 scales by 0.8 to 1.2")
        if not 0 < self.mix_prob <= 1:
            raise ConfigError(f"data.augment.mix_prob: must be in (0, 1] (got {self.mix_prob!r})")
        if self.mix_prob != 1 and not self.mixes:
            raise ConfigError(
                f"data.augment.mix_prob={self.mix_prob!r} has nothing to mix: set data.augment.mixup or "
                "data.augment.cutmix > 0 (e.g. mixup: 1.0), or leave mix_prob out"
            )

    @classmethod
    def from_config(cls, config: Augment | Mapping[str, Any] | None) -> Augment | None:
        """Build from a recipe mapping (validated, unknown keys rejected); None stays None."""
        if config is None or isinstance(config, Augment):
            return config
        return cls(**validate_kwargs(cls, config, where="data.augment"))

    @property
    def mixes(self) -> bool:
        """True when samples are mixed with partners (mixup or cutmix)."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def enabled(self) -> bool:
        """True when at least one transform is switched on."""
        return self.hflip or self.crop_padding > 0 or self.shift > 0 or self.noise > 0 or self.scale > 0 or self.mixes

    def without_mixing(self) -> Augment | None:
        """These settings without mixup and cutmix (for a stage that learns from labels
        alone); None when nothing else is switched on."""
        rest = replace(self, mixup=0.0, cutmix=0.0, mix_prob=1.0)
        return rest if rest.enabled else None

    def draw(
        self, n: int, generator: torch.Generator, sample_shape: tuple[int, ...] = (), population: int | None = None
    ) -> AugmentParams:
        """Draw the random choices for ``n`` samples on the CPU.

        Args:
            n: Number of samples (the global batch).
            generator: CPU generator; the only source of randomness.
            sample_shape: Shape of one input, needed when ``noise > 0`` or ``cutmix > 0``.
            population: Number of samples in the dataset the mixing partners are drawn from,
                needed when mixing.

        Returns:
            A dict holding only the enabled transforms' tensors, each with leading dim ``n``.
        """
        params: AugmentParams = {}
        if self.hflip:
            params["flip"] = torch.rand(n, generator=generator) < 0.5  # (n,)
        if self.crop_padding > 0:
            p = self.crop_padding
            params["crop"] = torch.randint(-p, p + 1, (n, 2), generator=generator)  # (n, 2): (dy, dx)
        if self.shift > 0:
            s = self.shift
            params["shift"] = torch.randint(-s, s + 1, (n, 2), generator=generator)  # (n, 2): (dy, dx)
        if self.noise > 0:
            if not sample_shape:
                raise ValueError("Augment.draw needs sample_shape when noise > 0")
            params["noise"] = torch.randn((n, *sample_shape), generator=generator) * self.noise  # (n, *shape)
        if self.scale > 0:
            params["scale"] = 1.0 + (2.0 * torch.rand(n, generator=generator) - 1.0) * self.scale  # (n,)
        if self.mixes:
            if population is None:
                raise ValueError("Augment.draw needs population (the dataset size) when mixing")
            params.update(draw_mix(n, generator, sample_shape, population, self.mixup, self.cutmix, self.mix_prob))
        return params

    def apply(self, x: torch.Tensor, params: AugmentParams, partner: torch.Tensor | None = None) -> torch.Tensor:
        """Apply drawn parameters to a floating-point batch (any device).

        Args:
            x: ``(B, D)``, ``(B, L)``, ``(B, C, L)`` or ``(B, C, H, W)`` floating-point inputs.
            params: Output of ``draw`` for exactly these ``B`` samples (on any device).
            partner: The mixing partners' inputs ``(B, ...)`` (dataset rows
                ``params["mix_partner"]``, scaled like ``x``); needed when ``params`` mix.

        Returns:
            The augmented batch, same shape and dtype as ``x``.
        """
        if x.ndim < 2:
            raise ValueError(f"Augment.apply needs a batch (B, ...) of inputs (got shape {tuple(x.shape)})")
        params = params_to(params, x.device)
        if "mix_partner" in params:
            if partner is None:
                raise ValueError("Augment.apply: these parameters mix samples; pass the partners' inputs (partner=)")
            x = mix(x, partner.to(x.device), params)
        spatial = [x.ndim - 2, x.ndim - 1] if x.ndim >= 4 else [x.ndim - 1]
        if "flip" in params:
            mask = params["flip"].view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)
            x = torch.where(mask, x.flip(-1), x)
        for key in ("crop", "shift"):
            if key in params:
                offsets = params[key]  # (B, 2)
                for col, dim in zip((1, 0), reversed(spatial)):  # last dim uses dx, the one before dy
                    x = _translate(x, offsets[:, col], dim)
        if "scale" in params:
            x = x * params["scale"].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...) factors
        if "noise" in params:
            x = x + params["noise"].to(x.dtype)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw for ``x.shape[0]`` samples and apply in one go (no mixing: it needs a dataset,
        see ``BatchLoader``)."""
        if self.mixes:
            raise ValueError("Augment.__call__ cannot mix: mixing draws partners from a dataset (use a BatchLoader)")
        return self.apply(x, self.draw(x.shape[0], generator, tuple(x.shape[1:])))
