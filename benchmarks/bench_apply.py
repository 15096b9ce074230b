"""What the sequential apply costs, with and without the dense tape (the dense block's tensors recorded on one run
per block instead of re-running the dense block for every fit).

On the default encoder (all-MiniLM-L6-v2) with the default calibration text and passages, a plan keeping half of
every module's heads and neurons (kept by weight magnitude, so no OBS database is needed: the refit is the same
code) is applied with `--refit stream` and the tape on, then off, alternating, `--reps` times each. Prints the wall
time of each, their ratio with its spread, and whether both gave the same weights.

    python benchmarks/bench_apply.py [--threads 2] [--reps 2] [--n-calib 2048]
"""
from __future__ import annotations

import argparse
import time

import torch

from planner.adapters.checkpoint import Checkpoint
from planner.config import PlanConfig
from planner.jobs.run import default_model
from planner.stages.apply import apply_
from planner.stages.calibration import calibration_batches
from planner.timing import median, spread
from planner.types import Plan


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="applies per setting, alternating")
    ap.add_argument("--n-calib", type=int, default=PlanConfig.n_calib)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ck = Checkpoint.open(default_model())
    d = PlanConfig()
    batches, _ = calibration_batches(ck, None, a.n_calib, d.calib_max_len, d.calib_batch)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    layers = [{"heads": s.heads // 2, "ffn": s.ffn // 2} for s in ck.adapter.spec(ck.load("cpu"))]
    plan = Plan("planner", 2.0, 0.0, 2.0, 0.0, layers, 0.0, {}, {})
    times, states = {"tape": [], "no tape": []}, {}
    for r in range(a.reps):
        for name, limit in ((("tape", None), ("no tape", 0)) if r % 2 == 0 else (("no tape", 0), ("tape", None))):
            m = ck.load("cpu")
            t = time.perf_counter()
            apply_(m, ck.adapter, plan, select="magnitude", weights="sequential", batches=batches, progress=False,
                   refit="stream", tape_bytes=limit)
            times[name].append(time.perf_counter() - t)
            states[name] = m.state_dict()
    same = all(torch.equal(states["tape"][k], states["no tape"][k]) for k in states["tape"])
    print(f"all-MiniLM-L6-v2, {a.n_calib} passages ({tokens} tokens), {a.threads} threads, half of every module kept, "
          f"--refit stream; {a.reps} applies each, alternating")
    print("| apply | median s | spread s |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {median(ts):.1f} | {spread(ts):.1f} |")
    ratios = [b / t for t, b in zip(times["tape"], times["no tape"])]
    print(f"\nno tape / tape: {median(ratios):.2f}x (per pair: {', '.join(f'{x:.2f}' for x in ratios)}); "
          f"same weights bit for bit: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
