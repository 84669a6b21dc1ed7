"""The whole run's ETA: the stages still planned, timed by what the finished epochs took.

A run (``dk run``: a teacher, then a baseline and a distilled student per seed) knows its plan
before it trains: the preflight plays every stage of one seed, and the other seeds repeat the
stages whose names end in ``-s<seed>``. A :class:`RunClock` holds that plan. Each stage takes
its entry when it starts (or :meth:`RunClock.skip` drops it when a finished stage is reloaded
or a cached teacher reused), and each epoch that ends is timed, wall clock, evaluation and
checkpoint included. The ETA after an epoch is what the stage has left at its own measured
seconds per epoch, plus each planned stage at the seconds per batch measured on stages of the
same family (its name without the seed: ``kd`` for ``kd-s1``) or, for a family not yet seen,
on every stage so far. The time between stages (building models, filling a teacher cache) is
not counted.

Without a plan (a Python API call, a ``Trainer`` used alone) the ETA covers the current stage
only, and :attr:`StageClock.whole` says so.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace


def _now() -> float:
    """The clock every :class:`RunClock` reads (a test may replace it)."""
    return time.perf_counter()


def family_of(stage: str, seed: int | None) -> str:
    """``kd-s1`` at seed 1 -> ``kd``; a name without its seed's suffix (``teacher``) is its own family."""
    suffix = f"-s{seed}"
    if seed is not None and stage.endswith(suffix) and len(stage) > len(suffix):
        return stage[: -len(suffix)]
    return stage


@dataclass(frozen=True)
class PlannedStage:
    """A stage the run will train.

    Attributes:
        family: Its name without the ``-s<seed>`` suffix; ``*`` matches any text (a name decided
            later, e.g. ``*@topk`` for a variant of the best arm).
        seed: Its seed (None: any).
        epochs: Epochs it trains.
        batches: Batches per epoch (None: unknown; estimated per epoch then).
        per_seed: Its name ends in ``-s<seed>``: every seed of the run trains one.
    """

    family: str
    seed: int | None
    epochs: int
    batches: int | None = None
    per_seed: bool = False

    @classmethod
    def of(cls, stage: str, seed: int | None, epochs: int, batches: int | None = None) -> PlannedStage:
        """The entry of stage ``stage`` trained at ``seed``."""
        family = family_of(stage, seed)
        return cls(family, seed, epochs, batches, per_seed=family != stage)


def for_seeds(played: Sequence[PlannedStage], seeds: Sequence[int]) -> list[PlannedStage]:
    """The whole run's plan from the stages played for ``seeds[0]``: those, then each per-seed
    stage again for every further seed, in the order the run trains them."""
    out = list(played)
    for seed in list(seeds)[1:]:
        out += [replace(p, seed=seed) for p in played if p.per_seed]
    return out


class _Measured:
    """Seconds, epochs and batches timed so far (one family, or all)."""

    def __init__(self) -> None:
        self.seconds, self.epochs, self.batches = 0.0, 0, 0

    def add(self, seconds: float, batches: int | None) -> None:
        self.seconds += seconds
        self.epochs += 1
        self.batches += batches or 0

    def estimate(self, p: PlannedStage) -> float | None:
        """Seconds ``p`` would take at this pace (per batch where both sides know batches); None: no pace."""
        if self.epochs == 0:
            return None
        if p.batches and self.batches:
            return p.epochs * p.batches * self.seconds / self.batches
        return p.epochs * self.seconds / self.epochs


class RunClock:
    """The plan of a run and the pace of its epochs (see the module docstring).

    Args:
        now: The clock (default: ``time.perf_counter``).
    """

    def __init__(self, now: Callable[[], float] | None = None) -> None:
        self._clock = now
        self._planned: list[PlannedStage] = []
        self.whole = False
        self._families: dict[str, _Measured] = {}
        self._all = _Measured()

    def now(self) -> float:
        return (self._clock or _now)()

    def plan(self, stages: Iterable[PlannedStage]) -> None:
        """Set the stages still to train, in order; the ETA then covers the whole run."""
        self._planned = list(stages)
        self.whole = True

    @property
    def planned(self) -> list[PlannedStage]:
        return list(self._planned)

    def skip(self, stage: str, seed: int | None) -> None:
        """A planned stage that will not train (finished before a resume, a cached teacher reused)."""
        self._take(stage, seed)

    def begin(self, stage: str, seed: int | None) -> StageClock:
        """Stage ``stage`` starts: it leaves the plan (with any planned before it, which did not
        train); its clock times its epochs."""
        self._take(stage, seed)
        return StageClock(self, family_of(stage, seed))

    def _take(self, stage: str, seed: int | None) -> None:
        family = family_of(stage, seed)
        for i, p in enumerate(self._planned):
            if (p.seed is None or p.seed == seed) and fnmatch.fnmatchcase(family, p.family):
                del self._planned[: i + 1]
                return

    def measured(self, family: str, seconds: float, batches: int | None) -> None:
        """One epoch of a stage of ``family`` took ``seconds`` over ``batches`` batches."""
        self._families.setdefault(family, _Measured()).add(seconds, batches)
        self._all.add(seconds, batches)

    def remaining(self) -> float:
        """Seconds the planned stages would take at the pace measured so far."""
        total = 0.0
        for p in self._planned:
            pace = self._families.get(p.family)
            found = pace.estimate(p) if pace is not None else None
            total += found if found is not None else (self._all.estimate(p) or 0.0)
        return total


class StageClock:
    """Times one stage's epochs; its :meth:`eta` is the whole run's (see :attr:`whole`)."""

    def __init__(self, run: RunClock, family: str) -> None:
        self.run, self.family = run, family
        self.epochs = self.done = 0
        self.batches: int | None = None
        self._seconds, self._timed, self._mark = 0.0, 0, 0.0

    @property
    def whole(self) -> bool:
        """Whether the ETA covers the whole run (a plan was given), not only this stage."""
        return self.run.whole

    def start(self, epochs: int, done: int = 0, batches: int | None = None) -> None:
        """Training starts: ``epochs`` in all, ``done`` of them before (a resumed stage), ``batches`` per epoch."""
        self.epochs, self.done, self.batches = epochs, done, batches
        self._mark = self.run.now()

    def epoch_done(self) -> float:
        """An epoch ended: time it since the last mark; the ETA in seconds."""
        now = self.run.now()
        seconds, self._mark = now - self._mark, now
        self.done += 1
        self._timed += 1
        self._seconds += seconds
        self.run.measured(self.family, seconds, self.batches)
        return self.eta()

    def eta(self) -> float:
        """Seconds left: this stage's epochs at its own pace, then the planned stages."""
        own = self._seconds / self._timed if self._timed else 0.0
        return max(0, self.epochs - self.done) * own + self.run.remaining()


def format_duration(seconds: float) -> str:
    """``0s``, ``45s``, ``3m05s``, ``2h04m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


__all__ = ["PlannedStage", "RunClock", "StageClock", "family_of", "for_seeds", "format_duration"]
