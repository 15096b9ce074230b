"""From a database and a latency profile to Plans: the options per module, the budget, the DP.

Per block l and kind (attn, ffn) the options are the kept widths that are both in the profile's grid and
in the database; option time = the profile's measured module time, option error = the database's
held-out error, normalised. budget = base / target - constant: the non-prunable part stays in the budget.
"""
from __future__ import annotations

import numpy as np

from ..algorithms import solver
from .database import Database
from ..errors import UnreachableTarget
from ..types import KINDS, LatencyProfile, Plan


def profile_identity(p: LatencyProfile, path=None) -> dict:
    return {"path": str(path) if path else None, "hardware": p.hardware, "shape": p.shape.get("key"),
            "batch_size": p.batch_size, "seq_len": p.seq_len, "dtype": p.dtype, "mode": p.mode,
            "method": p.method, "base": p.base["median"], "constant": p.constant, "created": p.created}


def options(db: Database, prof: LatencyProfile, norm: str, scale: dict | None = None, sparse: bool = True,
            structured: bool = True):
    """groups [(layer, kind)], and per group (widths, sparsities, times, errors) arrays. Structured options
    have sparsity 0; a sparse option keeps the module's full width with its linears at that sparsity, and
    exists where both the database and the profile have the level (one DP weighs both kinds).
    structured=False offers only the full width and the sparse levels: the architecture stays as it is."""
    groups, widths, levels, times, errors = [], [], [], [], []
    for l in range(db.n_layers):
        for kind in KINDS:
            errs = db.errors(l, kind, norm)
            mt = prof.times(kind)
            ws = [w for w in sorted(errs) if w in mt.widths and (structured or w == max(errs))]
            if not ws:
                raise UnreachableTarget(f"layer {l} {kind}: no database level is on the profile's width grid; "
                                        f"profile with the same --ffn-step as the database")
            c = (scale or {}).get((l, kind), 1.0)
            opt = [(w, 0.0, mt.time_at(w), errs[w]) for w in ws]
            full = max(errs)
            for lv, e in (db.sparse_errors(l, kind, norm) if sparse and full else {}).items():
                t = prof.sparse_time(kind, lv)
                if t is not None:
                    opt.append((full, lv, t, e))
            groups.append((l, kind))
            widths.append(np.array([o[0] for o in opt]))
            levels.append(np.array([o[1] for o in opt]))
            times.append(np.array([o[2] for o in opt]))
            errors.append(np.array([c * o[3] for o in opt]))
    return groups, widths, levels, times, errors


def solve_plans(db: Database, prof: LatencyProfile, targets, norm: str = "residual", n_buckets: int = 10_000,
                model_info: dict | None = None, profile_path=None, extra_options: dict | None = None,
                scale: dict | None = None, structured: bool = True) -> list[Plan]:
    """One plan per target from one DP; `scale` {(layer, kind): c} multiplies a group's errors (SPDY search);
    structured=False: sparse levels only (see `options`)."""
    groups, widths, levels, times, errors = options(db, prof, norm, scale, structured=structured)
    raw = options(db, prof, norm, structured=structured)[4] if scale else errors   # plans report unscaled errors
    if not structured and not any((lv > 0).any() for lv in levels):
        raise UnreachableTarget("--sparse-only: the database has no sparse levels the profile timed; profile "
                                "with --sparsity (e.g. 0.9,0.95) and plan with --sparse")
    base = prof.base["median"]
    fastest = prof.constant + solver.min_time(times)
    max_speedup = base / fastest if fastest > 0 else float("inf")
    budgets = []
    for t in targets:
        b = base / t - prof.constant
        if b < solver.min_time(times) or b <= 0:
            raise UnreachableTarget(f"speedup {t:g}x is not reachable with this profile"
                                    f"{'' if structured else ' by sparse levels alone'}: the largest reachable "
                                    f"speedup is {max_speedup:.2f}x (non-prunable time {prof.constant*1e3:.2f} ms "
                                    f"of {base*1e3:.2f} ms); ask for at most {np.floor(max_speedup*100)/100:.2f}x")
        budgets.append(b)
    sols = solver.solve(times, errors, budgets, n_buckets=n_buckets)
    plans = []
    for t, sol in zip(targets, sols):
        layers = [dict() for _ in range(db.n_layers)]
        for (l, kind), w, lv, tm, er, o in zip(groups, widths, levels, times, raw, sol.choices):
            key = "heads" if kind == "attn" else "ffn"
            layers[l][key] = int(w[o])
            layers[l][f"{kind}_time"] = float(tm[o])
            layers[l][f"{kind}_error"] = float(er[o])
            if lv[o] > 0:                                      # a sparse option won: the plan says so
                layers[l][f"{kind}_sparsity"] = float(lv[o])
        pred = prof.constant + sol.time
        plans.append(Plan(method="planner", target_speedup=float(t), predicted_time=float(pred),
                          predicted_speedup=float(base / pred), base_time=float(base), layers=layers,
                          total_error=float(sum(e[o] for e, o in zip(raw, sol.choices))),
                          profile=profile_identity(prof, profile_path),
                          model=model_info or {}, database={"path": str(db.path), **db.index["identity"]},
                          options={"error_norm": norm, "n_buckets": n_buckets, **(extra_options or {})}))
    return plans


def uniform_plan(prof: LatencyProfile, target: float, n_layers: int, model_info=None, profile_path=None,
                 method: str = "magnitude-uniform") -> Plan:
    """The baseline: the same kept fraction of heads and neurons in every block, the widest that reaches the
    target on the profile."""
    A, F = prof.times("attn"), prof.times("ffn")
    H, D = A.widths[-1], F.widths[-1]
    best = None
    for frac in np.linspace(1.0, 0.0, 401):
        k = int(round(frac * H))
        w = min(F.widths, key=lambda x: abs(x - frac * D))
        pred = prof.constant + n_layers * (A.time_at(k) + F.time_at(w))
        if pred <= 0:                     # everything removed and no constant left: not a model
            continue
        if prof.base["median"] / pred >= target:
            best = (k, w, pred)
            break
    if best is None:
        raise UnreachableTarget(f"speedup {target:g}x is not reachable by uniform pruning with this profile "
                                f"(largest {prof.max_speedup():.2f}x)")
    k, w, pred = best
    layers = [{"heads": k, "ffn": w, "attn_time": A.time_at(k), "ffn_time": F.time_at(w),
               "attn_error": 0.0, "ffn_error": 0.0} for _ in range(n_layers)]
    return Plan(method=method, target_speedup=float(target), predicted_time=float(pred),
                predicted_speedup=float(prof.base["median"] / pred), base_time=prof.base["median"], layers=layers,
                total_error=0.0, profile=profile_identity(prof, profile_path), model=model_info or {})


def plan_key(p: Plan) -> tuple:
    """What makes two plans the same architecture: per layer kept widths and sparsity levels."""
    return tuple(v for l in p.layers for v in (int(l["heads"]), int(l["ffn"]), int(round(1e4 * l.get("attn_sparsity", 0))),
                                              int(round(1e4 * l.get("ffn_sparsity", 0)))))


def layer_cell(plan_layer: dict, kind: str) -> str:
    """"12" (kept width) or "1536@s90" (full width, the module's linears 90% sparse)."""
    key = "heads" if kind == "attn" else "ffn"
    sp = plan_layer.get(f"{kind}_sparsity", 0)
    return f"{plan_layer[key]}" + (f"@s{sp * 100:g}" if sp else "")


def format_plan_table(plans: list[Plan]) -> str:
    """Per-layer kept heads / FFN width for each target, side by side."""
    head = "layer " + " ".join(f"{p.target_speedup:>5g}x heads/ffn" for p in plans)
    rows = [head]
    cell = layer_cell
    for l in range(len(plans[0].layers)):
        rows.append(f"{l:5d} " + " ".join(f"{cell(p.layers[l], 'attn'):>8}/{cell(p.layers[l], 'ffn'):<7}"
                                          for p in plans))
    rows.append("pred  " + " ".join(f"{p.predicted_speedup:>14.2f}x " for p in plans))
    return "\n".join(rows)
