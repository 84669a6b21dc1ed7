"""The benchmark's statistics: mean ± sample std, Student-t quantiles, paired t-intervals."""

from __future__ import annotations

import math
import statistics

import pytest

from darkknowledge.errors import ConfigError
from darkknowledge.stats import betainc, mean_std, paired_ci, t_quantile

PROBS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999)


def test_mean_std_is_mean_and_sample_std():
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3), abs=1e-15)
    assert mean_std([7.25]) == (7.25, 0.0)
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)
    xs = [71.2, 70.9, 72.4, 69.8, 71.1]
    assert mean_std(xs) == pytest.approx((statistics.mean(xs), statistics.stdev(xs)), abs=1e-12)


def test_t_quantile_matches_closed_forms():
    # df=1 is the Cauchy distribution: tan(pi (p - 1/2)); df=2: (2p - 1) / sqrt(2 p (1 - p))
    for p in PROBS:
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10, abs=1e-12)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10, abs=1e-12)


def test_t_quantile_is_antisymmetric_and_monotone():
    for df in (1, 3, 9, 30):
        qs = [t_quantile(p, df) for p in PROBS]
        assert qs == sorted(qs) and len(set(qs)) == len(qs)
        for p in PROBS:
            assert t_quantile(p, df) == pytest.approx(-t_quantile(1 - p, df), abs=1e-9)
    assert t_quantile(0.5, 4) == 0.0
    # a large df approaches the normal quantile 1.959964
    assert t_quantile(0.975, 100_000) == pytest.approx(1.959963984540054, abs=1e-4)


def test_t_quantile_matches_scipy():
    sp = pytest.importorskip("scipy.stats")
    for df in range(1, 61):
        for p in PROBS:
            assert t_quantile(p, df) == pytest.approx(float(sp.t.ppf(p, df)), abs=1e-6), (p, df)
    for df in (1, 5, 60):  # far tails: relative precision
        for p in (1e-7, 1 - 1e-7):
            assert t_quantile(p, df) == pytest.approx(float(sp.t.ppf(p, df)), rel=1e-8)


def test_betainc_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b in ((0.5, 0.5), (0.5, 15.0), (30.0, 0.5), (2.0, 3.0)):
        for x in (0.0, 1e-6, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
            assert betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("p, df", [(0.0, 3), (1.0, 3), (-0.1, 3), (1.5, 3), (0.9, 0), (0.9, -2), (0.9, math.nan)])
def test_t_quantile_refuses_bad_input(p, df):
    with pytest.raises(ConfigError, match="t_quantile"):
        t_quantile(p, df)


def test_paired_ci_by_hand():
    a = {0: 72.0, 1: 71.0, 2: 73.5, 3: 70.0}
    b = {0: 70.0, 1: 71.0, 2: 72.0, 3: 70.5, 4: 99.0}  # seed 4 has no partner in a: left out
    ci = paired_ci(a, b)
    diffs = [2.0, 0.0, 1.5, -0.5]
    mean = sum(diffs) / 4  # 0.75
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)  # sqrt(4.25 / 3)
    assert t_quantile(0.975, 3) == pytest.approx(3.182446, abs=1e-6)  # the printed t-table value
    half = t_quantile(0.975, 3) * sd / math.sqrt(4)
    assert ci["n"] == 4 and ci["seeds"] == [0, 1, 2, 3]
    assert ci["mean_diff"] == pytest.approx(0.75, abs=1e-12)
    assert ci["std_diff"] == pytest.approx(math.sqrt(4.25 / 3), abs=1e-12)
    assert (ci["lo"], ci["hi"]) == pytest.approx((mean - half, mean + half), abs=1e-12)
    assert ci["lo"] == pytest.approx(0.75 - 3.182446 * 1.190238 / 2, abs=1e-5)
    assert ci["wins"] == 2 and ci["ties"] == 1
    # swapping the sides mirrors the interval and turns wins into losses
    rev = paired_ci(b, a)
    assert (rev["lo"], rev["hi"], rev["mean_diff"]) == pytest.approx((-ci["hi"], -ci["lo"], -0.75), abs=1e-12)
    assert rev["wins"] == 1 and rev["ties"] == 1


def test_paired_ci_level_widens_the_interval():
    a = {s: 70.0 + s * 0.7 + (s % 3) for s in range(6)}
    b = {s: 70.0 + s * 0.5 for s in range(6)}
    widths = [(c["hi"] - c["lo"]) for c in (paired_ci(a, b, level=lv) for lv in (0.5, 0.9, 0.95, 0.99))]
    assert widths == sorted(widths) and widths[0] > 0
    with pytest.raises(ConfigError, match="level"):
        paired_ci(a, b, level=95)


def test_paired_ci_with_too_few_pairs():
    one = paired_ci({0: 71.0, 1: None}, {0: 70.0, 1: 69.0, 2: 68.0})  # None values do not pair
    assert one["n"] == 1 and one["mean_diff"] == 1.0 and one["std_diff"] == 0.0 and one["wins"] == 1
    assert math.isnan(one["lo"]) and math.isnan(one["hi"])
    none = paired_ci({0: 71.0}, {1: 70.0})
    assert none["n"] == 0 and none["wins"] == 0 and math.isnan(none["mean_diff"]) and math.isnan(none["lo"])
