"""The latency model's pure-number pieces: affine fit, de-noising, random mixed architectures."""
import numpy as np
import pytest

from planner.algorithms import latency


def test_affine_fit_recovers_exact_map():
    x = np.array([0.1, 0.05, 0.03, 0.02])
    y = 0.004 + 0.95 * x
    off, sc = latency.affine_fit(x, y)
    assert off == pytest.approx(0.004, abs=1e-12) and sc == pytest.approx(0.95, abs=1e-10)
    assert latency.loo_max_rel_error(x, y) < 1e-9


def test_affine_fit_minimises_relative_error():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.02, 0.1, 12)
    y = x * rng.uniform(0.9, 1.1, 12)
    off, sc = latency.affine_fit(x, y)
    best = np.sum(((off + sc * x) / y - 1) ** 2)
    for d_off, d_sc in [(1e-4, 0), (-1e-4, 0), (0, 1e-3), (0, -1e-3)]:      # any move is worse
        assert np.sum(((off + d_off + (sc + d_sc) * x) / y - 1) ** 2) > best


def test_isotonic_is_the_least_squares_monotone_fit():
    y = np.array([1.0, 3.0, 2.0, 4.0, 3.5, 5.0])
    iso = latency.isotonic(y)
    assert np.all(np.diff(iso) >= 0)
    assert iso.sum() == pytest.approx(y.sum())                  # PAV preserves the total
    assert np.allclose(iso, [1.0, 2.5, 2.5, 3.75, 3.75, 5.0])
    assert np.allclose(latency.isotonic([1, 2, 3]), [1, 2, 3])


def test_smooth_curve_removes_noise_and_keeps_removed_module():
    rng = np.random.default_rng(1)
    w = np.array([0, *range(32, 1537, 32)])
    true = np.where(w > 0, 0.2e-3 + 9e-6 * w, 0.0)
    noisy = true + np.where(w > 0, rng.normal(0, 0.5e-3, len(w)), 0.0)
    sm = latency.smooth_curve(w, noisy, 4)
    assert sm[0] == 0.0
    assert np.all(np.diff(sm) >= 0)
    assert np.abs(sm - true).mean() < 0.5 * np.abs(noisy - true).mean()
    raw = latency.smooth_curve(w, noisy, 0)                      # no smoothing: only made monotone
    assert np.all(np.diff(raw) >= 0) and np.abs(raw - noisy).max() < 2e-3


def test_mixed_architectures_span_range_and_stay_on_grid():
    grid = [0, *range(32, 1537, 32)]
    archs = latency.mixed_architectures(6, 12, grid, 8, seed=0)
    assert len(archs) == 8 and all(len(a) == 6 for a in archs)
    for a in archs:
        assert all(0 <= l["heads"] <= 12 and l["ffn"] in grid for l in a)
    kept = [np.mean([l["ffn"] for l in a]) / 1536 for a in archs]
    assert kept[0] < 0.3 and kept[-1] > 0.7                       # from heavy to light compression
    assert archs == latency.mixed_architectures(6, 12, grid, 8, seed=0)      # deterministic
