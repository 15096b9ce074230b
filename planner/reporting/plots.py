"""Figures of a run: latency curves, per-layer plans, the speed/quality frontier, predicted vs measured.

Each function takes the planner's own result types and returns a matplotlib `Figure` built without pyplot,
so it works headless (report) and shows inline in a notebook alike; nothing here reads files or knows a
model family. Times are plotted in milliseconds.
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from ..types import LatencyProfile, Plan, VerifyReport
from .tables import METRICS, PLOTTED

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kw) -> "Figure":
    """A matplotlib Figure without pyplot (no global state); matplotlib loads when a plot is first drawn."""
    from matplotlib.figure import Figure
    return Figure(layout="constrained", **kw)

# one colour per method, stable across figures (planner first, baselines after)
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
# quality metrics where higher is better and the dense model scores 1 (others are plotted as they are)


def _method_colors(methods) -> dict:
    order = sorted(set(methods), key=lambda m: (m != "planner", m))
    return {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(order)}


def latency_curves(prof: LatencyProfile) -> Figure:
    """Module time vs kept width for attention (heads) and FFN (neurons): the measured medians with their
    spread as error bars, and the de-noised monotone curve the solver uses."""
    fig = _figure(figsize=(16 if prof.sparse else 11, 4))
    axes = fig.subplots(1, 3 if prof.sparse else 2)
    if prof.sparse:
        _sparse_panel(axes[2], prof)
    for ax, kind, xlabel in zip(axes, ("attn", "ffn"), ("kept attention heads", "kept FFN neurons")):
        mt = prof.times(kind)
        w = np.asarray(mt.widths)
        med, spr = np.asarray(mt.median) * 1e3, np.asarray(mt.spread) * 1e3
        ax.errorbar(w, med, yerr=spr, fmt="o", ms=3, lw=0.8, capsize=2, color="0.45",
                    label="measured (median ± spread)")
        ax.plot(w, np.asarray(mt.monotone) * 1e3, "-", color=_COLORS[0], lw=1.8, label="model (solver's view)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time per block (ms)")
        ax.set_title(f"{'Attention' if kind == 'attn' else 'FFN'} (dense {mt.monotone[-1]*1e3:.2f} ms per block)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Latency profile: {prof.conditions}", fontsize=9)
    return fig


def _sparse_panel(ax, prof: LatencyProfile) -> None:
    """Module time on the sparse kernel vs sparsity (full width), against the dense module (dashed)."""
    for i, (kind, s) in enumerate(sorted(prof.sparse.items())):
        c = _COLORS[i + 1]
        ax.errorbar(s["levels"], np.asarray(s["median"]) * 1e3, yerr=np.asarray(s["spread"]) * 1e3, fmt="o-",
                    ms=3, capsize=2, color=c, label=f"{kind} on {'/'.join(sorted(set(s['kernels'])))}")
        ax.axhline(prof.times(kind).monotone[-1] * 1e3, color=c, ls="--", lw=1, label=f"{kind} dense")
    ax.set_xlabel("sparsity of every linear in the module")
    ax.set_ylabel("time per block (ms)")
    ax.set_title("Sparse kernels (below the dashed line: faster than dense)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def self_check(prof: LatencyProfile) -> Figure | None:
    """The profile's own check: random mixed architectures, timed, against the additive prediction (before
    and after the fitted correction). None when the profile timed no mixed architectures."""
    v = (prof.fit or {}).get("variants") or []
    if not v:
        return None
    base = prof.base["median"]
    meas = np.array([x["measured"] for x in v]) * 1e3
    add = np.array([x["additive"] for x in v]) * 1e3
    pred = np.array([x["predicted"] for x in v]) * 1e3
    fig = _figure(figsize=(5.2, 4.6))
    ax = fig.subplots()
    lo, hi = 0.0, max(meas.max(), add.max(), pred.max(), base * 1e3) * 1.05
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="ideal")
    ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="0.85", label="±5%")
    ax.plot(meas, add, "x", color="0.4", label="additive (uncorrected)")
    ax.plot(meas, pred, "o", color=_COLORS[0], label="profile's prediction")
    ax.set_xlabel("measured time (ms)")
    ax.set_ylabel("predicted time (ms)")
    err = prof.fit.get("max_rel_error")
    ax.set_title(f"Self-check on {len(v)} random mixed architectures"
                 + (f"\nmax |pred/meas − 1| = {err:.1%}" if err is not None else ""), fontsize=10)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plan_widths(plans: list[Plan]) -> Figure:
    """Kept heads and FFN width per layer, one bar per target side by side; uniform baselines as dashed
    lines in the colour of their target's bars."""
    own = sorted([p for p in plans if p.method == "planner"], key=lambda p: p.target_speedup)
    base = [p for p in plans if p.method != "planner"]
    shown = own or sorted(plans, key=lambda p: p.target_speedup)
    n_layers = len(shown[0].layers)
    fig = _figure(figsize=(12, 4))
    axes = fig.subplots(1, 2)
    x = np.arange(n_layers)
    width = 0.8 / len(shown)
    cmap = {t: c for t, c in zip(sorted({p.target_speedup for p in plans}), _COLORS)}
    for ax, key, label in zip(axes, ("heads", "ffn"), ("kept attention heads", "kept FFN neurons")):
        kind = "attn" if key == "heads" else "ffn"
        for j, p in enumerate(shown):
            vals = [l[key] for l in p.layers]
            bars = ax.bar(x - 0.4 + width * (j + 0.5), vals, width, color=cmap[p.target_speedup],
                          label=f"{p.target_speedup:g}x (pred {p.predicted_speedup:.2f}x)")
            for b, l in zip(bars, p.layers):                 # a sparse module: full width, hatched, level on top
                if l.get(f"{kind}_sparsity"):
                    b.set_hatch("///")
                    ax.annotate(f"s{l[f'{kind}_sparsity'] * 100:g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=6)
        for p in base if own else []:
            ax.hlines(p.layers[0][key], -0.5, n_layers - 0.5, colors=cmap[p.target_speedup], linestyles="--",
                      lw=1, label=f"{p.method} {p.target_speedup:g}x")
        ax.set_xticks(x)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle("Per-layer plan" + (" (planner bars; uniform baseline dashed)" if own and base else ""), fontsize=10)
    return fig


def _rows(reports: list[tuple[str, float, VerifyReport]]):
    by = defaultdict(list)
    for method, target, r in reports:
        by[method].append((target, r))
    return {m: sorted(v, key=lambda t: t[0]) for m, v in by.items()}


def frontier(reports: list[tuple[str, float, VerifyReport]], metrics=None) -> Figure:
    """Measured speedup vs quality kept, one line per method (points labelled with their target): the
    speed/quality frontier. `reports` are (method, target, VerifyReport)."""
    by = _rows(reports)
    if metrics is None:
        keys = {k for _, _, r in reports for k, v in r.quality.items() if isinstance(v, (int, float))}
        metrics = [m for m in PLOTTED if m in keys][:2] or sorted(keys - {"n_text", "speedup_spread"})[:2]
    colors = _method_colors(by)
    fig = _figure(figsize=(5.5 * len(metrics), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    for ax, metric in zip(axes, metrics):
        for m, rows in by.items():
            xs = [r.measured_speedup for _, r in rows]
            ys = [r.quality.get(metric, np.nan) for _, r in rows]
            ax.plot(xs, ys, "o-", color=colors[m], label=m)
            for (t, _), xx, yy in zip(rows, xs, ys):
                ax.annotate(f"{t:g}x", (xx, yy), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if METRICS.get(metric, (None, None, None))[2] is not None:
            ax.plot([1.0], [METRICS[metric][2]], "k*", ms=9, label="dense")
        if metric == "ppl_increase":
            ax.set_yscale("symlog", linthresh=0.01)   # +1% and +30000% on one plot
        ax.set_xlabel("measured speedup (×)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} kept vs measured speedup", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def predicted_vs_measured(reports: list[tuple[str, float, VerifyReport]]) -> Figure | None:
    """Predicted vs measured speedup with the ideal diagonal and a ±5% band; None if nothing was predicted."""
    by = _rows(reports)
    pts = [(m, t, r) for m, rows in by.items() for t, r in rows if r.predicted_speedup]
    if not pts:
        return None
    colors = _method_colors(by)
    fig = _figure(figsize=(5.2, 4.6))
    ax = fig.subplots()
    hi = max(max(r.predicted_speedup, r.measured_speedup) for _, _, r in pts) * 1.08
    lo = 1.0
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="ideal")
    ax.fill_between([lo, hi], [lo / 1.05, hi / 1.05], [lo * 1.05, hi * 1.05], color="0.88", label="±5%")
    for m in by:
        sel = [(t, r) for mm, t, r in pts if mm == m]
        if not sel:
            continue
        ax.plot([r.measured_speedup for _, r in sel], [r.predicted_speedup for _, r in sel], "o", color=colors[m],
                label=m)
        for t, r in sel:
            ax.annotate(f"{t:g}x", (r.measured_speedup, r.predicted_speedup), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured speedup (×)")
    ax.set_ylabel("predicted speedup (×)")
    ax.set_title("Predicted vs measured speedup", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
