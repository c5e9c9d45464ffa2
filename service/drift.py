"""How far a batch's scores are from the calibration normals: PSI, the KS statistic, a binomial tail.

The calibration scores are the manifest's (`calibration.scores`: every held-out normal's score, or
10,000 evenly spaced order statistics of them), so the comparison is against the very distribution the
threshold and the p-values come from, not against a summary of it. numpy only (no scipy): these few
formulas are short enough to state here, and a service-only install stays small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

PSI_BINS = 10
PSI_FLOOR = 1e-4
"""Smallest share a PSI bin counts with: an empty bin would make ln(a / e) infinite."""
SHARD_ALERT_P = 1e-3
"""A shard's edge-case count is called out when its binomial tail is this small (not chance)."""


@dataclass(frozen=True)
class PsiBin:
    """One PSI bin ``[low, high)``: the share of calibration (``expected``) and batch (``actual``) scores."""

    low: float
    high: float
    expected: float
    actual: float

    @property
    def term(self) -> float:
        """This bin's share of the PSI: (a - e) ln(a / e), both floored at PSI_FLOOR."""
        a, e = max(self.actual, PSI_FLOOR), max(self.expected, PSI_FLOOR)
        return (a - e) * math.log(a / e)


def psi_bins(calibration: npt.ArrayLike, scores: npt.ArrayLike, n_bins: int = PSI_BINS) -> list[PsiBin]:
    """Bins at the calibration scores' deciles (equal calibration mass), open at both ends.

    Edges are ``numpy.quantile`` (linear interpolation) of the calibration scores at 1/n .. (n-1)/n;
    repeated edges (ties) merge their bins. A score equal to an edge falls in the bin above it.
    """
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    batch = np.asarray(scores, dtype=np.float64)
    if cal.size == 0 or batch.size == 0:
        raise ValueError("PSI needs calibration scores and batch scores")
    edges = np.unique(np.quantile(cal, np.arange(1, n_bins) / n_bins))
    expected = np.bincount(np.searchsorted(edges, cal, side="right"), minlength=edges.size + 1) / cal.size
    actual = np.bincount(np.searchsorted(edges, batch, side="right"), minlength=edges.size + 1) / batch.size
    bounds = [-math.inf, *edges.tolist(), math.inf]
    return [
        PsiBin(bounds[i], bounds[i + 1], float(expected[i]), float(actual[i])) for i in range(edges.size + 1)
    ]


def psi(bins: list[PsiBin]) -> float:
    """Population stability index, sum over bins of (a - e) ln(a / e) (Siddiqi, "Credit Risk Scorecards")."""
    return float(sum(b.term for b in bins))


def psi_verdict(value: float) -> str:
    """The usual reading of a PSI: < 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a large one."""
    if value < 0.1:
        return "no significant shift"
    if value <= 0.25:
        return "moderate shift"
    return "large shift"


def ks_statistic(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D = max |F_a(x) - F_b(x)| and an x where it is reached.

    Exact for the empirical CDFs: both step functions only change at the pooled sample points, and
    ``searchsorted(side="right")`` gives F(x) = #{values <= x} / n at each of them.
    """
    sa = np.sort(np.asarray(a, dtype=np.float64))
    sb = np.sort(np.asarray(b, dtype=np.float64))
    if sa.size == 0 or sb.size == 0:
        raise ValueError("the KS statistic needs two non-empty samples")
    points = np.concatenate([sa, sb])
    gaps = np.abs(
        np.searchsorted(sa, points, side="right") / sa.size
        - np.searchsorted(sb, points, side="right") / sb.size
    )
    at = int(np.argmax(gaps))
    return float(gaps[at]), float(points[at])


def ks_p_value(d: float, n: int, m: int) -> float:
    """Asymptotic p-value of a two-sample KS statistic (Kolmogorov's distribution).

    Q(lambda) = 2 sum_{j>=1} (-1)^(j-1) exp(-2 j^2 lambda^2) with
    lambda = (sqrt(N) + 0.12 + 0.11 / sqrt(N)) D, N = n m / (n + m): Stephens' small-sample
    correction, as in Numerical Recipes' ``probks``.
    """
    if n < 1 or m < 1:
        raise ValueError("sample sizes must be positive")
    ne = n * m / (n + m)
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    if lam < 0.2:  # the series converges slowly there and Q is 1 to many digits
        return 1.0
    total, sign = 0.0, 1.0
    for j in range(1, 101):
        term = sign * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-12 * max(total, 1e-300):
            break
        sign = -sign
    return float(min(max(2.0 * total, 0.0), 1.0))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how surprising k edge cases in n frames are at a flag rate p.

    Sums the pmf from k to n in log space (one lgamma, then the ratio pmf(i+1)/pmf(i) =
    (n - i) / (i + 1) * p / (1 - p)), so it stays exact and finite for shards of millions of frames.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_first = (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )
    i = np.arange(k, n, dtype=np.float64)
    log_ratios = np.log(n - i) - np.log(i + 1) + math.log(p) - math.log1p(-p)
    log_pmf = log_first + np.concatenate([[0.0], np.cumsum(log_ratios)])
    top = float(log_pmf.max())
    return float(min(1.0, math.exp(top) * float(np.exp(log_pmf - top).sum())))
