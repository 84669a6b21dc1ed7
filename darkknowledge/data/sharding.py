"""How a global batch is shared among DDP ranks, and the checks of a loader's arguments.

Every loader (classification, language-model token blocks, synthetic latents) cuts its data into
*global* batches and gives rank ``r`` of ``W`` a contiguous share of each, so the ranks' shares
concatenated are exactly the single-process batch.
"""

from __future__ import annotations

from darkknowledge.errors import ConfigError


def rank_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s share of a batch of ``size`` samples.

    Shares are contiguous and as even as possible; the first ``size % world_size`` ranks
    get one extra sample. For ``size`` divisible by ``world_size`` this is
    ``[rank * size / W, (rank + 1) * size / W)``.
    """
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_loader_args(batch_size: int, rank: int, world_size: int, seed: int) -> None:
    """A loader's global batch, rank, world size and seed, or one clear ``ConfigError``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size (got rank={rank}, world_size={world_size})")
    if batch_size % world_size:
        raise ConfigError(
            f"batch_size {batch_size} is the global batch and must be divisible by world_size "
            f"{world_size}; use e.g. {batch_size - batch_size % world_size or world_size}"
        )
    if seed < 0:
        raise ConfigError(f"loader seed must be >= 0 (got {seed})")
