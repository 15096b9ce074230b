"""Does a process that has trained time models slower? The same compressed weights are timed against the dense
model (verify's interleaved timer) before and after a short recovery, once with the recovery in the timing process
and once in a spawned child (recover.Apart, what the main and gradual jobs do). Each case runs in a fresh process.

    python benchmarks/bench_after_training.py --model runs/main-v10/models/planner-3x [--minutes 1] [--threads 2]

Prints one markdown table: rows = what was timed, columns = where the recovery ran.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("before", "reloaded", "after recovery", "recovered model", "after, again")


def _case(dense: str, model: str, where: str, minutes: float, threads: int, work: Path) -> dict:
    """One fresh process: {step: (speedup, lo, hi)} and the recovery's wall seconds."""
    import torch

    from planner.adapters.checkpoint import Checkpoint
    from planner.config import RecoverConfig
    from planner.stages import recover as recover_stage
    from planner.stages.verify import measure_speedup
    torch.set_num_threads(threads)
    dck, ock = Checkpoint.open(dense), Checkpoint.open(model)
    d = dck.load("cpu")
    out, rec = {}, work / "recovered"

    def timed(step, path):
        r = measure_speedup(d, Checkpoint.open(path).load("cpu"), ock.adapter, 8, 128, reps=30, max_reps=60,
                            halfwidth=0.01)
        out[step] = (r["speedup"], *r["speedup_interval"])

    timed("before", model)
    timed("reloaded", model)
    cfg, t = RecoverConfig(minutes=minutes, threads=threads), time.perf_counter()
    if where == "this process":
        recover_stage.recover(ock, dck, cfg, out=rec, progress=False)
    else:
        with recover_stage.Apart() as apart:
            apart.recover(model, dense, cfg, rec, progress=False)
    seconds = time.perf_counter() - t
    timed("after recovery", model)
    timed("recovered model", rec)
    timed("after, again", model)
    return {"speedups": out, "recover_s": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a compressed model directory (planner apply / run)")
    ap.add_argument("--dense", default=None, help="its dense model (default: the embedded all-MiniLM-L6-v2)")
    ap.add_argument("--minutes", type=float, default=1.0, help="recovery budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)      # internal: run one case, print JSON
    a = ap.parse_args()
    if a.dense is None:
        from planner.jobs.run import default_model
        a.dense = str(default_model())
    if a.case:
        with tempfile.TemporaryDirectory() as w:
            print(json.dumps(_case(a.dense, a.model, a.case, a.minutes, a.threads, Path(w))))
        return
    res = {}
    for where in ("this process", "a child process"):
        r = subprocess.run([sys.executable, __file__, "--model", a.model, "--dense", a.dense, "--minutes",
                            str(a.minutes), "--threads", str(a.threads), "--case", where],
                           capture_output=True, text=True, check=True)
        res[where] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"speedup of {a.model} against the dense model, {a.threads} threads, batch 8 x seq 128; recovery of "
          f"{a.minutes:g} min in ...\n")
    print("| timed | " + " | ".join(res) + " |\n|---|" + "---|" * len(res))
    for step in STEPS:
        cells = [f"{s:.3f} [{lo:.3f}, {hi:.3f}]" for s, lo, hi in (res[w]["speedups"][step] for w in res)]
        print(f"| {step} | " + " | ".join(cells) + " |")
    print("| recovery wall time | " + " | ".join(f"{res[w]['recover_s']:.0f} s" for w in res) + " |")


if __name__ == "__main__":
    main()
