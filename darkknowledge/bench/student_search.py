"""Multi-objective student architecture search: NSGA-II over a :class:`StudentSpace` under cost limits.

The sampler is NSGA-II (Deb, Pratap, Agarwal, Meyarivan, "A Fast and Elitist Multiobjective
Genetic Algorithm: NSGA-II", IEEE Trans. Evolutionary Computation 2002), optuna's
``NSGAIISampler``, seeded per trial from ``seed`` and the trial's number (a resumed search
proposes what an uninterrupted one would). Objectives: ``accuracy`` (the caller's ``proxy``, a
short KD run) is maximised, every other name (a key of ``measure``'s result, e.g.
``latency_ms_b1``) minimised.

Limits are *constraints*, not pruning: a candidate whose measured ``params``/``flops``/... exceed
a limit is recorded ``infeasible`` without a proxy run and told to optuna as complete with
constraint values ``c_k = m_k / limit_k - 1`` (> 0: violated; relative, so units do not mix)
and accuracy ``-inf``. NSGA-II's constrained domination (Deb et al. 2002, Sec. VI) ranks every
feasible candidate above every infeasible one and infeasible ones by total violation, so the
search learns where the limits are (a pruned trial would teach it nothing).

The budget ``trials`` counts distinct candidates. One proposed again is not measured or run
again: its trial reuses the first record (``reused_from``), is told to optuna as PRUNED (out of
the populations) and does not count. After ``population_size`` repeats in a row, a space of at
most 10,000 candidates gets one random unevaluated candidate (a "random immigrant",
Grefenstette 1992), so a budget near the space's size ends in bounded time.

``<out>/trials.json`` holds a header (space, objectives, limits, seed, sampler) and every trial,
written atomically after each; a rerun with the same header replays them (optuna's own trial
attributes included) and runs only the missing ones; another header is refused.

No tensors: a record is a JSON dict ``{number, candidate, immigrant, state, metrics, accuracy,
violations, reused_from, seconds, system_attrs}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from darkknowledge.atomic import atomic_write
from darkknowledge.bench.candidates import Candidate, StudentSpace, is_number
from darkknowledge.bench.pareto import (
    TRUST_LEVELS,
    kendall_tau,
    objective_value,
    pareto_front,
    proxy_trust,
)
from darkknowledge.bench.trials_file import read_trials
from darkknowledge.errors import ConfigError, DivergenceError
from darkknowledge.runs.lock import RunLock

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.json"
FORMAT = 1
INSTALL_HINT = 'pip install "darkknowledge[tune]"'
DEFAULT_POPULATION = 10
"""NSGA-II's generation size. optuna's default 50 makes a budget under 50 candidates random search."""
STATES = ("complete", "infeasible", "diverged")
PROPOSALS_PER_TRIAL = 10
"""A search stops after this many proposals per candidate asked, even short of ``trials`` candidates."""
IMMIGRANT_GRID = 10_000
"""Spaces up to this size get random immigrants when NSGA-II only repeats itself (see ``_immigrant``)."""
_CONSTRAINTS_ATTR = "dk_constraints"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"student search needs optuna, which is not installed: {INSTALL_HINT}") from None
    return optuna


def _native_constraints(optuna: Any) -> bool:
    """optuna >= 5 takes constraints with ``Trial.set_constraint``; older ones by ``constraints_func``."""
    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraints_of(trial: Any) -> list[float]:
    return list(trial.user_attrs[_CONSTRAINTS_ATTR])


def _trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial ``number``: one stream per (seed, number)."""
    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])


def _check_objectives(objectives: Any) -> tuple[str, ...]:
    objectives = (objectives,) if isinstance(objectives, str) else tuple(objectives or ())
    if not objectives or not all(o and isinstance(o, str) for o in objectives) or len({*objectives}) < len(objectives):
        raise ConfigError(
            f"objectives {list(objectives)!r}: expected distinct names, 'accuracy' (maximised) and/or "
            "keys of measure's result (minimised), e.g. ('accuracy', 'latency_ms_b1')"
        )
    return objectives


def _check_limits(limits: Any) -> dict[str, float]:
    if limits is None:
        return {}
    if not isinstance(limits, Mapping):
        raise ConfigError(f"limits: expected a mapping such as {{'params': 20000}}, got {limits!r}")
    for k, v in limits.items():
        if k == "accuracy" or not isinstance(k, str):
            raise ConfigError(
                f"limits: {k!r} cannot be limited; limits are upper bounds on measure's keys "
                "(params, flops, latency_ms_b1, ...)"
            )
        if not is_number(v) or v <= 0:
            raise ConfigError(f"limits.{k}: expected a positive number (an upper bound), got {v!r}")
    return {k: float(v) for k, v in limits.items()}


def _metrics(raw: Any, cand: Candidate, needed: Sequence[str]) -> dict[str, Any]:
    """``measure``'s result (a mapping or dataclass) as JSON scalars, with every ``needed`` key a number."""
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        raw = dataclasses.asdict(raw)
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"measure({cand.describe()}) returned {type(raw).__name__}; expected a mapping such as "
            "{'params': ..., 'flops': ..., 'latency_ms_b1': ...}"
        )
    bad = [k for k in needed if not is_number(raw.get(k))]
    if bad:
        got = ", ".join(f"{k}={raw.get(k)!r}" for k in bad)
        raise ConfigError(
            f"measure({cand.describe()}): {got}; the objectives and limits need finite numbers for "
            f"{', '.join(needed)} (it returned keys: {', '.join(map(str, raw)) or 'none'})"
        )
    out: dict[str, Any] = {
        str(k): (int(v) if isinstance(v, numbers.Integral) else float(v)) for k, v in raw.items() if is_number(v)
    }
    out.update({str(k): v for k, v in raw.items() if v is None or isinstance(v, (str, bool))})  # e.g. a device name
    return out


def _header(
    space: StudentSpace, objectives: tuple[str, ...], limits: Mapping[str, float], seed: int, population: int
) -> dict[str, Any]:
    header = {
        "format": FORMAT,
        "space": space.to_dict(),
        "objectives": list(objectives),
        "limits": dict(limits),
        "seed": int(seed),
        "sampler": {"name": "NSGAIISampler", "population_size": int(population)},
    }
    return json.loads(json.dumps(header))


def _load(path: Path, header: Mapping[str, Any], budget: int, space: StudentSpace) -> list[dict]:
    """The finished trials recorded in ``path`` (none without it); a ``running`` one is dropped.

    Raises:
        ConfigError: Unreadable, another search's header, malformed records, or more than ``budget``.
    """
    records = read_trials(path, header, "search into another folder")
    needed = [o for o in header["objectives"] if o != "accuracy"] + list(header["limits"])
    done = [r for r in records if isinstance(r, dict) and r.get("state") != "running"]
    for i, r in enumerate(done):
        ok = r.get("number") == i and r.get("state") in STATES and isinstance(r.get("system_attrs"), dict)
        try:
            ok = ok and space.contains(Candidate.from_dict(r["candidate"]))
            ok = ok and (r["state"] == "diverged" or all(is_number(r["metrics"][k]) for k in needed))
            prior = r.get("reused_from")
            ok = ok and (prior is None or (0 <= prior < i and done[prior]["candidate"] == r["candidate"]))
        except (KeyError, TypeError, AttributeError, IndexError):
            ok = False
        if not ok or (r["state"] == "complete" and not is_number(r.get("accuracy"))):
            raise ConfigError(f"{str(path)!r}: trial record {i} is malformed ({r!r:.200}); search into another folder")
    distinct = len({json.dumps(r["candidate"], sort_keys=True) for r in done})
    if distinct > budget:
        raise ConfigError(
            f"{str(path)!r} holds {distinct} evaluated candidates, more than trials={budget}; ask for at "
            f"least {distinct} (more extends the search) or search into another folder"
        )
    return done


def _save(path: Path, header: Mapping[str, Any], records: list[dict]) -> None:
    text = json.dumps({**header, "trials": records}, indent=1)
    atomic_write(path, lambda f: f.write(text + "\n"), binary=False)


def _tell(record: Mapping[str, Any], objectives: Sequence[str]) -> tuple[str, list[float] | None]:
    """Optuna's state and values for a record: a repeat is PRUNED (kept out of NSGA-II's
    populations, which copies of one elite would crowd), a diverged run FAIL, an infeasible
    candidate COMPLETE with accuracy ``-inf`` (its constraint values rank it)."""
    if record.get("reused_from") is not None:
        return "PRUNED", None
    if record["state"] == "diverged":
        return "FAIL", None
    acc = -math.inf if record["state"] == "infeasible" else float(record["accuracy"])
    return "COMPLETE", [acc if o == "accuracy" else float(record["metrics"][o]) for o in objectives]


def _replay(optuna: Any, study: Any, space: StudentSpace, records: list[dict], objectives: Sequence[str]) -> None:
    dists = space.distributions()
    for r in records:
        state, values = _tell(r, objectives)
        study.add_trial(
            optuna.trial.create_trial(
                params=space.optuna_params(Candidate.from_dict(r["candidate"])),
                distributions=dists,
                values=values,
                system_attrs=r["system_attrs"],
                state=getattr(optuna.trial.TrialState, state),
            )
        )


def _immigrant(
    space: StudentSpace, first: Mapping[str, Any], records: Sequence[Mapping[str, Any]], population: int, seed: int
) -> Candidate | None:
    """After ``population`` repeats in a row, a random candidate not evaluated yet ("random immigrants",
    Grefenstette 1992), for spaces of at most :data:`IMMIGRANT_GRID` candidates; else None."""
    repeats = next((i for i, r in enumerate(reversed(records)) if r.get("reused_from") is None), len(records))
    if repeats < population or space.size() > IMMIGRANT_GRID:
        return None
    fresh = [c for c in space.grid() if c.key not in first]
    return fresh[int(np.random.default_rng(seed).integers(len(fresh)))] if fresh else None


def _evaluate(
    cand: Candidate,
    measure: Callable[[Candidate], Any],
    proxy: Callable[[Candidate], float],
    limits: Mapping[str, float],
    needed: Sequence[str],
) -> dict[str, Any]:
    """Measure ``cand``; when within every limit, its proxy accuracy (a diverged run: no accuracy)."""
    metrics = _metrics(measure(cand), cand, needed)
    violations = {k: metrics[k] / lim - 1.0 for k, lim in limits.items() if metrics[k] > lim}
    out: dict[str, Any] = {"metrics": metrics, "accuracy": None, "violations": violations}
    if violations:
        return {**out, "state": "infeasible"}
    try:
        acc = proxy(cand)
    except DivergenceError as exc:
        log.warning("student search: the proxy run of %s diverged (%s): no accuracy", cand.describe(), exc)
        return {**out, "state": "diverged"}
    if not is_number(acc):
        raise ConfigError(f"proxy({cand.describe()}) returned {acc!r}; expected a finite accuracy")
    return {**out, "state": "complete", "accuracy": float(acc)}


def search_students(
    space: StudentSpace | Mapping[str, Any],
    measure: Callable[[Candidate], Any],
    proxy: Callable[[Candidate], float],
    trials: int,
    out_dir: str | Path,
    seed: int = 0,
    limits: Mapping[str, float] | None = None,
    objectives: Sequence[str] = ("accuracy", "latency_ms_b1"),
    *,
    population_size: int = DEFAULT_POPULATION,
    progress: bool = False,
) -> SearchResult:
    """Search ``space`` with NSGA-II until ``trials`` distinct candidates are evaluated (module docstring).

    Args:
        space: The student space (or its mapping, :meth:`StudentSpace.from_mapping`).
        measure: ``measure(candidate) -> {params, flops, latency_ms_b1, ...}``: cheap, no training.
        proxy: ``proxy(candidate) -> accuracy``: a short KD run, only for candidates within limits.
            A :class:`DivergenceError` records the trial ``diverged``; any other exception stops
            the search (the trials so far stay recorded; a rerun continues).
        trials: The budget: distinct candidates to evaluate (recorded ones count). A proposal of
            an evaluated candidate is recorded, reusing its record, but does not count; at most
            ``PROPOSALS_PER_TRIAL * trials`` proposals are made.
        out_dir: Folder of ``trials.json`` (locked while the search runs).
        seed: Seed of the sampler.
        limits: Upper bounds on ``measure``'s keys, e.g. ``{"params": 20000, "latency_ms_b1": 0.5}``.
        objectives: ``accuracy`` (maximised) and/or ``measure`` keys (minimised).
        population_size: NSGA-II's generation size (>= 2).
        progress: Log each trial at INFO (else DEBUG).

    Returns:
        Every trial's record, the Pareto front and the best record per objective.

    Raises:
        ConfigError: A bad budget, space, objective, limit or population, optuna missing, an
            ``out_dir`` that records another search, or ``measure``/``proxy`` returning what
            the objectives cannot use.
    """
    space = StudentSpace.from_mapping(space)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials: expected a whole number >= 1, got {trials!r}")
    if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
        raise ConfigError(f"population_size: expected a whole number >= 2 (parents to cross), got {population_size!r}")
    objectives = _check_objectives(objectives)
    limits = _check_limits(limits)
    needed = list(dict.fromkeys([o for o in objectives if o != "accuracy"] + list(limits)))
    optuna = _optuna()
    native = _native_constraints(optuna)
    header = _header(space, objectives, limits, seed, population_size)
    say = log.info if progress else log.debug
    out = Path(out_dir)
    path = out / TRIALS_FILE
    with RunLock(out, "student search"), contextlib.ExitStack() as stack:
        stack.callback(optuna.logging.set_verbosity, optuna.logging.get_verbosity())
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines say less than ours
        records = _load(path, header, trials, space)
        study = optuna.create_study(directions=["maximize" if o == "accuracy" else "minimize" for o in objectives])
        _replay(optuna, study, space, records, objectives)
        first: dict[str, dict] = {}
        for r in records:
            first.setdefault(Candidate.from_dict(r["candidate"]).key, r)
        if records:
            say("student search: %d trials (%d candidates) recorded in %s, replayed", len(records), len(first), path)
        for number in range(len(records), PROPOSALS_PER_TRIAL * trials):
            if len(first) >= min(trials, space.size()):
                break
            kw = {} if native or not limits else {"constraints_func": _constraints_of}
            study.sampler = optuna.samplers.NSGAIISampler(
                population_size=population_size, seed=_trial_seed(seed, number), **kw
            )
            immigrant = _immigrant(space, first, records, population_size, _trial_seed(seed, number))
            if immigrant is not None:
                study.enqueue_trial(space.optuna_params(immigrant))
            asked = study.ask()
            cand = space.sample(asked)
            record: dict[str, Any] = {"number": number, "candidate": cand.to_dict(), "immigrant": immigrant is not None}
            start = time.perf_counter()
            prior = first.get(cand.key)
            if prior is not None:
                record.update(
                    {k: prior[k] for k in ("state", "metrics", "accuracy", "violations")}, reused_from=prior["number"]
                )
            else:
                _save(path, header, [*records, {**record, "state": "running"}])
                record.update(_evaluate(cand, measure, proxy, limits, needed), reused_from=None)
                first[cand.key] = record
            record["seconds"] = round(time.perf_counter() - start, 4)
            if limits and record["state"] != "diverged":
                cons = [record["metrics"][k] / lim - 1.0 for k, lim in limits.items()]
                if native:
                    for k, c in zip(limits, cons):
                        asked.set_constraint(k, c)
                else:
                    asked.set_user_attr(_CONSTRAINTS_ATTR, cons)
            state, values = _tell(record, objectives)
            study.tell(asked, values, state=getattr(optuna.trial.TrialState, state))
            record["system_attrs"] = json.loads(json.dumps(study.get_trials(deepcopy=False)[asked.number].system_attrs))
            records.append(record)
            _save(path, header, records)
            say(
                "student search: trial %d (candidate %d/%d) %s: %s%s",
                number,
                len(first),
                trials,
                cand.describe(),
                record["state"] if prior is None else f"a repeat of trial {prior['number']}",
                "" if record["accuracy"] is None else f", accuracy {record['accuracy']:.4g}",
            )
        if len(first) < min(trials, space.size()):
            log.warning(
                "student search: %d proposals gave %d distinct candidates of the %d asked: stopped",
                len(records),
                len(first),
                trials,
            )
    return SearchResult.from_records(records, objectives, limits)


def _fmt(v: Any, kind: str = "count") -> str:
    if not is_number(v):
        return "—"
    if kind == "count":
        return f"{v:.0f}" if abs(v) < 1e4 else (f"{v / 1e3:.1f}K" if abs(v) < 1e6 else f"{v / 1e6:.2f}M")
    return f"{v:.3g}" if kind == "ms" else f"{v:.2f}"


def _ranked_value(record: Mapping[str, Any], objective: str) -> float:
    """What ``min`` ranks ``record`` by on ``objective``: accuracy negated (higher is better), others as they are."""
    value = objective_value(record, objective)
    assert value is not None  # only scored records are ranked
    return (-1 if objective == "accuracy" else 1) * value


@dataclass(frozen=True)
class SearchResult:
    """What a student search found.

    Attributes:
        records: Every trial's record, in order (see the module docstring).
        front: The Pareto front: non-dominated feasible candidates, each once (:func:`pareto_front`).
        best: ``{objective: record}``: the best feasible record per objective (the earliest on a tie).
        objectives: The objectives searched.
        limits: The limits applied.
    """

    records: list[dict]
    front: list[dict]
    best: dict[str, dict]
    objectives: tuple[str, ...]
    limits: dict[str, float]

    @classmethod
    def from_records(
        cls, records: Sequence[dict], objectives: Sequence[str], limits: Mapping[str, float] | None = None
    ) -> SearchResult:
        """The front and the best record per objective of ``records``."""
        objectives = _check_objectives(objectives)
        feasible = pareto_front(records, ())  # every feasible record, each candidate once
        best = {}
        for o in objectives:
            scored = [r for r in feasible if objective_value(r, o) is not None]
            if scored:  # min() keeps the earliest of equals
                best[o] = min(scored, key=functools.partial(_ranked_value, objective=o))
        return cls(list(records), pareto_front(records, objectives), best, objectives, dict(limits or {}))

    def to_markdown(self) -> str:
        """One row per distinct candidate: the front first, then by state and accuracy."""
        on_front = {json.dumps(r["candidate"], sort_keys=True) for r in self.front}
        rows = [r for r in self.records if r.get("reused_from") is None]
        extra = [o for o in self.objectives if o not in ("accuracy", "params", "flops", "latency_ms_b1")]

        def status(r: Mapping[str, Any]) -> str:
            if json.dumps(r["candidate"], sort_keys=True) in on_front:
                return "**front**"
            if r["state"] == "infeasible":
                return "over " + ", ".join(f"{k} (+{v:.0%})" for k, v in r["violations"].items())
            return r["state"].replace("complete", "dominated")

        rows.sort(key=lambda r: (status(r) != "**front**", r["state"] != "complete", -(r["accuracy"] or 0.0)))
        lines = [
            f"| # | candidate | params | FLOPs | latency b1 (ms) | {' | '.join(extra + [''])}proxy acc | front |",
            "|" + "---|" * (7 + len(extra)),
        ]
        for r in rows:
            m = r.get("metrics", {})
            cells = [
                str(r["number"]),
                Candidate.from_dict(r["candidate"]).describe(),
                _fmt(m.get("params")),
                _fmt(m.get("flops")),
                _fmt(m.get("latency_ms_b1"), "ms"),
                *[_fmt(m.get(o), "ms") for o in extra],
                _fmt(r.get("accuracy"), "acc"),
                status(r),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        limits = ", ".join(f"{k} <= {v:g}" for k, v in self.limits.items()) or "none"
        goal = ", ".join(("max " if o == "accuracy" else "min ") + o for o in self.objectives)
        head = (
            f"{len(self.records)} trials, {len(rows)} distinct candidates, {len(self.front)} on the Pareto front "
            f"({goal}; limits: {limits})."
        )
        return head + "\n\n" + "\n".join(lines) + "\n"


__all__ = [
    "DEFAULT_POPULATION",
    "INSTALL_HINT",
    "TRIALS_FILE",
    "TRUST_LEVELS",
    "Candidate",
    "SearchResult",
    "StudentSpace",
    "kendall_tau",
    "objective_value",
    "pareto_front",
    "proxy_trust",
    "search_students",
]
