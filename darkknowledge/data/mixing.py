"""Mixup and cutmix with a partner drawn by dataset index: inputs *between* training points.

Function matching (Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022) distils on inputs that lie between the training points: the student
matches the teacher's function on mixed inputs that no label describes, and only the teacher's
outputs teach on them. This module draws and applies the mixing; :class:`~darkknowledge.data.
augment.Augment` calls it, the loader fetches the partners.

Like every augmentation here, a mixed view is explicit data, drawn once per global batch:

* ``mix_partner`` ``(n,)`` int64: the partner as an index into the *training dataset* (transfer
  set included), not a position in the batch. So a view depends on nothing but its draw: the
  loader fetches the partner rows from the dataset, each DDP rank fetches its own samples'
  partners, and a teacher-output cache stores the draw and replays the view exactly.
* ``mix_lam`` ``(n,)`` float32: the sample's own weight in a mixup blend, ``lam ~ Beta(a, a)``
  with ``a = mixup``; 1 for a cutmix sample and for a sample left unmixed.
* ``mix_box`` ``(n, 4)`` int64 ``(top, bottom, left, right)`` (only with cutmix): the partner's
  box pasted into the sample, of area fraction ``1 - lam`` with ``lam ~ Beta(a, a)``, ``a = cutmix``
  (CutMix, Yun et al., ICCV 2019); over the last two dims of ``(B, C, H, W)`` images, a segment
  of the last dim of ``(B, L)`` or ``(B, C, L)`` signals (``top, bottom = 0, 1``). Empty for a
  mixup sample and an unmixed one.

Mixup blends ``x' = lam * x + (1 - lam) * x_partner``. With both mixup and cutmix on, each mixed
sample is one or the other with probability 1/2. Each sample is mixed with probability
``mix_prob``; an unmixed one has partner 0, ``lam = 1`` and an empty box, and stays bit for bit
what it was.

Order: mixing comes first, then the sample's flip, crop, shift, scale and noise. Those are linear
and drawn once per sample, so this equals giving both inputs the sample's draw and mixing the
results; Beyer et al. mix two independently augmented images instead (the partner here shares
the sample's geometric draw).

Labels: a mixed input has no class. The loader marks it ``UNLABELED`` (-1), so cross-entropy and
every label-reading term skip it and only the teacher teaches on it, as on a transfer set.
"""

from __future__ import annotations

import numpy as np
import torch

AugmentParams = dict[str, torch.Tensor]

MIX_KEYS = ("mix_partner", "mix_lam", "mix_box")
"""The drawn parameters of mixing (``mix_box`` only with cutmix)."""


def draw_mix(
    n: int,
    generator: torch.Generator,
    sample_shape: tuple[int, ...],
    population: int,
    mixup: float,
    cutmix: float,
    prob: float,
) -> AugmentParams:
    """Draw the mixing of ``n`` samples on the CPU (see the module docstring).

    The number of draws does not depend on the values, so the stream is the same for every
    setting of ``prob``.

    Args:
        n: Number of samples (the global batch).
        generator: CPU generator; the only source of randomness.
        sample_shape: Shape of one input (needed for cutmix boxes).
        population: Size of the dataset the partners are drawn from (``>= 1``).
        mixup: Beta concentration of mixup's ``lam`` (0: no mixup).
        cutmix: Beta concentration of cutmix's ``lam`` (0: no cutmix).
        prob: Probability that a sample is mixed.

    Returns:
        ``mix_partner`` ``(n,)``, ``mix_lam`` ``(n,)`` and, with cutmix, ``mix_box`` ``(n, 4)``.
    """
    if population < 1:
        raise ValueError(f"mixing draws partners from the dataset, which has {population} samples")
    if cutmix > 0 and not sample_shape:
        raise ValueError("draw_mix needs sample_shape for cutmix boxes")
    partner = torch.randint(population, (n,), generator=generator)  # (n,)
    mixed = torch.rand(n, generator=generator) < prob  # (n,)
    coin = torch.rand(n, generator=generator) < 0.5  # (n,): cutmix (True) or mixup, when both are on
    cut = coin if mixup > 0 and cutmix > 0 else torch.full((n,), cutmix > 0)  # (n,)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))  # Beta draws
    ones = np.ones(n)
    lam_mix = torch.from_numpy(rng.beta(mixup, mixup, n) if mixup > 0 else ones).float()  # (n,)
    lam_cut = torch.from_numpy(rng.beta(cutmix, cutmix, n) if cutmix > 0 else ones).float()  # (n,)
    params: AugmentParams = {
        "mix_partner": torch.where(mixed, partner, torch.zeros_like(partner)),
        "mix_lam": torch.where(mixed & ~cut, lam_mix, torch.ones_like(lam_mix)),
    }
    if cutmix > 0:
        box = _boxes(1.0 - lam_cut, sample_shape, generator)  # (n, 4)
        params["mix_box"] = torch.where((mixed & cut).unsqueeze(1), box, torch.zeros_like(box))
    return params


def _boxes(area: torch.Tensor, sample_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Boxes ``(n, 4)`` ``(top, bottom, left, right)`` of about ``area`` ``(n,)`` of the input,
    centred uniformly and clipped to it (CutMix's box: side ``sqrt(area)`` of each side in 2-D)."""
    n = area.shape[0]
    two_d = len(sample_shape) >= 3
    height, width = (sample_shape[-2], sample_shape[-1]) if two_d else (1, sample_shape[-1])
    side = area.sqrt() if two_d else area  # (n,): the fraction of each side cut
    cut_h = (side * height).round().long() if two_d else torch.ones(n, dtype=torch.int64)  # (n,)
    cut_w = (side * width).round().long()  # (n,)
    cy = torch.randint(height, (n,), generator=generator)  # (n,)
    cx = torch.randint(width, (n,), generator=generator)  # (n,)
    top = (cy - cut_h // 2).clamp(0, height) if two_d else torch.zeros(n, dtype=torch.int64)
    bottom = (cy - cut_h // 2 + cut_h).clamp(0, height) if two_d else torch.ones(n, dtype=torch.int64)
    left = (cx - cut_w // 2).clamp(0, width)
    right = (cx - cut_w // 2 + cut_w).clamp(0, width)
    empty = (bottom <= top) | (right <= left)  # (n,)
    box = torch.stack([top, bottom, left, right], dim=1)  # (n, 4)
    return torch.where(empty.unsqueeze(1), torch.zeros_like(box), box)


def box_mask(box: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Where each sample's box lies, broadcastable over a batch of ``shape``.

    Args:
        box: ``(B, 4)`` ``(top, bottom, left, right)`` on the batch's device.
        shape: The batch's shape: ``(B, L)``, ``(B, C, L)`` or ``(B, C, H, W)``.

    Returns:
        Bool ``(B, L)``, ``(B, 1, L)`` or ``(B, 1, H, W)``.
    """
    cols = torch.arange(shape[-1], device=box.device)  # (W,)
    across = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # (B, W)
    if len(shape) >= 4:
        rows = torch.arange(shape[-2], device=box.device)  # (H,)
        down = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])  # (B, H)
        return (down.unsqueeze(2) & across.unsqueeze(1)).unsqueeze(1)  # (B, 1, H, W)
    return across.view(shape[0], *([1] * (len(shape) - 2)), shape[-1])  # (B, L) or (B, 1, L)


def mix(x: torch.Tensor, partner: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Mix each sample of ``x`` with its partner's input as ``params`` say.

    Args:
        x: ``(B, ...)`` floating-point inputs.
        partner: ``(B, ...)`` the partners' inputs (rows ``params["mix_partner"]`` of the dataset),
            scaled like ``x``.
        params: ``mix_lam`` ``(B,)`` and optionally ``mix_box`` ``(B, 4)``, on ``x``'s device.

    Returns:
        The mixed batch, shape and dtype of ``x``; an unmixed sample is returned unchanged.
    """
    if partner.shape != x.shape:
        raise ValueError(f"mixing needs one partner per sample of shape {tuple(x.shape)} (got {tuple(partner.shape)})")
    partner = partner.to(x.dtype)
    lam = params["mix_lam"].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)
    out = torch.where(lam < 1, lam * x + (1 - lam) * partner, x)
    if "mix_box" in params:
        out = torch.where(box_mask(params["mix_box"], tuple(x.shape)), partner, out)
    return out


def mixed_samples(params: AugmentParams) -> torch.Tensor:
    """Which samples of a draw are mixed ``(n,)`` bool: blended (``lam < 1``) or given a non-empty box."""
    mixed = params["mix_lam"] < 1  # (n,)
    if "mix_box" in params:
        box = params["mix_box"]  # (n, 4)
        mixed = mixed | ((box[:, 1] > box[:, 0]) & (box[:, 3] > box[:, 2]))
    return mixed
