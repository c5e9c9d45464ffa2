"""service/drift.py: PSI, the KS statistic and its p-value, the binomial tail, against hand computations
and (where installed) scipy's implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.drift import PSI_FLOOR, binomial_tail, ks_p_value, ks_statistic, psi, psi_bins, psi_verdict


def test_psi_bins_sit_at_the_calibration_deciles_with_exact_shares() -> None:
    calibration = np.arange(100, dtype=np.float64)  # deciles at 9.9, 19.8, ...: ten per bin
    bins = psi_bins(calibration, [0.0, 5.0, 50.0, 99.0])
    assert len(bins) == 10 and math.isinf(bins[0].low) and math.isinf(bins[-1].high)
    assert bins[0].high == pytest.approx(9.9) and bins[1].low == pytest.approx(9.9)
    assert [b.expected for b in bins] == [0.1] * 10
    assert [b.actual for b in bins] == [0.5, 0, 0, 0, 0, 0.25, 0, 0, 0, 0.25]


def test_psi_is_zero_for_the_same_distribution_and_the_hand_sum_otherwise() -> None:
    calibration = np.arange(100, dtype=np.float64)
    assert psi(psi_bins(calibration, calibration)) == pytest.approx(0.0, abs=1e-12)
    # Half the batch in the first bin, half in the last, eight empty bins floored at PSI_FLOOR.
    batch = [0.0] * 5 + [99.0] * 5
    hand = 2 * (0.5 - 0.1) * math.log(5) + 8 * (PSI_FLOOR - 0.1) * math.log(PSI_FLOOR / 0.1)
    assert psi(psi_bins(calibration, batch)) == pytest.approx(hand, rel=1e-12)
    assert psi_verdict(0.05) == "no significant shift" and psi_verdict(0.2) == "moderate shift"
    assert psi_verdict(hand) == "large shift"


def test_tied_calibration_scores_merge_bins_and_empty_bins_add_nothing() -> None:
    # Deciles of fifty 1s and fifty 2s: 1.0 (four times), 1.5, 2.0 (four times) -> three unique edges.
    bins = psi_bins([1.0] * 50 + [2.0] * 50, [1.0, 2.0])
    assert [(b.low, b.high) for b in bins] == [(-math.inf, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, math.inf)]
    assert [b.expected for b in bins] == [0.0, 0.5, 0.0, 0.5] == [b.actual for b in bins]
    assert psi(bins) == 0.0


def test_ks_statistic_is_the_largest_cdf_gap() -> None:
    d, at = ks_statistic([1, 2, 3, 4], [3, 4, 5, 6])
    assert (d, at) == (0.5, 2.0)  # at x = 2: F_a = 0.5, F_b = 0
    assert ks_statistic([1, 2], [1, 2]) == (0.0, 1.0)


def test_drift_numbers_agree_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=700), rng.normal(0.15, 1.1, size=400)
    d, _ = ks_statistic(a, b)
    assert d == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    assert ks_p_value(d, 700, 400) == pytest.approx(stats.ks_2samp(a, b, method="asymp").pvalue, rel=0.05)
    for k, n, p in [(3, 20, 0.05), (50, 2000, 0.01), (10, 10, 0.3), (300, 1_000_000, 0.0002)]:
        assert binomial_tail(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-8)


def test_binomial_tail_edges() -> None:
    assert binomial_tail(0, 10, 0.1) == 1.0
    assert binomial_tail(11, 10, 0.1) == 0.0
    assert binomial_tail(2, 2, 0.1) == pytest.approx(0.01)
    assert ks_p_value(0.0, 10, 10) == 1.0
    with pytest.raises(ValueError, match="p must be in"):
        binomial_tail(1, 10, 0.0)
