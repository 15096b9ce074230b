"""The additive latency model and its correction, as pure numbers (no model, no timing).

The planner predicts a model's time as constant + Σ_layers (attn(h_l) + ffn(w_l)). Module times measured one
kind at a time (every block's attention at h heads, the rest dense) are not exactly additive across kinds and
layers: on a 2-core CPU at batch 8, removing attention and FFN together saves less than the two savings
added (the timed all-removed MiniLM takes 9% of the dense time, the additive model says ~0%). The error grows
with compression (+2% at 1.5x, +8% at 3x).

The fix is empirical and cheap: time a few random *mixed* architectures next to the dense model, and fit
    measured ≈ offset + scale · additive
by least squares on the relative error (the dense model is one of the points). Because the map is affine,
it folds into the profile: every module time is multiplied by `scale` and the constant becomes
offset + scale · constant, so the solver still sees a separable sum and stays exact.
"""
from __future__ import annotations

import random

import numpy as np


def mixed_architectures(n_layers: int, n_heads: int, ffn_grid: list[int], n: int, seed: int = 0) -> list[list[dict]]:
    """`n` random per-layer (heads, ffn) choices whose overall kept fraction spans ~0.1..0.9.

    Each architecture draws a mean keep fraction p (evenly spread over the n variants, so predicted speedups
    cover the range plans land in) and every layer keeps p·U(0.3, 1.7) of each kind, clipped; FFN widths snap
    to the profiled grid. Returns [[{"heads": h, "ffn": w}, ...per layer], ...per architecture].
    """
    rng = random.Random(seed)
    grid = np.asarray(sorted(ffn_grid))
    dense_ffn = int(grid[-1])
    out = []
    for i in range(n):
        p = 0.1 + 0.8 * (i + 0.5) / max(n, 1)
        layers = []
        for _ in range(n_layers):
            h = int(round(min(max(p * rng.uniform(0.3, 1.7), 0.0), 1.0) * n_heads))
            w_target = min(max(p * rng.uniform(0.3, 1.7), 0.0), 1.0) * dense_ffn
            w = int(grid[np.argmin(np.abs(grid - w_target))])
            layers.append({"heads": h, "ffn": w})
        out.append(layers)
    return out


def affine_fit(additive, measured) -> tuple[float, float]:
    """(offset, scale) minimising Σ ((offset + scale·additive_i) / measured_i − 1)²; needs ≥ 2 points.

    additive, measured: [n] seconds.
    """
    x = np.asarray(additive, dtype=float)
    y = np.asarray(measured, dtype=float)
    if len(x) < 2:
        raise ValueError("an affine fit needs at least 2 points")
    a = np.stack([1.0 / y, x / y], axis=1)          # [n, 2]: rows scaled by 1/y -> relative residuals
    (offset, scale), *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
    return float(offset), float(scale)


def max_rel_error(pred, measured) -> float:
    pred, measured = np.asarray(pred, dtype=float), np.asarray(measured, dtype=float)
    return float(np.max(np.abs(pred / measured - 1))) if len(pred) else 0.0


def loo_max_rel_error(additive, measured) -> float:
    """Largest relative error of the affine fit on each point when that point is left out of the fit."""
    x, y = np.asarray(additive, dtype=float), np.asarray(measured, dtype=float)
    if len(x) < 3:
        return float("nan")
    errs = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        off, sc = affine_fit(x[keep], y[keep])
        errs.append(abs((off + sc * x[i]) / y[i] - 1))
    return float(max(errs))


def isotonic(y) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators). y: [n]."""
    blocks = []                                   # [sum, count] per pooled block
    for v in np.asarray(y, dtype=float):
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return np.concatenate([np.full(c, s / c) for s, c in blocks])


def smooth_curve(widths, times, halfwidth: int) -> np.ndarray:
    """Module time vs kept width with the timing noise taken out: local linear regression over ±halfwidth grid
    points, then a non-decreasing fit; the removed module (width 0) stays exactly 0 cost as measured.

    Why: per-width timings carry ±0.5–1 ms of noise on a shared CPU, and the DP picks exactly the widths whose
    noise came out low (the winner's curse): plans were then predicted 9–13% faster than measured while random
    architectures were predicted within 4%. halfwidth 0 keeps the measured medians (only made monotone).
    widths, times: [n], ascending widths starting at 0.
    """
    w = np.asarray(widths, dtype=float)
    t = np.asarray(times, dtype=float)
    out = t.copy()
    if halfwidth > 0 and len(w) > 2:
        for i in range(1, len(w)):
            lo, hi = max(1, i - halfwidth), min(len(w), i + halfwidth + 1)   # never pool with the removed module
            if hi - lo >= 2:
                a = np.stack([np.ones(hi - lo), w[lo:hi] - w[i]], axis=1)       # [m, 2], centred at w_i
                coef, *_ = np.linalg.lstsq(a, t[lo:hi], rcond=None)
                out[i] = coef[0]
    out[1:] = isotonic(np.maximum(out[1:], 0.0))
    out[0] = min(out[0], out[1]) if len(out) > 1 else out[0]
    return out


def local_affine_fit(additive, measured, weights, center: float, bandwidth: float = 0.35) -> tuple[float, float]:
    """The affine correction where one plan lands: (offset, scale) minimising
    Σ w_i·k_i·((offset + scale·additive_i) / measured_i − 1)², with k_i = exp(−(ln(measured_i / center))² / 2b²)
    weighting each measured architecture by how close its time is to `center` (the target's time budget).

    The closed loop (stages/loop.py) calls it with every architecture measured so far: the dense model, the
    profile's random mixed ones and each plan it timed, so that the correction is a local secant of the true
    time-vs-prediction curve around the budget, not one global line (measured models of this project deviate
    from the additive prediction by different amounts at 1.5x and at 3x). With one close point besides the dense
    model it is the secant through both. additive, measured: [n] seconds; weights: [n] >= 0.
    """
    x, y, w = (np.asarray(v, dtype=float) for v in (additive, measured, weights))
    k = w * np.exp(-np.log(y / center) ** 2 / (2 * bandwidth ** 2))
    if np.count_nonzero(k > 1e-12) < 2:
        return 0.0, 1.0
    a = np.stack([1.0 / y, x / y], axis=1) * np.sqrt(k)[:, None]      # [n, 2] weighted relative residuals
    (offset, scale), *_ = np.linalg.lstsq(a, np.sqrt(k), rcond=None)
    return float(offset), float(scale)
