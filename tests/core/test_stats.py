"""opd_lab.core.stats: exact Student-t quantiles at every df and confidence intervals by hand."""

import math

import pytest

from opd_lab.core.stats import betainc, mean_ci95, t_cdf, t_quantile, t_quantile_975


def test_t_quantiles():
    # published 4-decimal table values; the normal 1.96 beyond df 30 was 2% too narrow at df 70 (1.9944)
    for df, t in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (10, 2.2281), (30, 2.0423), (31, 2.0395), (70, 1.9944),
                  (120, 1.9799), (1000, 1.9623)]:
        assert t_quantile_975(df) == pytest.approx(t, abs=5e-5), df
    assert t_quantile_975(10**7) == pytest.approx(1.959964, abs=1e-5)  # → the normal quantile
    assert math.isnan(t_quantile_975(0))
    assert t_quantile(0.025, 5) == pytest.approx(-t_quantile_975(5), rel=1e-12)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)


def test_t_cdf_and_incomplete_beta():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75, rel=1e-12)  # Cauchy: 1/2 + atan(1)/π
    assert t_cdf(-2.0, 2) == pytest.approx(0.5 * (1 - 2 / math.sqrt(6)), rel=1e-12)  # closed form at df 2
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, rel=1e-12)  # I_x(2, 3) = 1 − (1−x)^3 (1 + 3x)
    for q in (0.6, 0.9, 0.99, 0.999):
        assert t_cdf(t_quantile(q, 4.5), 4.5) == pytest.approx(q, rel=1e-12)


def test_mean_ci95_by_hand():
    mean, std, ci, n = mean_ci95([0.5, 0.7, 0.9])
    assert (mean, n) == (pytest.approx(0.7), 3)
    assert std == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / 2)
    assert ci == pytest.approx(4.302653 * 0.2 / math.sqrt(3))
    mean, std, ci, n = mean_ci95([0.4, float("nan"), None])
    assert (mean, n) == (pytest.approx(0.4), 1) and math.isnan(ci)
    assert mean_ci95([])[3] == 0
