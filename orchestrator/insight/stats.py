"""Means and 95 % confidence intervals from SQL sums, without scipy.

An interval is ``mean ± t(0.975, n - 1) · s / √n`` (Student t, two-sided 95 %), where the
sample standard deviation ``s`` comes from the count, the sum and the sum of squares that
:mod:`orchestrator.insight.aggregates` computes in SQL. The t quantile is read from a table
for 1 to 30 degrees of freedom (exact to 9 digits) and, above 30, from the Cornish-Fisher
expansion of the t quantile around the normal one (terms to 1/df⁴: within 3e-8 of the exact
value at 31 degrees of freedom, closer beyond).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Summary", "summarize", "t_quantile_975"]

_Z_975 = 1.959963984540054
"""The 0.975 quantile of the standard normal distribution."""

_T_975 = (
    12.706204736,
    4.302652730,
    3.182446305,
    2.776445105,
    2.570581836,
    2.446911851,
    2.364624252,
    2.306004135,
    2.262157163,
    2.228138852,
    2.200985160,
    2.178812830,
    2.160368656,
    2.144786688,
    2.131449546,
    2.119905299,
    2.109815578,
    2.100922040,
    2.093024054,
    2.085963447,
    2.079613845,
    2.073873068,
    2.068657610,
    2.063898562,
    2.059538553,
    2.055529439,
    2.051830516,
    2.048407142,
    2.045229642,
    2.042272456,
)
"""t(0.975, df) for df = 1 .. 30."""


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1 or more): the
    multiplier of the standard error in a two-sided 95 % interval."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df must be 1 or more, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    n = float(df)
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * n**4)
    )


@dataclass(frozen=True, slots=True)
class Summary:
    """A sample's size, mean, standard deviation and 95 % confidence interval of the mean
    (``None`` where the sample is too small: no mean without values, no spread or interval
    with one)."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def half_width(self) -> float | None:
        """Half the interval's width (``t · s / √n``)."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2


def summarize(
    n: int,
    total: float | None,
    total_squares: float | None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Summary:
    """The :class:`Summary` of ``n`` values from their sum and sum of squares.

    The variance ``(Σx² - (Σx)²/n) / (n - 1)`` is clamped at 0 (rounding can make it
    slightly negative when every value is equal)."""
    if n <= 0 or total is None:
        return Summary(0, None, None, None, None, minimum, maximum)
    mean = total / n
    if n == 1 or total_squares is None:
        return Summary(n, mean, None, None, None, minimum, maximum)
    variance = max(0.0, (total_squares - total * total / n) / (n - 1))
    if minimum is not None and maximum is not None and minimum == maximum:
        variance = 0.0
    std = math.sqrt(variance)
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, minimum, maximum)
