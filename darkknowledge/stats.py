"""Statistics of the benchmark tables: mean ± sample std, Student-t quantiles, paired t-intervals.

Pure Python (no scipy at run time). The t quantile inverts the regularized incomplete beta
function, evaluated by its continued fraction (Lentz's method) and solved by Newton steps
kept inside a shrinking bisection bracket.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, cast

from darkknowledge.errors import ConfigError

_EPS = 1e-16  # relative precision of the continued fraction
_TINY = 1e-300  # keeps Lentz's denominators away from zero


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1`` in the denominator).

    Args:
        values: The numbers.

    Returns:
        ``(mean, std)``: std is ``0.0`` for one value; both are ``nan`` for none.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, 0.0
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var)


def _beta_cf(x: float, a: float, b: float) -> float:
    """Continued fraction of the incomplete beta function (converges fast for ``x < (a+1)/(a+b+2)``)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    return h  # pragma: no cover - the fraction converges in far fewer steps for the t distribution


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_cf(1.0 - x, b, a) / b


def _betainc_inverse(a: float, b: float, target: float) -> float:
    """The ``x`` in ``(0, 1)`` with ``I_x(a, b) = target`` (``0 < target < 1``)."""
    lo, hi = 0.0, 1.0
    x = 0.5
    log_b = _log_beta(a, b)
    for _ in range(400):
        f = betainc(a, b, x) - target
        if f == 0.0:
            return x
        if f < 0.0:
            lo = x
        else:
            hi = x
        # Newton step on I_x: its derivative is the beta density x^(a-1) (1-x)^(b-1) / B(a, b)
        dens = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_b)
        step = x - f / dens if dens > 0.0 and math.isfinite(dens) else math.nan
        nxt = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(nxt - x) <= 2 * math.ulp(x) or hi - lo <= 2 * math.ulp(hi):
            return nxt
        x = nxt
    return x  # pragma: no cover - Newton inside the bracket converges in tens of steps


def t_quantile(p: float, df: float) -> float:
    """Inverse CDF of Student's t distribution with ``df`` degrees of freedom.

    Args:
        p: Probability, ``0 < p < 1``.
        df: Degrees of freedom, ``> 0`` (an integer for the tables: ``n - 1``).

    Returns:
        The ``t`` with ``P(T <= t) = p``.

    Raises:
        ConfigError: ``p`` outside ``(0, 1)`` or ``df <= 0``.
    """
    if not (isinstance(p, (int, float)) and 0.0 < p < 1.0):
        raise ConfigError(f"t_quantile: p={p!r} must be a probability strictly between 0 and 1")
    if not (isinstance(df, (int, float)) and math.isfinite(df) and df > 0):
        raise ConfigError(f"t_quantile: df={df!r} must be a positive number of degrees of freedom")
    if p == 0.5:
        return 0.0
    upper = max(p, 1.0 - p)  # solve for the upper tail, then restore the sign
    tail = 2.0 * (1.0 - upper)  # P(|T| > t)
    if tail < 0.5:
        # P(|T| > t) = I_x(df/2, 1/2) with x = df / (df + t^2); x is small, so 1 - x stays precise
        x = _betainc_inverse(df / 2.0, 0.5, tail)
        t = math.sqrt(df * (1.0 - x) / x)
    else:
        # P(|T| < t) = I_y(1/2, df/2) with y = t^2 / (df + t^2); y is small, so t stays precise
        y = _betainc_inverse(0.5, df / 2.0, 1.0 - tail)
        t = math.sqrt(df * y / (1.0 - y))
    return t if p > 0.5 else -t


def paired_ci(a: Mapping[Hashable, float | None], b: Mapping[Hashable, float | None], level: float = 0.95) -> dict:
    """Paired differences ``a[seed] - b[seed]`` over the seeds both hold, with a t-interval.

    Args:
        a: Seed -> value of the method (``None`` values are left out).
        b: Seed -> value of the reference, e.g. the baseline.
        level: Confidence level of the interval, ``0 < level < 1``.

    Returns:
        ``{"mean_diff", "lo", "hi", "n", "wins", "ties", "std_diff", "seeds"}``: ``wins`` counts
        seeds with ``a > b``, ``ties`` seeds with ``a == b``; ``std_diff`` is the sample std of
        the differences. ``lo``/``hi`` are ``nan`` for fewer than two pairs (mean and std ``nan``
        for none).

    Raises:
        ConfigError: ``level`` outside ``(0, 1)``.
    """
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise ConfigError(f"paired_ci: level={level!r} must be strictly between 0 and 1, e.g. 0.95")
    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    try:
        cast("list[Any]", seeds).sort()  # seeds of one type sort
    except TypeError:  # seeds of mixed types keep a's order
        pass
    diffs = [float(a[s]) - float(b[s]) for s in seeds]  # type: ignore[arg-type]  # None values are left out above
    n = len(diffs)
    mean, std = mean_std(diffs)
    lo = hi = math.nan
    if n >= 2:
        half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
        lo, hi = mean - half, mean + half
    return {
        "mean_diff": mean,
        "lo": lo,
        "hi": hi,
        "n": n,
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "std_diff": std,
        "seeds": seeds,
    }
