"""Student candidates: the space they come from, and how they compare.

**The space.** Student architecture search (Gou et al., "Knowledge Distillation: A Survey",
IJCV 2021, Sec. 6: "a network found by architecture search" as one teacher-student relation)
picks the builder parameters of a zoo model (``channels``, ``depth``, ``kernel_size``, ...)
and, optionally, the kind of convolution (``ops``: ``plain`` as the builder makes it, or
``depthwise``: depthwise-separable, Howard et al., "MobileNets", arXiv 2017, Sec. 3.1). What
``depthwise`` does to a model is the caller's (``measure``/``proxy`` build the candidate); the
space only names it. As plain data (the YAML of ``dk search``)::

    model: cnn1d
    params:
      channels: [8, 16, 32]                 # a list: the choices
      depth: {kind: int, low: 1, high: 4}   # a Range mapping (search_space.Range)
      batch_norm: false                     # a scalar: fixed
    ops: [plain, depthwise]                 # optional

A :class:`Candidate` is one point: ``Candidate("cnn1d", {"channels": 16, "depth": 2}, "plain")``;
optuna names its parameters ``params.<key>`` and ``ops``.

**Comparing them.** :func:`pareto_front` (Pareto domination, Deb et al., "NSGA-II", IEEE TEVC
2002, Sec. III-A) and, for whether a cheap proxy ranks candidates as full training does,
:func:`kendall_tau` (tau-b) and :func:`proxy_trust`. Inputs are plain numbers (no tensors).
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from darkknowledge.errors import ConfigError, RegistryError, ShapeError, did_you_mean
from darkknowledge.search_space import Range
from darkknowledge.validation import accepts_var_kwargs, signature_fields, validate_kwargs

OPS: tuple[str, ...] = ("plain", "depthwise")
"""Operation kinds a space may choose between."""
SPACE_KEYS: tuple[str, ...] = ("model", "params", "ops")
DATA_PARAMS: tuple[str, ...] = ("num_classes", "input_shape")
"""Builder parameters the data fills; a space may not search them."""


def is_number(v: Any) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


@dataclass(frozen=True)
class Candidate:
    """One student of a space: a model name, its builder parameters and its operation kind.

    Attributes:
        model: Registered model name (``darkknowledge.models``).
        params: Builder keyword parameters (without ``num_classes``/``input_shape``).
        ops: ``plain`` or ``depthwise``.
    """

    model: str
    params: dict[str, Any] = field(default_factory=dict)
    ops: str = "plain"

    def __hash__(self) -> int:  # params is a dict: hash the canonical key instead
        return hash(self.key)

    @property
    def key(self) -> str:
        """A canonical string: two candidates are the same student when their keys are equal."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON): ``{"model", "params", "ops"}``."""
        return {"model": self.model, "params": dict(self.params), "ops": self.ops}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Candidate:
        """Read :meth:`to_dict`'s output back."""
        return cls(model=str(raw["model"]), params=dict(raw.get("params", {})), ops=str(raw.get("ops", "plain")))

    def describe(self) -> str:
        """``channels=16, depth=2, ops=depthwise`` (the ops only when not ``plain``)."""
        parts = [f"{k}={json.dumps(v) if isinstance(v, (str, bool)) or v is None else f'{v:g}'}"
                 for k, v in self.params.items()]
        return ", ".join(parts + ([f"ops={self.ops}"] if self.ops != "plain" else [])) or "(defaults)"


def _as_range(raw: Any, where: str) -> Range:
    """A list is a choice, a scalar is fixed, a mapping is read by :meth:`Range.from_mapping`."""
    if isinstance(raw, Range):
        return raw
    if isinstance(raw, (list, tuple)):
        return Range.from_mapping({"choices": list(raw)}, where=where)
    if isinstance(raw, Mapping):
        return Range.from_mapping(raw, where=where)
    return Range.from_mapping({"choices": [raw]}, where=where)


def _builder(model: str) -> Any:
    """The model's registered builder, or None for ``torchvision:``/``timm:`` names (unchecked)."""
    if ":" in model:
        return None
    from darkknowledge.models import MODELS

    try:
        return MODELS.get(model)
    except RegistryError as exc:
        raise ConfigError(f"student space model {model!r}: {exc}") from None


@dataclass(frozen=True)
class StudentSpace:
    """The students a search may try: one model family, ranges over its builder parameters.

    Attributes:
        model: Registered model name, e.g. ``cnn1d``.
        params: ``{builder parameter: Range}``; a list or scalar is read as choices/fixed.
        ops: Operation kinds to choose between (a subset of :data:`OPS`); empty: ``plain`` only,
            not searched.

    Raises:
        ConfigError: An unknown model, parameter (all unknown ones listed, with the valid
            ones) or operation, a range the builder refuses at a bound or choice, or a
            parameter the data sets (``num_classes``, ``input_shape``).

    Example:
        >>> space = StudentSpace("cnn1d", {"channels": [8, 16], "depth": {"kind": "int", "low": 1, "high": 3}})
        >>> space.size()
        6
    """

    model: str
    params: Mapping[str, Any] = field(default_factory=dict)
    ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"student space model: expected a model name such as 'cnn1d', got {self.model!r}")
        if not isinstance(self.params, Mapping):
            raise ConfigError(f"student space params: expected a mapping of builder parameters to choices or "
                              f"ranges, got {type(self.params).__name__}")
        where = f"student space {self.model}.params"
        ranges = {str(k): _as_range(v, f"{where}.{k}") for k, v in self.params.items()}
        object.__setattr__(self, "params", ranges)
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops or ())
        bad = [o for o in ops if o not in OPS]
        if bad or len(set(ops)) != len(ops):
            raise ConfigError(f"student space ops {list(ops)!r}: each one of {', '.join(OPS)}, once"
                              + (f" ({', '.join(map(repr, bad))} unknown)" if bad else ""))
        object.__setattr__(self, "ops", ops)
        self._check_builder(ranges, where)

    def _check_builder(self, ranges: Mapping[str, Range], where: str) -> None:
        reserved = [k for k in ranges if k in DATA_PARAMS]
        if reserved:
            raise ConfigError(f"{where}: {', '.join(reserved)} set by the data, not searched; remove "
                              f"{'it' if len(reserved) == 1 else 'them'} from the space")
        builder = _builder(self.model)
        if builder is None:
            return
        fields = signature_fields(builder, exclude=DATA_PARAMS)
        unknown = [k for k in ranges if k not in fields]
        if unknown and not accepts_var_kwargs(builder):
            hints = "".join(did_you_mean(k, fields) for k in unknown[:1])
            raise ConfigError(f"{where}: unknown parameter{'s' * (len(unknown) > 1)} {', '.join(unknown)} of model "
                              f"{self.model!r}.{hints} Valid parameters: {', '.join(fields) or '(none)'}.")
        for key, rng in ranges.items():
            probes = list(rng.choices) if rng.kind == "choice" else list(rng.bounds())
            if rng.kind == "float":  # a float range on an int parameter fails between its bounds
                probes.append((float(rng.low) + float(rng.high)) / 2)
            for i, value in enumerate(probes):
                try:
                    validate_kwargs(builder, {key: value}, where=where, exclude=DATA_PARAMS)
                except ConfigError as exc:
                    if rng.kind == "float" and i == 2:
                        raise ConfigError(f"{exc}: a float range draws values between its bounds; for an integer "
                                          "parameter use kind: int or a list of choices") from None
                    raise

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "student space") -> StudentSpace:
        """Read ``{model, params, ops}`` (e.g. YAML); see the module docstring.

        Raises:
            ConfigError: Not a mapping, unknown keys (all listed), or an invalid space.
        """
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(SPACE_KEYS)}, got "
                              f"{type(raw).__name__} {raw!r:.80}")
        unknown = [str(k) for k in raw if k not in SPACE_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}."
                              f"{did_you_mean(unknown[0], SPACE_KEYS)} Valid keys: {', '.join(SPACE_KEYS)}.")
        if "model" not in raw:
            raise ConfigError(f"{where}: missing 'model' (the student family, e.g. model: cnn1d)")
        return cls(model=raw["model"], params=raw.get("params") or {}, ops=raw.get("ops") or ())

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_mapping` reads back (recorded in ``trials.json``)."""
        return {"model": self.model, "params": {k: r.to_dict() for k, r in self.params.items()},
                "ops": list(self.ops)}

    def _values(self, key: str) -> list[Any]:
        rng = self.params[key]
        if rng.kind == "choice":
            return list(rng.choices)
        if rng.kind == "int":
            return list(range(int(rng.low), int(rng.high) + 1))
        raise ConfigError(f"student space {self.model}.params.{key}: a float range [{rng.low}, {rng.high}] has no "
                          "grid; give choices (a list) or kind: int")

    def size(self) -> int | float:
        """How many distinct candidates the space holds (``math.inf`` with a float range)."""
        counts = {"choice": lambda r: len(r.choices), "int": lambda r: int(r.high) - int(r.low) + 1,
                  "float": lambda r: math.inf}
        return math.prod(counts[r.kind](r) for r in self.params.values()) * max(1, len(self.ops))

    def grid(self) -> Iterator[Candidate]:
        """Every candidate, parameters in their declared order, ``ops`` varying fastest.

        Raises:
            ConfigError: The space has a float range (no finite grid).
        """
        keys = list(self.params)
        axes = [self._values(k) for k in keys]
        for combo in itertools.product(*axes):
            for op in self.ops or ("plain",):
                yield Candidate(self.model, dict(zip(keys, combo)), op)

    def distributions(self) -> dict[str, Any]:
        """Optuna's distributions by parameter name (``params.<key>``, ``ops``): for replaying trials."""
        from optuna import distributions as d

        out: dict[str, Any] = {}
        for key, rng in self.params.items():
            if rng.kind == "choice":
                out[f"params.{key}"] = d.CategoricalDistribution(list(rng.choices))
            elif rng.kind == "int":
                out[f"params.{key}"] = d.IntDistribution(int(rng.low), int(rng.high), log=rng.log)
            else:
                out[f"params.{key}"] = d.FloatDistribution(float(rng.low), float(rng.high), log=rng.log)
        if self.ops:
            out["ops"] = d.CategoricalDistribution(list(self.ops))
        return out

    def sample(self, trial: Any) -> Candidate:
        """Draw one candidate with an optuna trial (``suggest_*`` on ``params.<key>`` and ``ops``)."""
        params: dict[str, Any] = {}
        for key, rng in self.params.items():
            name = f"params.{key}"
            if rng.kind == "choice":
                params[key] = trial.suggest_categorical(name, list(rng.choices))
            elif rng.kind == "int":
                params[key] = trial.suggest_int(name, int(rng.low), int(rng.high), log=rng.log)
            else:
                params[key] = trial.suggest_float(name, float(rng.low), float(rng.high), log=rng.log)
        op = trial.suggest_categorical("ops", list(self.ops)) if self.ops else "plain"
        return Candidate(self.model, params, op)

    def optuna_params(self, candidate: Candidate) -> dict[str, Any]:
        """``candidate`` as optuna's parameter mapping (inverse of :meth:`sample`)."""
        out = {f"params.{k}": v for k, v in candidate.params.items()}
        if self.ops:
            out["ops"] = candidate.ops
        return out

    def contains(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` is a point of this space."""
        return (candidate.model == self.model and set(candidate.params) == set(self.params)
                and all(self.params[k].contains(v) for k, v in candidate.params.items())
                and candidate.ops in (self.ops or ("plain",)))


def objective_value(record: Mapping[str, Any], name: str) -> float | None:
    """``record[name]``, else ``record["metrics"][name]`` (None when missing or not a finite number)."""
    v = record[name] if name in record else (record.get("metrics") or {}).get(name)
    return float(v) if is_number(v) else None


def pareto_front(records: Sequence[Mapping[str, Any]], objectives: Sequence[str] = ("accuracy", "latency_ms_b1"),
                 maximize: Sequence[str] = ("accuracy",)) -> list[dict]:
    """The non-dominated feasible records (Deb et al. 2002, Sec. III-A: Pareto domination).

    ``a`` dominates ``b`` when it is no worse in every objective and better in one (names in
    ``maximize`` higher is better, the others lower). Records with equal objective values do not
    dominate each other, so ties are all kept; a record of a candidate already listed
    (same ``candidate``, e.g. a reused trial) is skipped. With one objective the front is every
    record at the best value; with none, every feasible record.

    Args:
        records: Dicts with ``state`` (only ``complete`` ones count; default ``complete``) and each
            objective at the top level or under ``metrics``; a missing or non-finite value makes
            the record infeasible.
        objectives: Objective names.
        maximize: The names maximised.

    Returns:
        The front's records, in their input order.
    """
    if isinstance(objectives, str) or len(set(objectives)) != len(tuple(objectives)):
        raise ConfigError(f"pareto_front objectives {objectives!r}: expected a sequence of distinct names")
    rows, points, seen = [], [], set()
    for r in records:
        key = json.dumps(r["candidate"], sort_keys=True) if "candidate" in r else None
        vals = [objective_value(r, o) for o in objectives]
        if r.get("state", "complete") != "complete" or None in vals or (key is not None and key in seen):
            continue
        seen.add(key)
        rows.append(dict(r))
        points.append([-v if o in maximize else v for o, v in zip(objectives, vals)])  # all minimised
    p = np.asarray(points, dtype=np.float64).reshape(len(rows), len(objectives))  # (N, K)
    no_worse = (p[:, None, :] <= p[None, :, :]).all(-1)  # (N, N): [j, i] j no worse than i everywhere
    better = (p[:, None, :] < p[None, :, :]).any(-1)  # (N, N): [j, i] j better than i somewhere
    dominated = (no_worse & better).any(0)  # (N,)
    return [r for r, d in zip(rows, dominated) if not d]


def _pair_counts(x: Any, y: Any) -> tuple[float, float, float, float]:
    """Concordant pairs, discordant pairs, pairs untied in x, pairs untied in y (over i < j)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ShapeError(f"kendall_tau: x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ConfigError(f"kendall_tau: needs at least 2 pairs of values, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ConfigError("kendall_tau: x and y must be finite (a NaN or inf was given)")
    con = dis = tx = ty = 0.0
    for s in range(0, len(x), 1024):  # blocks of rows bound the memory at 1024 x N
        dx = np.sign(x[s:s + 1024, None] - x[None, :])  # (b, N)
        dy = np.sign(y[s:s + 1024, None] - y[None, :])  # (b, N)
        prod = dx * dy
        con, dis = con + (prod > 0).sum(), dis + (prod < 0).sum()
        tx, ty = tx + (dx != 0).sum(), ty + (dy != 0).sum()
    return float(con) / 2, float(dis) / 2, float(tx) / 2, float(ty) / 2  # each unordered pair was counted twice


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (Kendall, "The treatment of ties in ranking problems", Biometrika 1945).

    ``tau_b = (P - Q) / sqrt((n0 - n1) (n0 - n2))`` with ``P``/``Q`` the concordant/discordant
    pairs, ``n0 = n (n - 1) / 2`` and ``n1``/``n2`` the pairs tied in x/y. NaN when x or y is
    constant (as scipy.stats.kendalltau). O(n^2) time, O(1024 n) memory.

    Raises:
        ShapeError: x and y are not 1-D of one length.
        ConfigError: Fewer than 2 values, or a non-finite one.
    """
    con, dis, tx, ty = _pair_counts(x, y)
    return float("nan") if tx == 0 or ty == 0 else float((con - dis) / math.sqrt(tx * ty))


def _ties(v: np.ndarray) -> tuple[float, float, float]:
    """Sums over tie groups of size t: t(t-1), t(t-1)(t-2), t(t-1)(2t+5)."""
    t = np.unique(v, return_counts=True)[1].astype(np.float64)
    return float((t * (t - 1)).sum()), float((t * (t - 1) * (t - 2)).sum()), float((t * (t - 1) * (2 * t + 5)).sum())


TRUST_LEVELS = ((0.6, "trustworthy"), (0.3, "rough"))
"""tau_b cut-offs of :func:`proxy_trust`. Without ties tau = 2 P(a pair is ordered alike) - 1, so
0.6 means 80% of candidate pairs ordered as full training orders them and 0.3 means 65% (a coin
gives 50%): at 80% most of a proxy's front survives full training; at 65-80% it sorts out the
clearly bad but not neighbours. These are conventions, not from a paper."""


def proxy_trust(proxy_acc: Sequence[float], full_acc: Sequence[float], alpha: float = 0.05) -> dict[str, Any]:
    """How far a proxy's ranking of candidates matches full training's (the same candidates, in one order).

    Returns ``tau`` (:func:`kendall_tau`), ``n``, ``agreement`` (concordant / (concordant +
    discordant) pairs), ``z`` and two-sided ``p_value`` of tau = 0 by Kendall's normal
    approximation with ties (Kendall, "Rank Correlation Methods", 4th ed. 1970; scipy's
    ``method="asymptotic"``), and ``verdict``: ``inconclusive`` (p >= ``alpha``, or a constant
    input), else ``trustworthy`` (tau >= 0.6), ``rough`` (tau >= 0.3) or ``untrustworthy`` (see
    :data:`TRUST_LEVELS`), with ``reason`` in plain words.
    """
    if not (is_number(alpha) and 0 < alpha < 1):
        raise ConfigError(f"proxy_trust alpha: expected a significance level in (0, 1), e.g. 0.05, got {alpha!r}")
    con, dis, _, _ = _pair_counts(proxy_acc, full_acc)
    x, y = np.asarray(proxy_acc, dtype=np.float64), np.asarray(full_acc, dtype=np.float64)
    n, tau = len(x), kendall_tau(x, y)
    (a1, a2, a3), (b1, b2, b3) = _ties(x), _ties(y)
    m = n * (n - 1)
    var = (m * (2 * n + 5) - a3 - b3) / 18 + a1 * b1 / (2 * m) + (a2 * b2 / (9 * m * (n - 2)) if n > 2 else 0.0)
    z = (con - dis) / math.sqrt(var) if var > 0 else float("nan")
    p = math.erfc(abs(z) / math.sqrt(2)) if math.isfinite(z) else float("nan")
    agree = con / (con + dis) if con + dis else float("nan")
    out = {"tau": tau, "n": n, "agreement": agree, "z": z, "p_value": p}
    if not math.isfinite(tau):
        return {**out, "verdict": "inconclusive", "reason": "every candidate got the same accuracy from the proxy "
                "or from full training, so there is no ranking to compare"}
    if not p < alpha:
        return {**out, "verdict": "inconclusive", "reason": f"with {n} candidates a tau of {tau:.2f} can be chance "
                f"(p={p:.2g}); train more candidates fully to tell"}
    verdict = next((name for cut, name in TRUST_LEVELS if tau >= cut), "untrustworthy")
    what = {"trustworthy": "pick the front with it", "rough": "use it to drop clearly bad candidates, then train "
            "a wider front fully", "untrustworthy": "do not pick students with it"}[verdict]
    return {**out, "verdict": verdict, "reason": f"the proxy orders {agree:.0%} of candidate pairs as full training "
            f"does (tau {tau:.2f}, n={n}): {what}"}


__all__ = ["DATA_PARAMS", "OPS", "TRUST_LEVELS", "Candidate", "StudentSpace", "is_number", "kendall_tau",
           "objective_value", "pareto_front", "proxy_trust"]
