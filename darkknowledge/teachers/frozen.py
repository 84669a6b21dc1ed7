"""A frozen, pre-trained teacher: ``eval()``, no gradients, run under ``torch.inference_mode()``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from darkknowledge.data.batch import Batch, input_name, model_input
from darkknowledge.engine.checkpoint import state_hash
from darkknowledge.losses.base import Outputs, run_model
from darkknowledge.taps import FeatureTaps, unwrap, validate_taps
from darkknowledge.teachers.base import Teacher, Views
from darkknowledge.teachers.cache import CacheSpec, TeacherOutputCache, cached_views, load_or_build
from darkknowledge.teachers.lookahead import TeacherAhead, live_batches

if TYPE_CHECKING:
    from darkknowledge.config import CacheConfig


class FrozenTeacher:
    """Wraps a trained model so it can only teach.

    The model is put in ``eval()`` mode, its parameters get ``requires_grad=False``, and
    every forward runs under ``torch.inference_mode()``. It is deliberately *not* an
    ``nn.Module`` attribute of the trainable module, so the optimizer, DDP and the student's
    checkpoint never see it. Only the taps the losses need are hooked.

    Args:
        model: The trained teacher.
        taps: Module paths whose features the losses read.
        need_logits: Whether any loss reads the teacher's logits.
    """

    def __init__(self, model: nn.Module, taps: tuple[str, ...] = (), need_logits: bool = True) -> None:
        self.model = unwrap(model)
        self.model.eval()
        self.model.requires_grad_(False)
        self.need_logits = need_logits
        self.taps = FeatureTaps(self.model, list(taps), detach=True, owner="the teacher") if taps else None
        if self.taps is not None:
            self.taps.active = False  # record only inside __call__: other uses of the model stay untouched
        self.hash = state_hash(self.model)
        self.input = input_name(self.model)
        """The data view it reads on a paired dataset (None: ``batch.x``)."""

    def to(self, device: torch.device) -> FrozenTeacher:
        self.model.to(device)
        return self

    def __call__(self, x: Any) -> Outputs:
        """Teacher outputs for inputs ``x`` ``(B, ...)`` (or a mapping of keyword inputs): logits ``(B, K)``
        and tapped features.

        Tensors made under inference mode cannot be saved for backward; the outputs are
        cloned once outside it so losses may use them freely (a copy of logits and the
        tapped features only).
        """
        if self.model.training:  # someone called .train() on it: a teacher stays in eval
            self.model.eval()
        with torch.inference_mode():
            if self.taps is not None:
                self.taps.active = True
            try:
                logits = run_model(self.model, x)  # (B, K)
            finally:
                if self.taps is not None:
                    self.taps.active = False
            feats = self.taps.pop() if self.taps is not None else {}
        return Outputs(
            logits=logits.clone() if self.need_logits else None,
            features={k: v.clone() for k, v in feats.items()},
        )


class Frozen(Teacher):
    """A frozen, pre-trained model as a teacher: live, run ahead on several batches, or cached.

    Which of the three is decided here once, for every frozen teacher of every scheme:

    * **cached** (``cache.enabled``): its outputs (exactly the logits and taps requested) are
      computed once per teacher and data (:mod:`darkknowledge.teachers.cache`), then read by
      sample index; with augmentation the loader replays the cached views.
    * **run ahead** (no cache, ``cache.live_batches`` > 1, by default on CPU): the model runs on
      several upcoming batches at once (:mod:`darkknowledge.teachers.lookahead`).
    * **live**: one forward per step, under ``inference_mode`` in ``eval()``.

    Args:
        model: The trained teacher (its weights never change here).
        name: Its config path (``teacher``, ``teachers.1``) or role (``gen1``), for messages.
        cache: The recipe's ``cache:`` settings (None: live, with the default look-ahead).
    """

    standalone = True
    model: nn.Module  # always a model

    def __init__(self, model: nn.Module, name: str = "teacher", cache: CacheConfig | None = None) -> None:
        super().__init__()
        self.model = unwrap(model)
        self.name = name
        self.cache_cfg = cache if cache is not None and cache.enabled else None
        self.live_batches = cache.live_batches if cache is not None else None
        self.lookahead = True
        """Whether it may run ahead (off when only some steps use this teacher)."""
        self.cache: TeacherOutputCache | None = None
        self.ahead: TeacherAhead | None = None
        self._runner: FrozenTeacher | None = None
        self._hash: str | None = None
        self._last: tuple[Batch | None, Outputs | None] = (None, None)

    @property
    def kind(self) -> str:
        return f"the frozen teacher {self.name!r}"

    def request(self, logits: bool, taps: tuple[str, ...]) -> None:
        super().request(logits, taps)
        self._runner = None  # rebuilt with the new taps on first use

    @property
    def runner(self) -> FrozenTeacher:
        """The model wrapped to only teach (``eval()``, no gradients, only the requested hooks)."""
        if self._runner is None:
            self._runner = FrozenTeacher(self.model, self.taps, need_logits=self.need_logits)
        return self._runner

    def attach(self, loader: Any, dist: Any = None) -> None:
        """Load or build the output cache for this loader's data (when enabled). With
        augmentation the cache holds ``cache.views`` views per sample and the loader replays
        them; with ``cache.views: 0`` the teacher runs live instead."""
        cfg = self.cache_cfg
        if cfg is None or self.cache is not None:
            return
        augment = getattr(loader, "augment", None)
        spec = self.cache_spec(augment)
        if spec is None:
            return
        builder = self.runner
        if spec.taps != self.taps or spec.logits != self.need_logits:
            builder = FrozenTeacher(self.model, spec.taps, need_logits=spec.logits)
        self.cache = load_or_build(
            builder, loader, spec, augment=augment, seed=cfg.seed, memory_limit_mb=cfg.memory_limit_mb, dist=dist
        ).to(loader.device)
        if augment is not None:
            loader.replay = self.cache.replay(loader.seed)

    def cache_spec(self, augment: Any = None) -> CacheSpec | None:
        """What the output cache will hold for data with ``augment`` (None: no cache, the teacher
        runs live); checks it holds what the losses read and that its taps exist on the model."""
        cfg = self.cache_cfg
        if cfg is None:
            return None
        views = cached_views(cfg.views, augment)
        if views is None:
            return None
        spec = CacheSpec(
            logits=self.need_logits if cfg.logits is None else cfg.logits,
            taps=self.taps if cfg.taps is None else tuple(cfg.taps),
            dtype=cfg.dtype,
            topk=cfg.topk,
            views=views,
        )
        spec.check_holds(self.need_logits, self.taps)
        if spec.taps != self.taps:
            validate_taps(self.model, spec.taps, self.kind)
        return spec

    def dry_attach(self, loader: Any) -> None:
        """Check that the output cache would hold what the losses read, and build nothing: for the
        rest of its (dry) life this teacher runs live, one batch at a time."""
        self.cache_spec(getattr(loader, "augment", None))
        self.cache_cfg, self.lookahead = None, False

    def setup(self, batch: Batch) -> None:
        """A live teacher runs on ``cache.live_batches`` upcoming batches at once."""
        n = live_batches(self.live_batches, batch) if self.cache is None and self.lookahead else 1
        self.ahead = TeacherAhead(self.runner, n) if n > 1 else None

    def wrap(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        return self.ahead.wrap(stream) if self.ahead is not None else stream

    def __call__(self, batch: Batch, views: Views | None = None) -> Outputs:
        last_batch, last = self._last
        if batch is last_batch and last is not None:  # several objectives read this teacher in one step
            return last
        if self.cache is not None:
            out = self.cache.lookup(batch)
        else:
            ahead = self.ahead.take(batch) if self.ahead is not None else None
            out = ahead if ahead is not None else self.runner(model_input(batch, self.runner))
        self._last = (batch, out)
        return out

    def to(self, device: torch.device) -> Frozen:
        self.model.to(device)
        self._last = (None, None)
        return self

    def channels_last(self) -> None:
        self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from the stubs

    def compile(self) -> None:
        if self.cache is None:  # a cached teacher does not run
            self.model.compile()

    def fingerprint(self) -> str:
        if self._hash is None:
            self._hash = self.runner.hash
        return self._hash

    def describe(self) -> dict[str, Any]:
        return {"cache": self.cache.describe()} if self.cache is not None else {}
