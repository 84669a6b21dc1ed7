"""CS-KD's same-class partners: for each training sample, another sample of its class.

Yun, Park, Lee & Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation",
CVPR 2020 (arXiv:2003.13964), Sec. 3: the network's softened prediction on a sample ``x'`` of
the same class (a constant) teaches its prediction on ``x``. The ``cskd`` scheme runs the
network once on ``[x; x']`` and its ``partner`` half teaches the ``student`` half through a
:class:`~darkknowledge.teachers.peers.Peer` teacher; this module draws and fetches ``x'``.

Pairing is deterministic: the partner of training sample ``i`` at a step is drawn from a
generator seeded by the run seed and the step's position (no state), so DDP ranks and
resumed runs draw the same partners. Partners are fetched from the training tensors as the
loader delivers them (scaled, normalised), without augmentation (the official code augments
``x'``). A sample without a partner (unlabelled, or alone in its class) is its own partner:
it teaches itself, which adds nothing to a KL term.
"""

from __future__ import annotations

from typing import Any

import torch

from darkknowledge.data.batch import UNLABELED
from darkknowledge.errors import ConfigError


class ClassPartners:
    """Draws, for each training sample, another training sample of the same class.

    Args:
        x: Training inputs ``(N, ...)`` (``uint8`` images are scaled to ``[0, 1]`` on fetch).
        y: Training labels ``(N,)``; ``-1`` (unlabelled) samples never get or serve as partners.
        num_classes: K.
        seed: Base seed of the draws.
        normalization: The loader's ``(mean, std)`` per channel, or None.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        seed: int,
        normalization: tuple[Any, Any] | None = None,
    ) -> None:
        y = y.long()
        labelled = y != UNLABELED
        if y.numel() and int(y.max()) >= num_classes:
            raise ConfigError(f"cskd: a training label {int(y.max())} is >= the class count {num_classes}")
        self.x, self.y, self.seed = x, y, seed
        key = torch.where(labelled, y, torch.full_like(y, num_classes))  # unlabelled sort last
        self.order = torch.sort(key, stable=True).indices  # (N,) samples grouped by class
        self.count = torch.bincount(y[labelled], minlength=num_classes)  # (K,)
        self.start = torch.cumsum(self.count, 0) - self.count  # (K,)
        group_start = torch.cat([self.start, self.count.sum()[None]])  # (K+1,) the unlabelled group last
        self.rank = torch.empty_like(self.order)  # (N,) position of each sample within its class
        self.rank[self.order] = torch.arange(len(y)) - group_start[key[self.order]]
        self.norm = (
            None if normalization is None else tuple(torch.as_tensor(v, dtype=torch.float32) for v in normalization)
        )

    def to(self, device: torch.device) -> ClassPartners:
        for name in ("x", "y", "order", "count", "start", "rank"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def draw(self, idx: torch.Tensor, y: torch.Tensor, step_key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Partners of the samples ``idx`` (labels ``y``) at the step ``step_key``.

        Returns:
            ``(partner (B,), has_partner (B,))``: a partner is another sample of the same class;
            samples without one (unlabelled, or alone in their class) get themselves and False.
        """
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step_key) % (2**63 - 1))
        u = torch.rand(len(self.y), generator=gen).to(idx.device)[idx]  # (B,) one draw per training sample
        c = y.clamp(min=0)  # (B,)
        count = self.count.to(idx.device)[c]  # (B,)
        others = (count - 1).clamp(min=1)
        r = (u * others).long().clamp(max=others - 1)  # (B,) rank among the class's other samples
        r = r + (r >= self.rank.to(idx.device)[idx]).long()  # skip the sample itself
        partner = self.order.to(idx.device)[(self.start.to(idx.device)[c] + r).clamp(max=len(self.y) - 1)]
        has = (y != UNLABELED) & (count > 1)
        return torch.where(has, partner, idx), has

    def fetch(self, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inputs of samples ``idx`` as the loader delivers them (scaled, normalised) ``(B, ...)``."""
        x = self.x[idx.to(self.x.device)].to(like.device)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x.to(like.dtype)
        if self.norm is not None:
            mean, std = (t.to(x.device, x.dtype) for t in self.norm)
            shape = (1, -1) + (1,) * (x.ndim - 2) if mean.numel() > 1 else (1,)
            x = (x - mean.reshape(shape)) / std.reshape(shape)
        return x
