"""How student candidates compare: the Pareto front, and whether a proxy ranks them as full training does.

:func:`pareto_front` (Pareto domination, Deb et al., "NSGA-II", IEEE TEVC 2002, Sec. III-A) and,
for whether a cheap proxy ranks candidates as full training does, :func:`kendall_tau` (tau-b)
and :func:`proxy_trust`. Inputs are plain numbers (no tensors); records are those of
:func:`darkknowledge.bench.student_search.search_students`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from darkknowledge.bench.candidates import is_number
from darkknowledge.errors import ConfigError, ShapeError


def objective_value(record: Mapping[str, Any], name: str) -> float | None:
    """``record[name]``, else ``record["metrics"][name]`` (None when missing or not a finite number)."""
    v = record[name] if name in record else (record.get("metrics") or {}).get(name)
    return float(v) if is_number(v) else None


def pareto_front(
    records: Sequence[Mapping[str, Any]],
    objectives: Sequence[str] = ("accuracy", "latency_ms_b1"),
    maximize: Sequence[str] = ("accuracy",),
) -> list[dict]:
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
        vals = [v for o in objectives if (v := objective_value(r, o)) is not None]
        if r.get("state", "complete") != "complete" or len(vals) < len(objectives) or (key is not None and key in seen):
            continue
        seen.add(key)
        rows.append(dict(r))
        points.append([-v if o in maximize else v for o, v in zip(objectives, vals)])  # all minimised
    p = np.asarray(points, dtype=np.float64).reshape(len(rows), len(objectives))  # (N, K)
    no_worse = (p[:, None, :] <= p[None, :, :]).all(-1)  # (N, N): [j, i] j no worse than i everywhere
    better = (p[:, None, :] < p[None, :, :]).any(-1)  # (N, N): [j, i] j better than i somewhere
    dominated = np.asarray((no_worse & better).any(axis=0))  # (N,)
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
        dx = np.sign(x[s : s + 1024, None] - x[None, :])  # (b, N)
        dy = np.sign(y[s : s + 1024, None] - y[None, :])  # (b, N)
        prod = dx * dy
        con, dis = con + (prod > 0).sum(), dis + (prod < 0).sum()
        tx, ty = tx + (dx != 0).sum(), ty + (dy != 0).sum()
    return float(con) / 2, float(dis) / 2, float(tx) / 2, float(ty) / 2  # each unordered pair was counted twice


def kendall_tau(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
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
        return {
            **out,
            "verdict": "inconclusive",
            "reason": "every candidate got the same accuracy from the proxy "
            "or from full training, so there is no ranking to compare",
        }
    if not p < alpha:
        return {
            **out,
            "verdict": "inconclusive",
            "reason": f"with {n} candidates a tau of {tau:.2f} can be chance "
            f"(p={p:.2g}); train more candidates fully to tell",
        }
    verdict = next((name for cut, name in TRUST_LEVELS if tau >= cut), "untrustworthy")
    what = {
        "trustworthy": "pick the front with it",
        "rough": "use it to drop clearly bad candidates, then train a wider front fully",
        "untrustworthy": "do not pick students with it",
    }[verdict]
    return {
        **out,
        "verdict": verdict,
        "reason": f"the proxy orders {agree:.0%} of candidate pairs as full training "
        f"does (tau {tau:.2f}, n={n}): {what}",
    }
