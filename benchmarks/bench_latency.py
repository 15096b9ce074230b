"""Does the latency profile predict real speedups? Predicted vs measured for planned architectures.

    python benchmarks/bench_latency.py --profile P.json [--plans DIR | --db-run RUN_DIR] [--targets 1.5 2 3]
                                       [--threads 2] [--reps 15]

Latency depends on shapes only, so each architecture is built from a randomly initialised dense model and
shrunk (no OBS, no calibration): the check takes a minute, not a pipeline run. Architectures:
  planner-<t>x   plans solved against this profile with the OBS database of a `planner run` directory
                 (--db-run; the database is reused, nothing is rebuilt), or plan JSONs from --plans
  uniform-<t>x   the magnitude baseline's uniform widths for the same targets
Each is timed against the dense model with the interleaved ABBA protocol of `planner verify`.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from planner import api, hardware
from planner.config import PlanConfig
from planner.jobs.run import default_model
from planner.stages import profile as profiler
from planner.stages.plan import uniform_plan
from planner.stages.verify import measure_speedup
from planner.types import LatencyProfile, Plan


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded MiniLM)")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--plans", default=None, help="directory of plan-*.json to check as they are")
    ap.add_argument("--db-run", default=None, help="a `planner run` directory whose OBS database to reuse")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    model_path = Path(a.model) if a.model else default_model()
    hardware.set_threads(a.threads)
    prof = LatencyProfile.load(a.profile)
    arch = {}
    if a.plans:
        for f in sorted(Path(a.plans).glob("plan-*.json")):
            p = Plan.load(f)
            arch[f"{p.method}-{p.target_speedup:g}x"] = p
    elif a.db_run:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(Path(a.db_run) / "plans" / "db", Path(tmp) / "db")
            for p in api.plan(model_path, a.profile, PlanConfig(targets=tuple(a.targets)), tmp, progress=False):
                arch[f"planner-{p.target_speedup:g}x"] = p
    n_layers = prof.arch.n_layers
    for t in a.targets:
        u = uniform_plan(prof, t, n_layers, {}, a.profile)
        arch[f"uniform-{t:g}x"] = u

    dense, adapter = profiler.dense_model_from_config(model_path)
    rows = []
    for name, p in arch.items():
        pred = prof.base["median"] / prof.predict(p.kept)
        v = profiler._variant(dense, adapter, p.kept)
        m = measure_speedup(dense, v, adapter, prof.batch_size, prof.seq_len, reps=a.reps, mode=prof.mode)
        del v
        rows.append({"architecture": name, "predicted": pred, "measured": m["speedup"],
                     "pred/meas-1": pred / m["speedup"] - 1, "meas/target": m["speedup"] / p.target_speedup,
                     "spread": m["speedup_spread"]})
        print(f"{name}: predicted {pred:.2f}x measured {m['speedup']:.2f}x", flush=True)
    df = pd.DataFrame(rows)
    fit = prof.fit
    print(f"\nProfile: {a.profile}\nConditions: {prof.conditions}")
    if fit:
        print(f"Profile's own check on {fit['n_mixed']} random mixed architectures: max |pred/meas-1| "
              f"{fit['max_rel_error_additive']:.1%} additive, {fit['max_rel_error']:.1%} as stored "
              f"(affine correction {'applied' if fit['applied'] else 'not applied'}, scale {fit['scale']:.3f})")
    print(df.to_markdown(index=False, floatfmt=".3f"))
    print(f"max |pred/meas-1| = {df['pred/meas-1'].abs().max():.1%}")


if __name__ == "__main__":
    main()
