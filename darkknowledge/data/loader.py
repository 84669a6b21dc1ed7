"""A deterministic, resumable, DDP-aware batch loader.

Each epoch's order is a permutation drawn from a generator seeded by ``(seed, epoch)`` alone,
so it never depends on what ran before (resuming is exact). The permutation is cut into
*global* batches of ``batch_size``; rank ``r`` of ``world_size`` takes the contiguous slice
``[r * b / W, (r + 1) * b / W)`` of each, so the ranks' slices concatenated are exactly the
single-process batch. Augmentation is drawn once per global batch from a generator seeded by
``(seed, epoch, batch_index)`` and sliced the same way. Mixing (mixup, cutmix) draws each
sample's partner as a dataset index: every rank fetches its own samples' partners from the data,
and a mixed sample's label becomes ``UNLABELED`` (see :mod:`darkknowledge.data.mixing`).

A last partial batch of ``m`` samples (``drop_last=False``) is split as evenly as possible:
the first ``m % W`` ranks get one sample more. With fewer samples than ranks (``m < W``) the
last ranks get an *empty* batch (``len(batch) == 0``) rather than none, so that every rank
runs the same number of steps and DDP collectives stay matched; the training step has to
tolerate a zero-size batch (e.g. contribute a zero loss) or use ``drop_last=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from darkknowledge.config import DataConfig
from darkknowledge.data.augment import Augment, AugmentParams, params_to, slice_params
from darkknowledge.data.batch import UNLABELED, Batch, to_device
from darkknowledge.data.mixing import mixed_samples
from darkknowledge.data.seeds import AUGMENT_STREAM, PERMUTATION_STREAM, make_generator
from darkknowledge.data.sharding import check_loader_args, rank_bounds
from darkknowledge.data.tensors import TensorData
from darkknowledge.errors import ConfigError

if TYPE_CHECKING:
    from darkknowledge.data.view_plan import ViewPlan

logger = logging.getLogger(__name__)

DEVICE_DATA_MB: float = DataConfig.model_fields["device_data_mb"].default
"""Default ``device_data_mb`` (``data.device_data_mb``): tensor datasets up to 2 GiB live on the
GPU (CIFAR-100 as uint8 takes 150 MiB)."""

Replay = Callable[[torch.Tensor, int], tuple[AugmentParams, torch.Tensor]]
"""``replay(idx (b,), epoch) -> (augment params of those b samples, view id (b,))``: the views a
teacher-output cache holds, so the student sees exactly the view the teacher saw."""

_Plan = list[tuple[int, torch.Tensor, tuple[int, int]]]
"""Per batch: (batch index, global batch indices (b,), this rank's [start, stop) rows)."""


class BatchLoader:
    """Iterate a dataset in reproducible global batches, this rank's slice of each.

    Args:
        data: A ``TensorData`` (fast path: tensors indexed per batch) or any map-style
            dataset whose items are ``(x, y)`` (read through a ``DataLoader``).
        batch_size: The GLOBAL batch size (over all ranks); divisible by ``world_size``.
        shuffle: New permutation each epoch (else dataset order).
        seed: Base seed of permutations and augmentation draws (non-negative).
        drop_last: Drop the last partial global batch.
        rank: This process's rank.
        world_size: Number of processes.
        augment: Augmentation (an ``Augment`` or a mapping of its fields); pass it for
            training loaders only.
        normalize: ``(mean, std)`` per channel (or one value each) applied after ``uint8``
            inputs are scaled to ``[0, 1]``; float inputs are normalised only when given.
        device: Where batches are delivered; from CPU to CUDA the copy uses pinned memory
            and ``non_blocking``.
        device_data_mb: A ``TensorData`` of at most this many MiB is copied to an
            accelerator ``device`` once and indexed there (kept for every loader over the
            same data): no per-batch host indexing, pinning or copy. 0 keeps it on the host.
        num_workers: Worker processes for the generic-dataset path (ignored for ``TensorData``).
        views: The view plan of a paired dataset (``DatasetInfo.views``), or None.
        inputs: The views each batch carries in ``Batch.inputs`` (the run's models' views).
        primary: The view delivered as ``Batch.x`` (the trained model's); None: the stored input.

    Raises:
        ConfigError: Bad batch size, rank or world size, or seed.

    Example:
        >>> loader = BatchLoader(bundle.train, 256, seed=1, rank=r, world_size=w)
        >>> loader.set_epoch(epoch)
        >>> for batch in loader.iter_from(resume_step): ...
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        augment: Augment | Mapping[str, Any] | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        device_data_mb: float = DEVICE_DATA_MB,
        views: ViewPlan | None = None,
        inputs: Sequence[str] = (),
        primary: str | None = None,
    ) -> None:
        check_loader_args(batch_size, rank, world_size, seed)
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        aug = Augment.from_config(augment)
        self.augment = aug if aug is not None and aug.enabled else None
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.device_data_mb = device_data_mb
        self.epoch = 0
        self._num_samples = len(data)  # type: ignore[arg-type]  # a map-style dataset has a length
        self._norm = self._norm_tensors(normalize)
        self._normalize_arg = normalize
        self.views, self.inputs, self.primary = views, tuple(dict.fromkeys(inputs)), primary
        self._stored_views = self._check_views()
        self._check_token_ids()
        self.replay: Replay | None = None
        self.channels_last = False
        """Deliver 4-D inputs in the ``channels_last`` memory format."""
        """When set, augmentation replays given views instead of drawing new ones (see ``Replay``)."""

    def variant(self, **changes: Any) -> BatchLoader:
        """A loader over the same data and preprocessing with some arguments changed
        (e.g. ``shuffle=False, augment=None, rank=0, world_size=1``)."""
        kwargs: dict[str, Any]
        kwargs = dict(
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=self.drop_last,
            rank=self.rank,
            world_size=self.world_size,
            augment=self.augment,
            normalize=self._normalize_arg,
            device=self.device,
            num_workers=self.num_workers,
            device_data_mb=self.device_data_mb,
            views=self.views,
            inputs=self.inputs,
            primary=self.primary,
        )
        kwargs.update(changes)
        return BatchLoader(self.data, **kwargs)

    def _check_token_ids(self) -> None:
        """int64 inputs are token ids: delivered as they are, so they cannot be augmented or normalised."""
        if not (isinstance(self.data, TensorData) and self.data.x.dtype == torch.int64):
            return
        if self.augment is not None or self._norm is not None:
            what = "augmented (data.augment)" if self.augment is not None else "normalised"
            raise ConfigError(
                f"loader: the inputs are int64 token ids {tuple(self.data.x.shape[1:])}, which cannot "
                f"be {what}; turn it off, or store float inputs"
            )

    def _check_views(self) -> list[str]:
        """The stored views the batches need; a clear error for a view the data cannot give."""
        wanted = set(self.inputs) | ({self.primary} if self.primary else set())
        if not wanted:
            return []
        if self.views is None:
            raise ConfigError(f"loader: input views {sorted(wanted)} asked of data without views")
        for name in sorted(wanted):
            self.views.check(name, "loader input")
        if self.primary is not None and self.primary not in self.inputs:
            self.inputs = (*self.inputs, self.primary)
        stored, _ = self.views.needs(self.inputs)
        if stored and self.augment is not None and self.augment.mixes:
            raise ConfigError(
                f"data.augment: mixup/cutmix would mix the input but not the stored view(s) {stored} that "
                f"view(s) {sorted(wanted)} read; switch mixing off for paired data"
            )
        have = set(self.data.views) if isinstance(self.data, TensorData) else set()
        missing = [n for n in stored if n not in have]
        if missing:
            raise ConfigError(
                f"loader: the data lacks the stored view {missing[0]!r} that view(s) {sorted(wanted)} "
                f"need (it holds {sorted(have) or 'none'})"
            )
        return stored

    @staticmethod
    def _norm_tensors(
        normalize: tuple[Sequence[float], Sequence[float]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if normalize is None:
            return None
        mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in normalize)
        if mean.shape != std.shape or mean.numel() == 0:
            raise ConfigError(f"normalize needs mean and std of the same non-zero length (got {normalize!r})")
        if bool((std <= 0).any()):
            raise ConfigError(f"normalize std must be > 0 (got {std.tolist()})")
        return mean, std

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next iteration uses."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0 (got {epoch})")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        if self.drop_last:
            return self._num_samples // self.batch_size
        return -(-self._num_samples // self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """The sample order of the current epoch, ``(N,)`` int64 (identical on all ranks)."""
        if not self.shuffle:
            return torch.arange(self._num_samples)
        gen = make_generator(self.seed, self.epoch, PERMUTATION_STREAM)
        return torch.randperm(self._num_samples, generator=gen)

    def global_batch(self, order: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of global batch ``k`` of ``order`` (all ranks' samples)."""
        return order[k * self.batch_size : (k + 1) * self.batch_size]

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """Yield this epoch's batches from batch ``start_batch`` on.

        The batches equal those an uninterrupted ``iter(self)`` yields at the same positions
        (same samples, same augmentation), which makes mid-epoch resume exact.

        Args:
            start_batch: Index of the first batch to yield, ``0 <= start_batch <= len(self)``.
        """
        if not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch must be in [0, {len(self)}] (got {start_batch})")
        order = self.epoch_order()
        plan: _Plan = []
        for k in range(start_batch, len(self)):
            global_idx = self.global_batch(order, k)
            plan.append((k, global_idx, rank_bounds(global_idx.numel(), self.rank, self.world_size)))
        if isinstance(self.data, TensorData):
            return self._iter_tensors(self.epoch, plan)
        return self._iter_dataset(self.epoch, plan)

    def augment_params(self, batch_index: int, epoch: int | None = None) -> AugmentParams | None:
        """The augmentation drawn for the whole GLOBAL batch ``batch_index`` (CPU tensors).

        Rows follow the global batch order; ``rank_bounds(n, rank, world_size)`` gives this
        rank's rows. A teacher-output cache can use this to replay the exact views.

        Args:
            batch_index: Index of the global batch within the epoch.
            epoch: Epoch (default: the current one, see ``set_epoch``).

        Returns:
            The drawn parameters, or None without augmentation.
        """
        if self.augment is None:
            return None
        epoch = self.epoch if epoch is None else epoch
        size = min(self.batch_size, self._num_samples - batch_index * self.batch_size)
        gen = make_generator(self.seed, epoch, batch_index, AUGMENT_STREAM)
        return self.augment.draw(size, gen, self._sample_shape(), population=self._num_samples)

    def _sample_shape(self) -> tuple[int, ...]:
        if isinstance(self.data, TensorData):
            return self.data.sample_shape
        return tuple(torch.as_tensor(self.data[0][0]).shape)

    def data_on_device(self) -> bool:
        """Whether the ``TensorData`` is (or will be) indexed on the accelerator ``device``."""
        data = self.data
        if not isinstance(data, TensorData) or self.device.type == "cpu":
            return False
        return data.x.device == self.device or data.nbytes <= self.device_data_mb * 2**20

    def _iter_tensors(self, epoch: int, plan: _Plan) -> Iterator[Batch]:
        data = self.data
        assert isinstance(data, TensorData)
        if self.data_on_device():
            (x_all, y_all), home = data.on(self.device), self.device
        else:
            x_all, y_all, home = data.x, data.y, data.x.device
        shares = [global_idx[lo:hi] if self.world_size > 1 else global_idx for _, global_idx, (lo, hi) in plan]
        sources = shares
        if home.type != "cpu" and shares:  # the epoch's indices in one copy, not one blocking copy per batch
            sources = list(to_device(torch.cat(shares), home).split([len(t) for t in shares]))  # (b,) each
        views_all = data.views_on(self.device) if self.data_on_device() else data.views
        for (k, _, (lo, hi)), local, source in zip(plan, shares, sources):
            x, y = (
                x_all.index_select(0, source),
                y_all.index_select(0, source),
            )  # a few times cheaper than x_all[source]
            stored = {n: views_all[n].index_select(0, source) for n in self._stored_views}  # (b, *view shape) each
            yield self._finish(epoch, k, lo, hi, x, y, source, data.all_labeled, host_idx=local, stored=stored)

    def _iter_dataset(self, epoch: int, plan: _Plan) -> Iterator[Batch]:
        nonempty = [global_idx[lo:hi].tolist() for _, global_idx, (lo, hi) in plan if hi > lo]
        loader = DataLoader(
            self.data,
            batch_sampler=nonempty,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        fetched = iter(loader)
        for k, global_idx, (lo, hi) in plan:
            local = global_idx[lo:hi]
            if hi > lo:
                x, y = next(fetched)
            else:
                x0, _ = self.data[0]
                x = torch.as_tensor(x0)[None][:0]  # (0, *shape): an empty share
                y = torch.zeros(0, dtype=torch.int64)
            y = torch.as_tensor(y).to(torch.int64)  # on the CPU here: checking the labels costs no device sync
            yield self._finish(epoch, k, lo, hi, torch.as_tensor(x), y, local, bool((y != UNLABELED).all()))

    def _finish(
        self,
        epoch: int,
        k: int,
        lo: int,
        hi: int,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        labeled: bool,
        host_idx: torch.Tensor | None = None,
        stored: dict[str, torch.Tensor] | None = None,
    ) -> Batch:
        """Move a raw batch to the device, scale, augment and normalise it (``host_idx``: the
        same indices as ``idx`` on the CPU, when ``idx`` is already on the device)."""
        idx_cpu = idx if host_idx is None else host_idx
        device = self.device
        if device.type == "cuda":
            x, y, idx = (to_device(t, device) for t in (x, y, idx))
        elif x.device != device or idx.device != device:
            x, y, idx = x.to(device), y.to(device), idx.to(device)
        x = _as_float(x)
        view = host_view = params = None
        if self.replay is not None:
            params, host_view = self.replay(idx_cpu.cpu(), epoch)  # CPU indices: no device sync
            view = to_device(host_view, x.device)
        elif self.augment is not None:
            drawn = self.augment_params(k, epoch)
            assert drawn is not None
            params = slice_params(drawn, lo, hi)
        if self.augment is not None and params:
            x, y, labeled = self._augment(x, y, idx_cpu.cpu(), labeled, params)
        if self._norm is not None:
            x = self._normalize(x)
        inputs = None
        if self.views is not None and self.inputs:
            stored = {n: to_device(v, device).float() for n, v in (stored or {}).items()}
            inputs = self.views.compute(x, stored, self.inputs)  # {view: (b, *view shape)}
            x = inputs[self.primary] if self.primary is not None else x
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        host_idx = idx_cpu if idx_cpu.device.type == "cpu" else None
        return Batch(x, y, idx, view, labeled, host_idx=host_idx, host_view=host_view, inputs=inputs)

    def _augment(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, labeled: bool, params: AugmentParams
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Apply this batch's drawn (or replayed) ``params``; a mixed sample (its partner, by
        dataset index, fetched here) loses its label. ``idx``: the samples' indices on the CPU."""
        assert self.augment is not None
        partner = None
        if "mix_partner" in params:
            index = params["mix_partner"]  # (b,) dataset indices, on the CPU
            partner = self._partners(index) if index.numel() else x
            mixed = mixed_samples(params) & (index != idx)  # (b,): mixing a sample with itself changes nothing
            if bool(mixed.any()):
                y = y.masked_fill(to_device(mixed, y.device), UNLABELED)
                labeled = False
        x = self.augment.apply(x, params_to(params, x.device, non_blocking=True), partner)
        return x, y, labeled

    def _partners(self, index: torch.Tensor) -> torch.Tensor:
        """The inputs of dataset samples ``index`` ``(b,)`` on the device, scaled like a batch."""
        data = self.data
        if isinstance(data, TensorData):
            x_all = data.on(self.device)[0] if self.data_on_device() else data.x
            rows = x_all.index_select(0, to_device(index, x_all.device))  # (b, *shape)
        else:
            rows = torch.stack([torch.as_tensor(data[i][0]) for i in index.tolist()])  # (b, *shape)
        return _as_float(to_device(rows, self.device))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        assert self._norm is not None
        mean, std = (t.to(x.device, x.dtype) for t in self._norm)
        if mean.numel() > 1:
            if x.ndim < 2 or x.shape[1] != mean.numel():
                raise ConfigError(f"normalize has {mean.numel()} channels but inputs have shape {tuple(x.shape[1:])}")
            shape = (1, mean.numel()) + (1,) * (x.ndim - 2)
            mean, std = mean.view(shape), std.view(shape)  # (1, C, 1, ...)
        return (x - mean) / std

    def __repr__(self) -> str:
        return (
            f"BatchLoader(n={self._num_samples}, batch_size={self.batch_size}, batches={len(self)}, "
            f"rank={self.rank}/{self.world_size}, epoch={self.epoch}, augment={self.augment})"
        )


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` images scaled to ``[0, 1]``, other integer inputs as float; int64 token ids kept."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0  # (b, C, H, W) in [0, 1]
    if not x.is_floating_point() and x.dtype != torch.int64:
        return x.float()
    return x
