"""Multi-teacher distillation: several frozen, pre-trained teachers teach one student.

The teachers are the recipe's ``teacher`` then each of ``teachers`` (any architectures with the
student's classes). How their knowledge is combined (``aggregation``):

* ``mean``: the student's response losses see the average of the softened teacher
  distributions, ``p_mix^T = 1/N sum_i softmax(z_i / T)`` (Hinton, Vinyals & Dean 2015: an
  ensemble's soft targets are the arithmetic mean of its members' predictive distributions). The mixed teacher's logits are ``z_mix = T * log(p_mix^T)`` (see
  :func:`~darkknowledge.schemes.teacher_mix.mixture_logits`), so every response loss of the
  catalog (``kd``, ``dist``, ``dkd``, ...) reads the mixture unchanged.
* ``weighted``: ``p_mix^T = sum_i w_i softmax(z_i / T)`` with fixed ``weights`` (normalised).
* ``confidence``: per-sample weights ``w_i(x)``; ``ce`` = CA-MKD (Zhang, Chen & Wang,
  "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022, sample-wise weights
  ``w_i = (1 - softmax_i(CE(z_i, y))) / (N - 1)``), ``entropy`` = EBKD (Kwon et al., ICASSP 2020:
  ``w_i = (1 - H_i / sum_j H_j) / (N - 1)``); both formulas as in the CA-MKD authors' code
  (Rorozhl/CA-MKD, ``helper/loops.py``). ``correct`` = uniform over the teachers whose argmax
  is the label. Unlabelled samples get uniform weights from the label rules. One difference
  from both papers: they weigh each teacher's KL term, here the weights mix the teachers'
  probabilities (one mixed teacher, so any response loss applies).
* ``random``: one teacher drawn uniformly per training step (Fukuda, Suzuki, Kurata, Thomas,
  Cui & Ramabhadran, "Efficient Knowledge Distillation from an Ensemble of Teachers",
  Interspeech 2017: the teacher labels are switched at the mini-batch level); only that teacher runs.
* ``per_teacher``: the recipe's teacher-reading terms are built once per teacher, each bound to
  (student, teacher_i) with its own adapters, and **averaged**: ``L = L_shared + 1/N sum_i L_i``
  (terms ``kd@t0``, ``fitnet@t1``, ...; ``L_shared`` = terms reading no teacher, such as ``ce``,
  counted once). Feature and relation losses work with several teachers this way.

The three mixing aggregations build one teacher of logits only, so losses reading teacher
features need ``per_teacher`` or ``random``. ``random`` also builds one objective per teacher
(terms keep their names: the drawn teacher's value) and adds ``0 * sum(params)`` of the other
teachers' adapters, so DDP sees every parameter in every step.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from darkknowledge.data.batch import Batch
from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.losses.base import Outputs, SetupInfo
from darkknowledge.losses.objective import Objective
from darkknowledge.models import count_params
from darkknowledge.schemes import register_scheme
from darkknowledge.schemes.base import Scheme
from darkknowledge.schemes.offline import tapped_outputs
from darkknowledge.schemes.teacher_mix import confidence_weights, draw_teacher, fixed_weights, mixture_logits, stack_logits
from darkknowledge.taps import FeatureTaps, unwrap, validate_taps
from darkknowledge.teachers.cache import CacheSpec, TeacherOutputCache, cached_views, load_or_build
from darkknowledge.teachers.lookahead import TeacherAhead, live_batches
from darkknowledge.teachers.frozen import FrozenTeacher

if TYPE_CHECKING:
    from darkknowledge.config import CacheConfig
    from darkknowledge.schemes.context import SchemeContext

log = logging.getLogger(__name__)

Aggregation = Literal["mean", "weighted", "confidence", "random", "per_teacher"]
MIXING = ("mean", "weighted", "confidence")
TeacherOuts = list  # list[Outputs | None], one per objective (None: that teacher did not run)


class MultiTeacherObjective(nn.Module):
    """The trainable module: the student, the teacher-free terms and one objective per teacher
    (a single one for the mixing aggregations), with their adapters.

    Args:
        student: The model to train.
        shared: Terms that read no teacher (e.g. ``ce``), counted once; or None.
        objectives: The teacher-reading terms, one objective per teacher (or one for a mixture).
        suffixes: Term-name suffix per objective (``"@t0"``; ``""`` when names stay plain).
        average: Average the per-objective losses over the objectives that ran (per_teacher).
        taps: Student module paths any term reads.
    """

    def __init__(self, student: nn.Module, shared: Objective | None, objectives: list[Objective],
                 suffixes: list[str], average: bool, taps: tuple[str, ...]) -> None:
        super().__init__()
        self.student = student
        self.shared = shared
        self.objectives = nn.ModuleList(objectives)
        self.suffixes = list(suffixes)
        self.average = average
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # random: steps drawn so far
        self.taps = FeatureTaps(student, list(taps)) if taps else None
        if self.taps is not None:
            self.taps.active = False  # record only inside student_outputs, not when evaluating

    def student_outputs(self, x: torch.Tensor) -> Outputs:
        return tapped_outputs(self.student, self.taps, x)

    def forward(self, batch: Batch, teachers: TeacherOuts, epoch_progress: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L = L_shared + sum_i c_i L_i`` over the objectives whose teacher ran (``c_i = 1/N``
        averaged, else 1); an objective whose teacher did not run adds ``0 * sum(params)``."""
        student = self.student_outputs(batch.x)
        total: torch.Tensor | float = 0.0
        values: dict[str, torch.Tensor] = {}
        if self.shared is not None:
            total, values = self.shared(student, None, batch, epoch_progress)
            values = dict(values)
        ran = [i for i, t in enumerate(teachers) if t is not None]
        scale = 1.0 / len(ran) if self.average and ran else 1.0
        for i, objective in enumerate(self.objectives):
            if teachers[i] is None:
                params = list(objective.parameters())
                if params:  # DDP without find_unused_parameters: a zero gradient for idle adapters
                    total = total + 0.0 * sum(p.sum() for p in params)
                continue
            loss, terms = objective(student, teachers[i], batch, epoch_progress)
            total = total + scale * loss
            values.update({f"{name}{self.suffixes[i]}": v for name, v in terms.items()})
        return total, values  # type: ignore[return-value]


@register_scheme("multi_teacher")
class MultiTeacher(Scheme):
    """Several frozen teachers -> one student, aggregated by mean/weights/confidence, a random
    teacher per step, or one loss per teacher (see module docstring).

    Args:
        student: The model to train.
        objectives: ``N`` fresh objectives of the same recipe ``losses`` (one per teacher).
        teachers: ``N >= 2`` trained models predicting the student's classes.
        aggregation: ``mean``, ``weighted``, ``confidence``, ``random`` or ``per_teacher``.
        weights: ``weighted`` only: one weight >= 0 per teacher (normalised).
        confidence: ``confidence`` only: ``ce`` (CA-MKD), ``entropy`` (EBKD) or ``correct``.
        temperature: Mixing temperature (mixing aggregations; default: ``T`` of the objective).
        seed: Seed of the ``random`` teacher sequence.
        names: Config paths of the teachers (for messages).
        cache: Teacher-output cache settings (the recipe's ``cache:``); when enabled each teacher's
            outputs (logits and the taps its losses read) are computed once and read by index.
    """

    default_transfer = True
    citation = ("Hinton et al. 2015 (ensemble mean); Fukuda et al., Interspeech 2017 (random teacher per step); "
                "Zhang et al., CA-MKD, ICASSP 2022; Kwon et al., EBKD, ICASSP 2020 (confidence weights).")
    summary = "several frozen teachers teach one student: mixed soft labels, a random teacher per step, or a loss per teacher"
    report_notes: ClassVar[tuple[str, ...]] = (
        "multi_teacher: every teacher of the recipe (`teacher`, then `teachers`) teaches the student; the teacher "
        "rows list each one",
    )

    @classmethod
    def run(cls, ctx: SchemeContext, seed: int,
            aggregation: Aggregation = "mean",
            weights: list[Annotated[float, Field(ge=0.0)]] | None = None,
            confidence: Literal["ce", "entropy", "correct"] | None = None,
            temperature: Annotated[float, Field(gt=0.0)] | None = None) -> list[dict[str, Any]]:
        """One stage: the student (seed's init) learns from every teacher, with the transfer set.

        Args:
            aggregation: How the teachers are combined (module docstring).
            weights: ``weighted``: one weight per teacher, in the order ``teacher``, ``teachers.0``, ...
            confidence: ``confidence``: ``ce`` (CA-MKD, default), ``entropy`` (EBKD) or ``correct``.
            temperature: ``mean``/``weighted``/``confidence``: the T at which probabilities are
                mixed (default: the ``T`` of the objective's response term, else 1).
        """
        named = ctx.teachers()
        scheme = cls(ctx.student(seed), [ctx.objective() for _ in named], [m for _, m in named],
                     aggregation=aggregation, weights=weights, confidence=confidence,
                     temperature=temperature, seed=seed, names=[w for w, _ in named], cache=ctx.cfg.cache)
        label = f"multi_teacher[{aggregation}]:" + "+".join(ctx.cfg.losses)
        return ctx.train(ctx.stage_name(seed), scheme, seed, with_transfer=ctx.uses_transfer(cls), label=label)

    def __init__(self, student: nn.Module, objectives: list[Objective], teachers: list[nn.Module],
                 aggregation: str = "mean", weights: list[float] | None = None,
                 confidence: str | None = None, temperature: float | None = None,
                 seed: int = 0, names: list[str] | None = None, cache: CacheConfig | None = None) -> None:
        n = len(teachers)
        names = names or [f"teachers.{i}" for i in range(n)]
        if n < 2:
            raise ConfigError(f"scheme multi_teacher needs at least 2 teachers, got {n} ({names}); add a "
                              "`teachers:` list to the recipe, e.g. teachers: [{name: cnn1d, seed: 1}]")
        if aggregation not in (*MIXING, "random", "per_teacher"):
            raise ConfigError(f"scheme.params.aggregation: unknown {aggregation!r}; valid: "
                              "mean, weighted, confidence, random, per_teacher")
        if len(objectives) != n:
            raise ConfigError(f"multi_teacher: {len(objectives)} objectives for {n} teachers; give one per teacher")
        if weights is not None and aggregation != "weighted":
            raise ConfigError(f"scheme.params.weights is only used with aggregation 'weighted' (got {aggregation!r})")
        if confidence is not None and aggregation != "confidence":
            raise ConfigError(f"scheme.params.confidence is only used with aggregation 'confidence' "
                              f"(got {aggregation!r})")
        if temperature is not None and aggregation not in MIXING:
            raise ConfigError(f"scheme.params.temperature is only used with mean/weighted/confidence, "
                              f"not {aggregation!r} (each teacher's losses use their own T)")
        if aggregation == "weighted" and weights is None:
            raise ConfigError(f"aggregation 'weighted' needs scheme.params.weights: one weight per teacher ({n}: "
                              f"{', '.join(names)})")
        self.aggregation, self.seed, self.names = aggregation, int(seed), names
        self.rule = confidence or "ce"
        self.fixed = fixed_weights(weights, n) if aggregation == "weighted" else torch.full((n,), 1.0 / n)
        shared, per = _split_terms(student, objectives, teachers)
        mixing = aggregation in MIXING
        if mixing:
            per = per[:1]
            needs = per[0].bind(student, teachers[0])
            if needs.teacher_taps:
                raise ConfigError(
                    f"aggregation {aggregation!r} mixes the teachers' soft labels into one teacher of logits only, "
                    f"but losses {list(per[0].terms)} read teacher features {list(needs.teacher_taps)}; use "
                    "aggregation 'per_teacher' (one loss per teacher, own adapters) or 'random'")
            self.temperature = temperature if temperature is not None else _objective_temperature(per[0])
            self.teachers = [FrozenTeacher(t, (), need_logits=True) for t in teachers]
            self.needs = [(True, ())] * n
            student_taps = needs.student_taps
        else:
            self.temperature = None
            frozen, student_taps, self.needs = [], (), []
            for objective, teacher in zip(per, teachers):
                needs = objective.bind(student, teacher)
                validate_taps(teacher, needs.teacher_taps)
                frozen.append(FrozenTeacher(teacher, needs.teacher_taps, need_logits=needs.teacher_logits))
                self.needs.append((needs.teacher_logits, needs.teacher_taps))
                student_taps = tuple(dict.fromkeys(student_taps + needs.student_taps))
            self.teachers = frozen
        if shared is not None:
            student_taps = tuple(dict.fromkeys(student_taps + shared.bind(student, None).student_taps))
        validate_taps(student, student_taps)
        suffixes = [f"@t{i}" for i in range(len(per))] if aggregation == "per_teacher" else [""] * len(per)
        self._module = MultiTeacherObjective(unwrap(student), shared, per, suffixes,
                                             average=aggregation == "per_teacher", taps=student_taps)
        self._draws = 0
        self._module.register_load_state_dict_post_hook(self._reload_draws)
        self.cache_cfg = cache if cache is not None and cache.enabled else None
        self.caches: list[TeacherOutputCache] | None = None
        self.live_batches = cache.live_batches if cache is not None else None
        self.aheads: list[TeacherAhead] = []

    # ------------------------------------------------------------ teachers
    def _reload_draws(self, module: nn.Module, incompatible: Any) -> None:
        self._draws = int(self._module.draws)  # a resumed run continues the same teacher sequence

    def next_teacher(self) -> int:
        """``random``: the teacher of this training step (advances the step counter)."""
        which = draw_teacher(self.seed, self._draws, len(self.teachers))
        self._draws += 1
        self._module.draws.fill_(self._draws)  # no host sync; saved with the module for resume
        return which

    def mixture_weights(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher weights ``(N, B)`` (or ``(N,)`` fixed) for teacher logits ``(N, B, K)``."""
        if self.aggregation == "confidence":
            return confidence_weights(logits, labels, self.rule)
        return self.fixed.to(logits.device)

    def attach(self, loader: Any, dist: Any = None) -> None:
        """Load or build one teacher-output cache per teacher (when the recipe enables ``cache``).

        Each cache holds what that teacher's losses read (``cache.taps``/``cache.logits`` are
        not used: the teachers differ). With augmentation every cache stores the same
        ``cache.views`` views (same seed) and the loader replays them.
        """
        cfg = self.cache_cfg
        if cfg is None:
            return
        augment = getattr(loader, "augment", None)
        views = cached_views(cfg.views, augment)
        if views is None:
            return
        self.caches = []
        for teacher, (logits, taps) in zip(self.teachers, self.needs):
            spec = CacheSpec(logits=logits, taps=tuple(taps), dtype=cfg.dtype, topk=cfg.topk, views=views)
            self.caches.append(load_or_build(teacher, loader, spec, augment=augment, seed=cfg.seed,
                                             memory_limit_mb=cfg.memory_limit_mb, dist=dist).to(loader.device))
        if augment is not None:
            loader.replay = self.caches[0].replay(loader.seed)

    def batches(self, stream: Iterator[Batch]) -> Iterator[Batch]:
        """With live teachers, each runs on the same groups of upcoming batches."""
        for ahead in self.aheads:
            stream = ahead.wrap(stream)
        return stream

    def _run_teacher(self, i: int, batch: Batch) -> Outputs:
        if self.caches is not None:
            return self.caches[i].lookup(batch)
        ahead = self.aheads[i].take(batch) if self.aheads else None
        return ahead if ahead is not None else self.teachers[i](batch.x)

    def teacher_outputs(self, batch: Batch, only: int | None = None) -> TeacherOuts:
        """Per objective: the teacher's outputs, or the mixed teacher for mean/weighted/confidence.

        Args:
            batch: The step's batch.
            only: Run only this teacher (``random``); the others give None.
        """
        if self.aggregation in MIXING:
            logits = stack_logits([self._run_teacher(i, batch).logits for i in range(len(self.teachers))])  # (N, B, K)
            weights = self.mixture_weights(logits, batch.y)  # (N, B) or (N,)
            return [Outputs(logits=mixture_logits(logits, weights, self.temperature))]  # (B, K)
        return [self._run_teacher(i, batch) if only is None or i == only else None for i in range(len(self.teachers))]

    def training_step(self, model: nn.Module, batch: Batch, epoch_progress: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        only = self.next_teacher() if self.aggregation == "random" else None
        return model(batch, self.teacher_outputs(batch, only), epoch_progress)

    # ------------------------------------------------------------ stage
    @property
    def module(self) -> nn.Module:
        return self._module

    def to(self, device: torch.device) -> MultiTeacher:
        self._module.to(device)
        for t in self.teachers:
            t.to(device)
        return self

    def setup(self, batch: Batch, info: SetupInfo | None = None) -> None:
        """Dry run: every teacher and the student on one batch -> adapters per teacher, shape checks."""
        module = self._module
        outs = [t(batch.x) for t in self.teachers]
        was_training = module.training
        module.eval()
        with torch.no_grad():
            student = module.student_outputs(batch.x)
        k = int(student.logits.shape[-1])
        for where, out in zip(self.names, outs):
            if out.logits is not None and int(out.logits.shape[-1]) != k:
                raise ShapeError(f"multi_teacher: {where} predicts {int(out.logits.shape[-1])} classes but the "
                                 f"student predicts {k}; every teacher must predict the student's classes")
        info = replace(info or SetupInfo(num_samples=len(batch), batch_size=len(batch)), num_classes=k)
        teachers = self.teacher_outputs(batch) if self.aggregation in MIXING else outs
        for objective, out in zip(module.objectives, teachers):
            objective.setup(student, out, info)
        if module.shared is not None:
            module.shared.setup(student, None, info)
        module.to(batch.x.device)
        module.train(was_training)
        # live teachers run on cache.live_batches upcoming batches at once (not for random: one teacher per step)
        n = live_batches(self.live_batches, batch) if self.caches is None and self.aggregation != "random" else 1
        self.aheads = [TeacherAhead(teacher, n) for teacher in self.teachers] if n > 1 else []

    def prepare(self, loader: Iterable[Batch]) -> None:
        """Losses' pre-training stages: each objective on its own teacher's (or the mixed) outputs."""
        for i, objective in enumerate(self._module.objectives):
            if self.aggregation in MIXING:
                objective.pretrain(lambda: (self.teacher_outputs(b)[0] for b in loader))
            else:
                objective.pretrain(lambda t=self.teachers[i]: (t(b.x) for b in loader))

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self._module.student}

    def teacher_hash(self) -> str:
        joined = "|".join(t.hash for t in self.teachers)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        module = self._module
        losses = list(module.shared.terms) if module.shared is not None else []
        for objective, suffix in zip(module.objectives, module.suffixes):
            losses += [f"{name}{suffix}" for name in objective.terms]
        facts = {"losses": list(dict.fromkeys(losses)), "adapter_params": count_params(module) - count_params(module.student),
                 "aggregation": self.aggregation, "teachers": len(self.teachers)}
        if self.caches is not None:
            facts["cache"] = [c.describe() for c in self.caches]
        return facts


def _split_terms(student: nn.Module, objectives: list[Objective], teachers: list[nn.Module]
                 ) -> tuple[Objective | None, list[Objective]]:
    """Split the recipe's terms: those reading no teacher (one shared objective, from the first
    copy) and the teacher-reading ones (one objective per teacher, from each fresh copy)."""
    first = objectives[0]
    reads = {name: term.bind(student, teachers[0]).teacher for name, term in first.terms.items()}
    shared_names = [name for name, r in reads.items() if not r]
    teacher_names = [name for name, r in reads.items() if r]
    if not teacher_names:
        raise ConfigError(f"multi_teacher: none of the losses {list(first.terms)} reads a teacher; add a "
                          "response or feature loss such as kd: {T: 4, alpha: 0.9}")
    shared = Objective({n: first.terms[n] for n in shared_names}, {n: first.schedules[n] for n in shared_names}) \
        if shared_names else None
    per = [Objective({n: o.terms[n] for n in teacher_names}, {n: o.schedules[n] for n in teacher_names})
           for o in objectives]
    return shared, per


def _objective_temperature(objective: Objective) -> float:
    """Default mixing temperature: the ``T`` (DIST's ``tau``, NKD's ``temp``) of the objective's
    response terms, else 1."""
    temps = {}
    for name, term in objective.terms.items():
        attr = next((a for a in ("T", "tau", "temp") if isinstance(getattr(term, a, None), (int, float))), None)
        if attr is not None:
            temps[name] = float(getattr(term, attr))
    if len(set(temps.values())) > 1:
        raise ConfigError(f"multi_teacher: the losses soften logits at different temperatures {temps}; set "
                          "scheme.params.temperature to choose the one at which teacher probabilities are mixed")
    return next(iter(temps.values()), 1.0)
