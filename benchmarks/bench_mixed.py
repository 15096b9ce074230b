"""Issue #4's benchmark: structured-only DP vs mixed (structured + sparse levels) DP vs SPDY search, on the
default encoder, each applied and verified (measured next to predicted speedup, quality on held-out text).

    python benchmarks/bench_mixed.py --work runs/bench-mixed --threads 2 [--targets 2 3] [--search 40]
        [--sparsity 0.5,0.7,0.9,0.95] [--sparse-targets 1.1 1.2] [--variants structured,mixed,sparse-only,...]

Variants: structured (widths only), mixed (widths and sparse levels in one DP), search (SPDY search over the
structured DP), sparse-only (the DP over sparse levels alone, architecture kept: a plan that certainly picks
sparse levels, at --sparse-targets), sparse-uniform (not planned: every FFN at the sparsest level).

Step by step, everything cached in --work (rerun to resume): a profile with sparse levels timed, one OBS
database with the sparse levels scored, plans for each variant, applied models, verify reports; then one
table. The structured and search variants share one database; the mixed one also scores the sparse levels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import planner
from planner import hardware
from planner.config import PlanConfig, ProfileConfig, VerifyConfig
from planner.jobs.run import default_model
from planner.types import LatencyProfile, Plan, VerifyReport


def _sparse_uniform(work: Path, prof: LatencyProfile) -> Plan:
    """Not a planned architecture: every FFN at the sparsest timed level, attention dense, SparseGPT weights
    from the mixed database. It checks that a sparse layer is measured as fast as the profile predicts."""
    import dataclasses
    src = next(d for d in ("plans-mixed", "plans-sparse-only") if (work / d).exists())
    mixed = Plan.load(sorted((work / src).glob("plan-*.json"))[0])     # its database (sparse levels) and options
    lv = max(prof.sparse["ffn"]["levels"])
    H, F = prof.arch.n_heads, prof.arch.ffn
    layers = [{"heads": H, "ffn": F, "ffn_sparsity": lv, "attn_time": prof.times("attn").time_at(H),
               "ffn_time": prof.sparse_time("ffn", lv), "attn_error": 0.0, "ffn_error": 0.0}] * prof.arch.n_layers
    pred = prof.predict(layers)
    return dataclasses.replace(mixed, method="sparse-uniform", layers=layers, predicted_time=pred,
                               predicted_speedup=prof.base["median"] / pred, target_speedup=round(
                                   prof.base["median"] / pred, 2), total_error=0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--work", default="runs/bench-mixed")
    ap.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sparsity", default="0.5,0.7,0.9,0.95")
    ap.add_argument("--sparse-targets", type=float, nargs="+", default=[1.1, 1.2],
                    help="targets of the sparse-only variant (sparsity alone reaches little on CPU)")
    ap.add_argument("--search", type=int, default=40)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=ProfileConfig.rounds, help="profile rounds")
    ap.add_argument("--sparse-reps", type=int, default=ProfileConfig.sparse_reps, help="profile sparse pairs")
    ap.add_argument("--variants", default="structured,mixed,search,sparse-only,sparse-uniform",
                    help="sparse-uniform: every FFN at the sparsest level (needs the mixed or sparse-only plans)")
    a = ap.parse_args()
    hardware.set_threads(a.threads)
    model = Path(a.model) if a.model else default_model()
    work = Path(a.work)
    ppath = work / "profile.json"
    if not ppath.exists():
        print("profiling (with sparse levels)...", flush=True)
        planner.profile(model, ProfileConfig(batch_size=a.batch_size, seq_len=a.seq_len, threads=a.threads,
                                             rounds=a.rounds, sparse_reps=a.sparse_reps,
                                             sparsity=tuple(float(x) for x in a.sparsity.split(","))), out=ppath)
    prof = LatencyProfile.load(ppath)
    print(prof.conditions)
    for kind, s in prof.sparse.items():
        dense = prof.times(kind).monotone[-1] * 1e3
        print(f"  {kind}: dense {dense:.2f} ms/block; CSR " + ", ".join(
            f"{lv:g}: {t*1e3:.2f} ms" for lv, t in zip(s["levels"], s["median"]))
            + f"; faster than dense from {prof.sparse_crossover(kind)}")
    variants = {"structured": dict(sparse=False), "mixed": dict(sparse=True),
                "search": dict(sparse=False, search=a.search), "sparse-only": dict(sparse=True, structured=False)}
    rows = []
    dense_model = planner.load(model)
    for name in a.variants.split(","):
        if name == "sparse-uniform":
            plans = [_sparse_uniform(work, prof)]
        else:
            kw = variants[name]
            out = work / f"plans-{name}"
            targets = a.sparse_targets if name == "sparse-only" else a.targets
            plans = [Plan.load(out / f"plan-{t:g}x.json") for t in targets] \
                if all((out / f"plan-{t:g}x.json").exists() for t in targets) else \
                planner.plan(model, ppath, PlanConfig(targets=tuple(targets), **kw), out,
                             db_dir=work / ("db-mixed" if kw["sparse"] else "db-structured"))
        for p in plans:
            mdir = work / "models" / f"{name}-{p.target_speedup:g}x"
            if not (mdir / "config.json").exists():
                planner.apply(model, p, mdir)
            vpath = work / "verify" / f"{name}-{p.target_speedup:g}x.json"
            rep = VerifyReport.load(vpath) if vpath.exists() else planner.verify(
                model, mdir, VerifyConfig(batch_size=a.batch_size, seq_len=a.seq_len, threads=a.threads,
                                          reps=a.reps), profile_path=ppath, out=vpath, dense_model=dense_model)
            sparse = [f"{l}.{k}@{p.layers[l][f'{k}_sparsity']:g}" for l in range(len(p.layers))
                      for k in ("attn", "ffn") if p.layers[l].get(f"{k}_sparsity")]
            srch = p.options.get("search", {})
            rows.append({"variant": name, "target": p.target_speedup, "predicted": rep.predicted_speedup,
                         "measured": rep.measured_speedup, "pred/meas-1": rep.prediction_ratio - 1,
                         "spearman": rep.quality["spearman"], "nn_agree": rep.quality["nn_agree"],
                         "total_error": p.total_error, "calib_loss": srch.get("loss"),
                         "calib_loss_dp": srch.get("loss_dp"), "sparse_modules": " ".join(sparse) or "-"})
    print("\n| variant | target | predicted | measured | pred/meas-1 | spearman | nn_agree | DP error | "
          "stitched loss (DP -> search) | sparse modules chosen |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["target"], r["variant"])):
        loss = f"{r['calib_loss_dp']:.4f} -> {r['calib_loss']:.4f}" if r["calib_loss"] is not None else "-"
        print(f"| {r['variant']} | {r['target']:g}x | {r['predicted']:.2f}x | {r['measured']:.2f}x | "
              f"{r['pred/meas-1']:+.1%} | {r['spearman']:.3f} | {r['nn_agree']:.3f} | {r['total_error']:.4f} | "
              f"{loss} | {r['sparse_modules']} |")
    (work / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
