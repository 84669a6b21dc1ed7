"""A frozen causal LM as a teacher: live (hidden states + head, never ``(B, L, V)`` at once) or cached.

* **live**: the teacher's decoder runs on the step's token block under ``no_grad`` and gives
  :class:`~darkknowledge.lm.targets.LazyLogits`; token losses apply its head a chunk at a time.
  Under ``torchrun`` the teacher may be sharded with FSDP2 (``engine.fsdp.shard_frozen``): every
  rank runs its forward in lockstep, as the loader gives every rank the same number of steps.
* **cached**: the teacher ran once over the training blocks
  (:mod:`darkknowledge.teachers.token_cache`); a step reads the rows of its blocks by index:
  sparse targets (top-k with a tail bucket, or sampled ids with counts) or dense log-probabilities
  ``(b, L, V)``. Training from a cache never runs the teacher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.engine.checkpoint import state_hash
from darkknowledge.engine.fsdp import is_sharded
from darkknowledge.errors import ConfigError
from darkknowledge.lm.models import channels_first, lazy_logits
from darkknowledge.lm.targets import SparseTargets
from darkknowledge.losses.base import Outputs
from darkknowledge.taps import FeatureTaps
from darkknowledge.teachers.base import Teacher, Views


class LMTeacher(Teacher):
    """A causal LM teacher, live or read from a token cache.

    Args:
        model: The teacher model (live; also used for its fingerprint), or None with a cache.
        cache: A built :class:`~darkknowledge.teachers.token_cache.TokenCache`, or None (live).
        name: How messages call it.
        fingerprint: The teacher's weights hash when ``model`` is None (the cache's teacher).
    """

    standalone = True
    without_features = "a cached LM teacher gives its token distribution only; use token losses (fkl, rkl, jsd...)"

    def __init__(
        self, model: nn.Module | None = None, cache: Any = None, name: str = "teacher", fingerprint: str | None = None
    ) -> None:
        super().__init__()
        if model is None and cache is None:
            raise ConfigError("an LM teacher needs a model (live) or a token cache")
        self.name = name
        self.cache = cache
        self.model = model if cache is None else None  # taps only on a live teacher
        self.runner = model
        if model is not None:
            model.eval()
            model.requires_grad_(False)
        self._hash = fingerprint or (state_hash(model) if model is not None else None)
        self._taps: FeatureTaps | None = None
        self.device: torch.device | None = None

    @property
    def kind(self) -> str:
        return f"the {'cached' if self.cache is not None else 'live'} LM teacher {self.name!r}"

    def request(self, logits: bool, taps: tuple[str, ...]) -> None:
        super().request(logits, taps)
        if taps and self.model is not None:
            self._taps = FeatureTaps(self.model, list(self.taps), detach=True, owner=self.kind)
            self._taps.active = False

    def __call__(self, batch: Batch, views: Views | None = None) -> Outputs:
        """The teacher's per-token distribution over ``batch.x`` ``(b, L)`` (and requested taps)."""
        if self.cache is not None:
            idx = batch.host_idx if batch.host_idx is not None else batch.idx.cpu()
            targets = self.cache.targets(idx, batch.x.device)
            if isinstance(targets, SparseTargets):
                return Outputs(logits=None, tokens=targets)
            return Outputs(logits=targets)  # (b, L, V) dense log-probabilities
        assert self.runner is not None
        if self.runner.training:
            self.runner.eval()
        if is_sharded(self.runner):  # an FSDP2 unit: run whole (its head's weight is sharded outside forward)
            with torch.no_grad():
                return Outputs(logits=self.runner(input_ids=batch.x).logits)  # (b, L, V)
        with torch.no_grad():  # not inference_mode: the loss saves the teacher's chunk logits for backward
            if self._taps is not None:
                self._taps.active = True
            try:
                lazy = lazy_logits(self.runner, batch.x)  # hidden (b, L, d)
            finally:
                if self._taps is not None:
                    self._taps.active = False
            feats = channels_first(self._taps.pop(), int(batch.x.shape[1])) if self._taps is not None else {}
        return Outputs(logits=None, features=feats, tokens=lazy)  # features (b, d, L) each

    def to(self, device: torch.device) -> LMTeacher:
        self.device = device
        if self.runner is not None and not is_sharded(self.runner):
            self.runner.to(device)
        return self

    def fingerprint(self) -> str | None:
        return self._hash

    def describe(self) -> dict[str, Any]:
        return {"cache": self.cache.describe()} if self.cache is not None else {}
