"""Offline distillation: a frozen, pre-trained teacher teaches a student.

Hinton et al. 2015 and the survey's "offline" scheme (Gou et al., IJCV 2021, Sec. 4.1): the
teacher is trained first, then frozen; knowledge flows one way. With no teacher and a
``ce``-only objective the same scheme trains a model alone (the baseline).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ShapeError
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.objective import Objective
from darkknowledge.models import count_params
from darkknowledge.schemes.base import SCHEMES, Scheme
from darkknowledge.taps import FeatureTaps, unwrap, validate_taps
from darkknowledge.teachers.cache import CacheSpec, TeacherOutputCache, cached_views, load_or_build
from darkknowledge.teachers.frozen import FrozenTeacher
from darkknowledge.teachers.lookahead import TeacherAhead, live_batches

if TYPE_CHECKING:
    from darkknowledge.config import CacheConfig
    from darkknowledge.schemes.context import SchemeContext

log = logging.getLogger(__name__)


def tapped_outputs(model: nn.Module, taps: FeatureTaps | None, x: torch.Tensor) -> Outputs:
    """``model(x)`` as :class:`Outputs`, with the features of ``taps`` recorded during this call
    only (taps stay inactive otherwise, so evaluating the model records nothing)."""
    if taps is None:
        return Outputs(logits=model(x))  # (B, K)
    taps.active = True
    try:
        logits = model(x)  # (B, K)
    finally:
        taps.active = False
    return Outputs(logits=logits, features=taps.pop())


def setup_objective(module: nn.Module, teacher: Outputs | None, batch: Batch, info: SetupInfo | None) -> None:
    """The dry run of a module with ``student_outputs`` and ``objective``: student outputs on
    one batch (eval mode, no grad) -> the objective builds its adapters and checks shapes."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        student = module.student_outputs(batch.x)
    info = replace(info or SetupInfo(num_samples=len(batch), batch_size=len(batch)),
                   num_classes=int(student.logits.shape[-1]))
    module.objective.setup(student, teacher, info)
    module.objective.to(batch.x.device)
    module.train(was_training)


class StudentObjective(nn.Module):
    """The trainable module of offline KD: the student plus the objective (and its adapters).

    ``forward`` runs the student, collects only the taps the losses need, and evaluates the
    objective, so that under DDP every trainable parameter is used inside the wrapped call.
    """

    def __init__(self, student: nn.Module, objective: Objective, taps: tuple[str, ...]) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.taps = FeatureTaps(student, list(taps)) if taps else None
        if self.taps is not None:
            self.taps.active = False  # record only inside student_outputs, not when evaluating the student

    def student_outputs(self, x: torch.Tensor) -> Outputs:
        return tapped_outputs(self.student, self.taps, x)

    def forward(
        self, batch: Batch, teacher: Outputs | None, epoch_progress: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective(self.student_outputs(batch.x), teacher, batch, epoch_progress)


@SCHEMES.register("offline")
class Offline(Scheme):
    """Frozen teacher -> student with any objective of registered losses.

    Args:
        student: The model to train.
        objective: The weighted loss terms.
        teacher: A trained model, or None when the objective needs no teacher.
        cache: Teacher-output cache settings; when enabled the teacher's outputs are
            computed once (``darkknowledge.teachers.cache``) and the teacher is skipped
            during training.
    """

    registry_name = "offline"
    default_transfer = True
    citation = "Hinton et al. 2015; Gou et al., Knowledge Distillation: A Survey, IJCV 2021 (offline distillation)."
    summary = "a frozen, pre-trained teacher teaches the student (one way)"

    @classmethod
    def build(cls, ctx: SchemeContext, seed: int) -> Offline:
        """The recipe's student (seed's init), objective and pre-trained teacher."""
        teacher = ctx.teacher() if ctx.cfg.teacher is not None else None
        return cls(ctx.student(seed), ctx.objective(), teacher, cache=ctx.cfg.cache)

    @classmethod
    def run(cls, ctx: SchemeContext, seed: int) -> list[dict[str, Any]]:
        """One stage; the student also sees the unlabeled transfer set (teacher labels only)
        unless ``scheme.params.transfer`` is false."""
        scheme = cls.build(ctx, seed)
        label = "+".join(ctx.cfg.losses)
        return ctx.train(ctx.stage_name(seed), scheme, seed, with_transfer=ctx.uses_transfer(cls), label=label)

    def __init__(self, student: nn.Module, objective: Objective, teacher: nn.Module | None = None,
                 cache: CacheConfig | None = None) -> None:
        needs = objective.bind(student, teacher)
        if needs.teacher and teacher is None:
            raise ShapeError(f"losses {list(objective.terms)} need a teacher, but none was given")
        validate_taps(student, needs.student_taps)
        self.needs = needs
        self.teacher = None
        if needs.teacher and teacher is not None:
            validate_taps(teacher, needs.teacher_taps)
            self.teacher = FrozenTeacher(teacher, needs.teacher_taps, need_logits=needs.teacher_logits)
        self._module = StudentObjective(unwrap(student), objective, needs.student_taps)
        self.cache_cfg = cache if cache is not None and cache.enabled and self.teacher is not None else None
        self.cache: TeacherOutputCache | None = None
        self.live_batches = cache.live_batches if cache is not None else None
        self.ahead: TeacherAhead | None = None

    @property
    def module(self) -> nn.Module:
        return self._module

    def to(self, device: torch.device) -> Offline:
        self._module.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def attach(self, loader: Any, dist: Any = None) -> None:
        """Load or build the teacher-output cache for this loader's data (when enabled).

        With augmentation the cache holds ``cache.views`` views per sample and the loader
        replays them; with ``cache.views: 0`` the teacher runs live instead.
        """
        if self.teacher is not None and self.cache_cfg is not None:
            self._attach_cache(self.cache_cfg, loader, dist)

    def _attach_cache(self, cfg: CacheConfig, loader: Any, dist: Any) -> None:
        assert self.teacher is not None
        augment = getattr(loader, "augment", None)
        views = cached_views(cfg.views, augment)
        if views is None:
            return
        needs = self.needs
        spec = CacheSpec(logits=needs.teacher_logits if cfg.logits is None else cfg.logits,
                         taps=needs.teacher_taps if cfg.taps is None else tuple(cfg.taps),
                         dtype=cfg.dtype, topk=cfg.topk, views=views)
        spec.check_holds(needs.teacher_logits, needs.teacher_taps)
        builder = self.teacher
        if spec.taps != needs.teacher_taps or spec.logits != needs.teacher_logits:
            validate_taps(self.teacher.model, spec.taps)
            builder = FrozenTeacher(self.teacher.model, spec.taps, need_logits=spec.logits)
        self.cache = load_or_build(builder, loader, spec, augment=augment, seed=cfg.seed,
                                   memory_limit_mb=cfg.memory_limit_mb, dist=dist).to(loader.device)
        if augment is not None:
            loader.replay = self.cache.replay(loader.seed)

    def batches(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        """With a live teacher, run it on ``cache.live_batches`` upcoming batches at once."""
        return self.ahead.wrap(stream) if self.ahead is not None else stream

    def channels_last(self) -> None:
        super().channels_last()
        if self.teacher is not None:
            self.teacher.model.to(memory_format=torch.channels_last)

    def compile(self) -> None:
        """Compile the student and, unless its outputs are cached, the teacher."""
        super().compile()
        if self.teacher is not None and self.cache is None:
            self.teacher.model.compile()

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run: teacher and student outputs on one batch -> build adapters, check shapes.
        A live teacher will run on ``cache.live_batches`` upcoming batches at once (``TeacherAhead``)."""
        setup_objective(self._module, self.teacher(batch.x) if self.teacher is not None else None, batch, info)
        n = live_batches(self.live_batches, batch) if self.teacher is not None and self.cache is None else 1
        self.ahead = TeacherAhead(self.teacher, n) if n > 1 else None

    def prepare(self, loader: Iterable[Batch]) -> None:
        """Give the losses' pre-training stages one pass of teacher outputs per call."""
        if self.teacher is None:
            return
        teacher = self.teacher
        self._module.objective.pretrain(lambda: (teacher(batch.x) for batch in loader))

    def teacher_outputs(self, batch: Batch) -> Outputs | None:
        if self.cache is not None:
            return self.cache.lookup(batch)
        if self.teacher is None:
            return None
        ahead = self.ahead.take(batch) if self.ahead is not None else None
        return ahead if ahead is not None else self.teacher(batch.x)

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self._module.student}

    def teacher_hash(self) -> str | None:
        return self.teacher.hash if self.teacher is not None else None

    def describe(self) -> dict[str, Any]:
        facts = {"adapter_params": count_params(self._module.objective), "losses": list(self._module.objective.terms)}
        if self.cache is not None:
            facts["cache"] = self.cache.describe()
        return facts
