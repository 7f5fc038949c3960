"""opd_lab.core.stats: exact Student-t quantiles at every df and confidence intervals by hand."""

import math

import numpy as np
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


def test_paired_t_power_is_alpha_at_no_effect_and_matches_a_simulation():
    from opd_lab.core.stats import paired_t_power

    assert abs(paired_t_power(0.0, 1.0, 5) - 0.05) < 1e-6
    assert abs(paired_t_power(0.0, 0.3, 12, alpha=0.1) - 0.1) < 1e-6
    rng = np.random.default_rng(0)
    for n, effect in ((3, 2.0), (5, 1.5), (10, 0.6)):  # Monte Carlo of the test itself: 200k experiments
        x = rng.normal(effect, 1.0, (200_000, n))
        t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(n))
        simulated = float((np.abs(t) > t_quantile(0.975, n - 1)).mean())
        assert abs(paired_t_power(effect, 1.0, n) - simulated) < 0.005, (n, effect, simulated)
    assert paired_t_power(0.1, 0.0, 5) == 1.0 and np.isnan(paired_t_power(0.1, 1.0, 1))


def test_paired_t_power_at_two_pairs_by_closed_form():
    """n = 2 (ν = 1, U half-normal, where the density of U does not vanish at 0): at no effect the size is α, and
    against a huge effect the power is P(|Z + λ| > t_c U) → 1; an independent simulation at a middle effect."""
    from opd_lab.core.stats import paired_t_power

    assert abs(paired_t_power(0.0, 1.0, 2) - 0.05) < 1e-5
    assert paired_t_power(200.0, 1.0, 2) > 0.99
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 1.0, (400_000, 2))
    t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(2))
    assert abs(paired_t_power(5.0, 1.0, 2) - float((np.abs(t) > t_quantile(0.975, 1)).mean())) < 0.003


def test_min_detectable_effect_and_seeds_needed():
    from opd_lab.core.stats import min_detectable_effect, paired_t_power, seeds_needed

    # tabulated paired-t sample sizes (α = 0.05 two-sided, 80% power): n = 5 detects d_z ≈ 1.68 (G*Power)
    assert abs(min_detectable_effect(1.0, 5) - 1.68) < 0.01
    assert abs(paired_t_power(min_detectable_effect(0.07, 5), 0.07, 5) - 0.8) < 1e-4
    assert abs(min_detectable_effect(0.07, 5) / 0.07 - min_detectable_effect(1.0, 5)) < 1e-4  # scales with the std
    # large n: the normal approximation (z_0.975 + z_0.8) s / √n
    assert abs(min_detectable_effect(1.0, 2000) * np.sqrt(2000) - (1.959964 + 0.841621)) < 0.01
    assert min_detectable_effect(0.0, 5) == 0.0 and np.isnan(min_detectable_effect(1.0, 1))
    n = seeds_needed(0.018, 0.05)
    assert paired_t_power(0.018, 0.05, n) >= 0.8 > paired_t_power(0.018, 0.05, n - 1)
    assert seeds_needed(0.018, 0.05) == seeds_needed(-0.018, 0.05)
    with pytest.raises(ValueError, match="zero effect"):
        seeds_needed(0.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        seeds_needed(0.018, float("nan"))
    assert seeds_needed(1.0, 1.0, max_n=8) == 9  # more than max_n: max_n + 1, never beyond
    assert seeds_needed(1.0, 1.0) == 10
