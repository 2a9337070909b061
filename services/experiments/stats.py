"""The statistics of ``ddk compare``: paired differences over seeds with a t-interval, the claims they allow,
and the area under a ratio-vs-tokens curve. Pure, standard library only.

Paired: run ``a`` and run ``b`` of the same seed share the initial student, the data order's seed and the
held-out blocks, so their difference d_s = metric(a, s) - metric(b, s) removes what the seed does to both.
Over n seeds, the 95% interval of the mean difference is mean(d) ± t(0.975, n - 1) · sd(d) / sqrt(n) (sd
with n - 1). A claim is worded only when that interval excludes 0; with fewer than 2 seeds there is no
interval and no claim. Lower ratios are better, so a negative difference means ``a`` is better; for task
accuracy higher is better, so there a positive difference does.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


def t_abs_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer ``df`` >= 1 (Abramowitz & Stegun 26.7.3-4, exact)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df: must be an integer >= 1, got {df!r}")
    t = abs(t)
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2 == 1:
        total, term = (c if df > 1 else 0.0), c
        for j in range(3, df - 1, 2):
            term *= c * c * (j - 1) / j
            total += term
        return min(1.0, 2.0 / math.pi * (theta + s * total))
    total, term = 1.0, 1.0
    for j in range(2, df - 1, 2):
        term *= c * c * (j - 1) / j
        total += term
    return min(1.0, s * total)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (p in (0.5, 1)), e.g. t_quantile(0.975, 4) = 2.776; by bisection on
    :func:`t_abs_cdf` to double precision."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"p: must be in (0.5, 1), got {p!r}")
    level = 2.0 * p - 1.0  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while t_abs_cdf(hi, df) < level:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        if t_abs_cdf(mid, df) < level:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Mean of a[i] - b[i] with its two-sided t-interval: ``{"n", "mean", "sd", "low", "high", "excludes_zero"}``
    (``sd``, ``low`` and ``high`` None with fewer than 2 pairs; ``excludes_zero`` then False)."""
    if len(a) != len(b) or not a:
        raise ValueError("a, b: need the same, non-zero number of paired values")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n, mean = len(d), statistics.fmean(d)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "low": None, "high": None, "excludes_zero": False}
    sd = statistics.stdev(d)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return {"n": n, "mean": mean, "sd": sd, "low": low, "high": high, "excludes_zero": low > 0 or high < 0}


def claim(diff: Mapping, a: str, b: str, what: str, higher_is_better: bool = False) -> str:
    """The sentence a paired difference allows (lower is better, as for ratios): "a beats b on the mean" only when
    the interval is below 0, "b beats a ..." when above, else "no difference measurable at N seeds".
    ``higher_is_better`` (accuracy): "a beats b" when the interval is above 0."""
    n = diff["n"]
    if diff["excludes_zero"]:
        a_better = diff["low"] > 0 if higher_is_better else diff["high"] < 0
        return f"{a} beats {b} on {what}" if a_better else f"{b} beats {a} on {what}"
    return f"no difference measurable at {n} seed{'s' if n != 1 else ''}"


def trapezoid_area(points: Sequence[Sequence[float]]) -> float:
    """Area under y(x) by the trapezoid rule over points (x, y) sorted by x; 0 for fewer than 2 points."""
    pts = sorted((float(x), float(y)) for x, y in points)
    return sum((x1 - x0) * (y0 + y1) / 2.0 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))


def mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Point-wise mean of curves [(x, y), ...] that share their evaluation points (the same steps), cut to the
    shortest: [[mean x, mean y], ...]."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [[statistics.fmean(float(c[i][0]) for c in curves), statistics.fmean(float(c[i][1]) for c in curves)]
            for i in range(n)]
