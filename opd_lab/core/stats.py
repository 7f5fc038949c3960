"""Confidence intervals over seeds, questions and paired runs (exact Student-t quantiles, no SciPy).

The 95% interval of a mean of n values is ``mean ± t_{0.975, n−1} · s / √n``. The t quantile is computed
exactly at every df (not the normal 1.96 beyond a table), from the Student-t CDF

    F(t; ν) = 1 − ½ I_{ν/(ν+t²)}(ν/2, ½)      (t ≥ 0)

with the regularised incomplete beta function I_x(a, b) evaluated by its continued fraction (modified Lentz),
inverted by bisection to double precision.

Power (how small a paired difference the seeds could detect): the two-sided paired t test of n differences with
sample std s rejects "mean 0" at level α when |T| > t_{1−α/2, ν}, ν = n − 1. For a true mean difference Δ,
T = (Z + λ) / U is noncentral t with λ = Δ √n / s (s is the population std, estimated by the sample std), Z ~ N(0, 1)
and U = √(χ²_ν / ν) independent, so

    power(Δ) = E_U[ Φ(−t_c U + λ) + Φ(−t_c U − λ) ],    t_c = t_{1−α/2, ν}

(:func:`paired_t_power`, by quadrature over the density of U, within ~1e-5 at every ν ≥ 1). The minimum
detectable effect (:func:`min_detectable_effect`) is the Δ with power(Δ) = 0.8 (bisection); :func:`seeds_needed` is
the smallest n that detects a given Δ at that power with the same spread.
"""

from __future__ import annotations

import math

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (converges for x < (a + 1) / (a + b + 2))."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"need 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the 95% two-sided Student-t quantile (``nan`` for df < 1)."""
    return t_quantile(0.975, df) if df >= 1 else math.nan


def mean_ci95(values) -> tuple[float, float, float, int]:
    """(mean, sample std, 95% CI half-width t·s/√n, n) of the finite values; CI is ``nan`` for n < 2."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, 1
    std = float(x.std(ddof=1))
    return mean, std, t_quantile_975(n - 1) * std / math.sqrt(n), n


_NODES = 8_001  # quadrature nodes over U: power within 2e-6 of a 100× finer grid (ν = 1 … 1000)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def paired_t_power(effect: float, std: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided level-``alpha`` paired t test of ``n`` differences with std ``std`` against a true
    mean difference ``effect`` (noncentral t, module docstring); ``nan`` for n < 2. With ``std`` = 0 the test is
    decided by the sign alone: power 1 for a nonzero effect, ``alpha`` for none."""
    if n < 2 or not np.isfinite(std):
        return math.nan
    if std == 0.0:
        return 1.0 if effect != 0.0 else alpha
    nu = n - 1
    lam = abs(effect) * math.sqrt(n) / std
    t_c = t_quantile(1.0 - alpha / 2.0, nu)
    u = np.linspace(0.0, 1.0 + 12.0 / math.sqrt(nu), _NODES)  # the density of U vanishes well before the end
    with np.errstate(divide="ignore"):  # u = 0: u^(ν−1) is 1 at ν = 1 (U is half-normal), 0 above
        power_term = 0.0 if nu == 1 else (nu - 1.0) * np.log(u)
    f = np.exp(math.log(2.0) + (nu / 2.0) * math.log(nu / 2.0) - math.lgamma(nu / 2.0) + power_term - nu * u * u / 2.0)
    g = _normal_cdf(-t_c * u + lam) + _normal_cdf(-t_c * u - lam)
    return float(np.trapezoid(f * g, u) / np.trapezoid(f, u))


def min_detectable_effect(std: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference that a two-sided level-``alpha`` paired t test of ``n`` differences with
    std ``std`` detects with probability ``power`` (``nan`` for n < 2; 0 for ``std`` = 0)."""
    if n < 2 or not np.isfinite(std):
        return math.nan
    if std == 0.0:
        return 0.0
    lo, hi = 0.0, std
    while paired_t_power(hi, std, n, alpha) < power:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if paired_t_power(mid, std, n, alpha) < power else (lo, mid)
        if hi - lo <= 1e-6 * std:
            break
    return 0.5 * (lo + hi)


def seeds_needed(effect: float, std: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 100_000) -> int:
    """The smallest number of paired seeds whose t test detects ``effect`` with probability ``power`` when the
    differences have std ``std`` (0 ≤ std; ``effect`` ≠ 0); ``max_n`` + 1 if even ``max_n`` seeds would not."""
    if not (math.isfinite(effect) and math.isfinite(std) and std >= 0):
        raise ValueError(f"seeds_needed: need a finite effect and a finite std >= 0, got {effect}, {std}")
    if effect == 0.0:
        raise ValueError("seeds_needed: a zero effect is never detected with power above alpha")
    if std == 0.0:
        return 2
    lo, hi = 2, 2  # power grows with n: double, then bisect
    while paired_t_power(effect, std, hi, alpha) < power:
        if hi > max_n:
            return max_n + 1
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if paired_t_power(effect, std, mid, alpha) < power else (lo, mid)
    return min(lo, max_n + 1)
