"""The training "data" of a data-free stage: latent batches, drawn from the seed and the step.

A :class:`LatentLoader` stands where a stage's loader over the training split would stand (the
engine asks it for ``set_epoch``, ``iter_from``, ``len`` and ``data``) but reads no dataset: batch
``b`` of epoch ``e`` is :func:`~darkknowledge.synthesis.base.draw_latent` of ``(seed, e, b)``, so an
interrupted epoch resumes on the very batches it would have drawn. Under DDP each rank takes its
contiguous share of the global batch, like the real loader.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from darkknowledge.data.batch import Batch
from darkknowledge.data.loader import rank_bounds
from darkknowledge.errors import ConfigError
from darkknowledge.synthesis.base import draw_latent


class _Size:
    """A sized stand-in for the loader's dataset (``len(loader.data)``: samples per epoch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class LatentLoader:
    """``steps`` latent batches of ``batch_size`` codes per epoch (see the module docstring).

    Args:
        seed: The stage's seed.
        batch_size: Global batch size ``B``.
        steps: Batches per epoch.
        latent_dim: Width of the codes.
        num_classes: Classes of the target draws.
        device: Where batches are made.
        rank: This process's rank.
        world_size: Number of processes.
    """

    augment = None
    replay = None

    def __init__(
        self,
        seed: int,
        batch_size: int,
        steps: int,
        latent_dim: int,
        num_classes: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or steps < 1:
            raise ConfigError(f"a latent loader needs batch_size >= 1 and steps >= 1 (got {batch_size}, {steps})")
        self.seed, self.batch_size, self.steps = seed, batch_size, steps
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.channels_last = False  # set by the engine with train.channels_last; latents have no layout
        self.data = _Size(steps * batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """This epoch's batches from ``start_batch`` on."""
        start, stop = rank_bounds(self.batch_size, self.rank, self.world_size)
        for b in range(start_batch, self.steps):
            latent = draw_latent(self.seed, (self.epoch, b), self.batch_size, self.latent_dim, self.num_classes)
            yield Batch(latent.x[start:stop], latent.y[start:stop], latent.idx[start:stop]).to(self.device)

    def __repr__(self) -> str:
        return (
            f"LatentLoader(seed={self.seed}, batch_size={self.batch_size}, steps={self.steps}, "
            f"latent_dim={self.latent_dim})"
        )
