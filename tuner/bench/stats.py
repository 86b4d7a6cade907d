"""The bench's statistics, pure functions on plain numbers (no I/O, no third-party imports).

A claimed ratio comes from paired, interleaved runs: configuration A and B run in the same round, the
per-round log-ratio ln(A/B) is the paired difference, and its 95 % t-interval, transformed back, is the
interval of the geometric-mean ratio. A target holds only when the interval's lower bound clears it.
Rates (OOM kills, collapses) get Wilson score intervals: with 0 of 5 the upper bound is 43 %, which is
what "0 OOM kills in 5 runs" can honestly claim.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from typing import Any

# Student t, two-sided 95 % (the 0.975 quantile), by degrees of freedom; exact to 3 decimals.
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}
Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table; between rows the next lower
    row, which is wider, so an interval is never narrower than it should be)."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df}: allowed: ≥ 1")
    if df in _T975:
        return _T975[df]
    if df > 120:
        return Z975
    return _T975[max(k for k in _T975 if k < df)]


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom: 1 − I_x(df/2, 1/2)/2 with x = df/(df + t²)."""
    a, b, x = df / 2, 0.5, df / (df + t * t)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        tail = front * _beta_fraction(a, b, x) / a
    else:
        tail = 1 - front * _beta_fraction(b, a, 1 - x) / b
    return 1 - tail / 2 if t >= 0 else tail / 2


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The `p` quantile (0.5 < p < 1) of Student's t with `df` degrees of freedom, by bisection to 1e-9."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t quantile p={p}, df={df}: allowed: 0.5 < p < 1, df ≥ 1")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-9:
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return high


def paired_ratio(pairs: Sequence[tuple[float, float]], level: float = 0.95) -> dict[str, Any]:
    """Geometric-mean ratio a/b over paired runs with its t-interval on the log scale (95 % unless `level`
    says otherwise). `pairs` are (a, b) from the same round, both > 0. Fewer than 2 pairs: the estimate
    without an interval."""
    logs = [math.log(a / b) for a, b in pairs if a > 0 and b > 0]
    n = len(logs)
    if n == 0:
        return {"n": 0, "ratio": None, "low": None, "high": None}
    mean = statistics.fmean(logs)
    if n < 2:
        return {"n": 1, "ratio": round(math.exp(mean), 3), "low": None, "high": None}
    t = t975(n - 1) if level == 0.95 else t_quantile((1 + level) / 2, n - 1)
    half = t * statistics.stdev(logs) / math.sqrt(n)
    return {"n": n, "ratio": round(math.exp(mean), 3), "low": round(math.exp(mean - half), 3),
            "high": round(math.exp(mean + half), 3)}


def wilson(successes: int, n: int) -> dict[str, Any]:
    """Wilson score 95 % interval of a rate."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "low": None, "high": None}
    p = successes / n
    z2 = Z975 * Z975
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {"k": successes, "n": n, "rate": round(p, 3), "low": round(max(0.0, centre - half), 3),
            "high": round(min(1.0, centre + half), 3)}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def holds(interval: dict[str, Any], target: float) -> bool | None:
    """Whether a target is met: the interval's lower bound clears it. None: no interval to decide with."""
    return None if interval.get("low") is None else interval["low"] >= target


def histogram_percentile(counts: Sequence[int], q: float, bin_ms: float) -> float | None:
    """The q-th percentile of a histogram with `bin_ms` wide bins (the last bin open-ended): the upper edge
    of the bin that holds it, so it never understates a frame time."""
    total = sum(counts)
    if total == 0:
        return None
    want = math.ceil(total * q / 100)
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= want:
            return (i + 1) * bin_ms
    return len(counts) * bin_ms
