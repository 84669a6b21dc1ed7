"""A deterministic, resumable, DDP-aware loader of token blocks.

The same contract as :class:`darkknowledge.data.loader.BatchLoader`: each epoch's row order is
a permutation drawn from a generator seeded by ``(seed, epoch, PERMUTATION_STREAM)`` alone (it
never depends on what ran before, so resuming is exact); the order is cut into *global*
batches of ``batch_size`` rows; rank ``r`` of ``world_size`` takes its contiguous share
``rank_bounds(b, r, W)`` of each, so the ranks' shares concatenated are the single-process
batch. A last partial batch is split as evenly as possible, and a rank may get an empty share
(every rank runs the same number of steps).

Batches hold ids, not features: ``x`` and ``y`` stay int64 ``(b, L)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from darkknowledge.data.batch import Batch, to_device
from darkknowledge.data.loader import check_loader_args, rank_bounds
from darkknowledge.data.seeds import PERMUTATION_STREAM, make_generator
from darkknowledge.errors import ConfigError
from darkknowledge.lm.tokens import TokenBlocks


class TokenLoader:
    """Iterate :class:`TokenBlocks` in reproducible global batches, this rank's share of each.

    Args:
        blocks: The rows.
        batch_size: The GLOBAL batch size in rows (over all ranks); divisible by ``world_size``.
        shuffle: New permutation each epoch (else row order).
        seed: Base seed of the permutations (non-negative).
        drop_last: Drop the last partial global batch.
        rank: This process's rank.
        world_size: Number of processes.
        device: Where batches are delivered (from CPU to CUDA through pinned memory).

    Raises:
        ConfigError: Bad batch size, rank, world size or seed.

    Example:
        >>> loader = TokenLoader(train_blocks, 32, seed=0, rank=r, world_size=w)
        >>> loader.set_epoch(epoch)
        >>> for batch in loader.iter_from(resume_step): ...  # batch.x, batch.y: (b, L) int64
    """

    def __init__(
        self,
        blocks: TokenBlocks,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(blocks, TokenBlocks):
            raise ConfigError(f"TokenLoader reads TokenBlocks (got {type(blocks).__name__})")
        check_loader_args(batch_size, rank, world_size, seed)
        self.data = blocks
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.epoch = 0

    @property
    def tokens_per_batch(self) -> int:
        """Positions per GLOBAL batch, ``batch_size * L`` (padding and prompt positions included)."""
        return self.batch_size * self.data.block_len

    def variant(self, **changes: Any) -> TokenLoader:
        """A loader over the same blocks with some arguments changed (e.g. ``shuffle=False``)."""
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
            "device": self.device,
        }
        kwargs.update(changes)
        return TokenLoader(self.data, kwargs.pop("batch_size"), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0 (got {epoch})")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """The row order of the current epoch, ``(N,)`` int64 (identical on all ranks)."""
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=make_generator(self.seed, self.epoch, PERMUTATION_STREAM))

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """Yield this epoch's batches from batch ``start_batch`` on; they equal the batches an
        uninterrupted ``iter(self)`` yields at the same positions.

        Args:
            start_batch: Index of the first batch, ``0 <= start_batch <= len(self)``.
        """
        if not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch must be in [0, {len(self)}] (got {start_batch})")
        return self._batches(self.epoch_order(), start_batch, len(self))

    def _batches(self, order: torch.Tensor, start: int, stop: int) -> Iterator[Batch]:
        x_all, y_all = self.data.x, self.data.y
        for k in range(start, stop):
            global_idx = order[k * self.batch_size : (k + 1) * self.batch_size]  # (B,)
            lo, hi = rank_bounds(global_idx.numel(), self.rank, self.world_size)
            idx = global_idx[lo:hi]  # (b,)
            x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)  # (b, L) each
            if self.device != x.device:
                x, y, dev_idx = (to_device(t, self.device) for t in (x, y, idx))
            else:
                dev_idx = idx
            yield Batch(x, y, dev_idx, labeled=False, host_idx=idx)

    def __repr__(self) -> str:
        return (
            f"TokenLoader(rows={len(self.data)}, block_len={self.data.block_len}, batch_size={self.batch_size}, "
            f"batches={len(self)}, rank={self.rank}/{self.world_size}, epoch={self.epoch})"
        )
