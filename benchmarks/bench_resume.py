"""Does a recovery that is killed and resumed end where an uninterrupted one ends?

    python benchmarks/bench_resume.py [--run runs/b8-v3] [--target 2] [--minutes 3] [--kill-at 0.5]
                                      [--threads 2] [--work runs/bench-resume] [--data TEXT]

Runs `planner recover` (the CLI, in a subprocess, under a time budget: how users run it) twice on the one-shot
student RUN/models/planner-<t>x:
  uninterrupted   one run to the end of the budget;
  killed          the same command, SIGKILLed after --kill-at of the budget (wall clock after training
                  starts), then run again unchanged: it resumes from its last checkpoint.
Both recovered models are scored on held-out text as bench_recover does (encoders: similarity to the dense
model; causal LMs: perplexity), and their weights are compared. The time budget refits the step count to the
pace, so the two runs are not expected to be bit-identical (a fixed --steps run is, tests/test_recover.py);
"within noise" is judged against the difference between the one-shot and the recovered model.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_recover import METRICS, _heldout  # noqa: E402

from planner import hardware, io  # noqa: E402
from planner.adapters.checkpoint import load_model  # noqa: E402
from planner.types import Plan, RecoverReport  # noqa: E402


def _recover_cmd(src, teacher, out, minutes, threads, data) -> list[str]:
    cmd = [sys.executable, "-m", "planner.cli", "recover", str(src), "--teacher", str(teacher), "--out", str(out),
           "--minutes", str(minutes), "--threads", str(threads), "--quiet"]
    return cmd + (["--data", str(data)] if data else [])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/b8-v3")
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--kill-at", type=float, default=0.5, help="share of the budget after which the run is killed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench-resume")
    ap.add_argument("--data", default=None, help="training text (default: recover's default)")
    a = ap.parse_args()
    hardware.set_threads(a.threads)
    run, work = Path(a.run), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src = run / "models" / f"planner-{a.target:g}x"
    teacher = Path(Plan.load(next((run / "plans").glob("plan-*.json"))).model["path"])
    outs = {"uninterrupted": work / "uninterrupted", "killed": work / "killed"}
    walls = {}
    for name, out in outs.items():
        if (out / "recover.json").exists():
            continue
        cmd = _recover_cmd(src, teacher, out, a.minutes, a.threads, a.data)
        t0 = time.perf_counter()
        if name == "killed":
            ckpt = out.with_name(out.name + ".ckpt")
            p = subprocess.Popen(cmd)
            # kill once training has run for kill_at of the budget (loading takes a few seconds first)
            while p.poll() is None and not (ckpt / "state.pt").exists() and time.perf_counter() - t0 < 600:
                time.sleep(0.5)
            time.sleep(max(0.0, a.kill_at * a.minutes * 60 - (time.perf_counter() - t0) + 5))
            p.send_signal(signal.SIGKILL)
            p.wait()
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
            print(f"killed after {time.perf_counter() - t0:.0f} s wall; checkpoint at step {state['step']} "
                  f"({state['elapsed'] / 60:.2f} training min)", flush=True)
        subprocess.run(cmd, check=True)
        walls[name] = time.perf_counter() - t0
    dense, adapter = load_model(teacher)
    heldout = _heldout(teacher, adapter, run, dense)
    keys = METRICS[adapter.causal_lm][0]
    rows = [{"model": "one-shot", **{k: v for k, v in heldout(load_model(src)[0]).items() if k in keys}}]
    weights = {}
    for name, out in outs.items():
        rep = RecoverReport.load(out / "recover.json")
        m, _ = load_model(out)
        weights[name] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        rows.append({"model": f"recovered, {name}", **{k: v for k, v in heldout(m).items() if k in keys},
                     "steps": rep.steps, "train_min": rep.train_time / 60, "best_step": rep.best_step,
                     "val_total": rep.after["val_total"]})
    num = sum(float(((weights["killed"][k] - weights["uninterrupted"][k]) ** 2).sum()) for k in weights["killed"])
    den = sum(float((weights["uninterrupted"][k] ** 2).sum()) for k in weights["killed"])
    df = pd.DataFrame(rows)
    cond = (f"{hardware.cpu_name()}, {a.threads} threads, torch {torch.__version__}; {src} distilled from {teacher}, "
            f"budget {a.minutes:g} min, killed (SIGKILL) after {a.kill_at:.0%} of it and rerun")
    table = (f"Conditions: {cond}\n\n{df.to_markdown(index=False, floatfmt='.4f')}\n\n"
             f"relative weight difference killed vs uninterrupted: {(num / den) ** 0.5:.2e}")
    print("\n" + table)
    with io.atomic_path(work / "results.md") as tmp:
        tmp.write_text(table + "\n")


if __name__ == "__main__":
    main()
