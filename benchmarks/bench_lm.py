"""Decoder LM benchmark: the project's trained small Llama (GQA), prefill and decode, planner vs uniform magnitude.

For each regime (prefill: batch 8 x 128-token prompts, time to the first token; decode: batch 8, one new token
per sequence against a 128-token KV cache) the whole job runs: profile on this machine, OBS database + DP for
every target, apply (sequential OBS weights) and the uniform magnitude baseline at the same predicted speedup,
verify (interleaved timing; perplexity on held-out text). Every stage resumes from --work.
The model is trained once and cached (tinylm.ensure).

    python benchmarks/bench_lm.py --work runs/bench-lm --threads 2 [--targets 1.5 2] [--modes prefill decode]

Prints one table per regime and the issue's bars: measured >= 0.95 x target, |predicted/measured - 1| <= 5%,
and the baseline's perplexity increase at least 3x the planner's at the same target.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import tinylm
import torch

from planner.config import PlanConfig, ProfileConfig, RecoverConfig, VerifyConfig
from planner.jobs import run as pipeline
from planner.stages.profile import default_profile_path
from planner.types import LatencyProfile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-lm"))
    ap.add_argument("--model", type=Path, default=None, help="a causal LM directory (default: the trained tiny LM)")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--modes", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="prompt length (prefill) / KV-cache length (decode)")
    ap.add_argument("--rounds", type=int, default=4, help="profile rounds")
    ap.add_argument("--reps", type=int, default=21, help="verify: interleaved timing pairs")
    ap.add_argument("--save-profiles", type=Path, default=None, help="also copy the profiles under this root")
    ap.add_argument("--n-calib", type=int, default=1024, help="generated calibration passages")
    ap.add_argument("--n-text", type=int, default=512, help="held-out generated passages for perplexity")
    ap.add_argument("--recover-minutes", type=float, default=0.0,
                    help="distillation per planned model, on the generated calibration text (default 0: one-shot)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = a.model or tinylm.ensure()
    print(f"model: {model}")
    # Text from the distribution the tiny LM learned: calibration from its training generator (as one calibrates
    # on a sample of the pre-training corpus), evaluation on held-out generated passages it never saw.
    a.work.mkdir(parents=True, exist_ok=True)
    calib, heldout = a.work / "calibration.txt", a.work / "heldout.txt"
    if not calib.exists():
        calib.write_text("\n".join(tinylm.generate(a.n_calib)) + "\n")
    if not heldout.exists():
        heldout.write_text("\n".join(tinylm.lm_heldout_text(a.n_text)) + "\n")
    summary = []
    for mode in a.modes:
        cfg = pipeline.RunConfig(
            targets=tuple(a.targets),
            profile=ProfileConfig(batch_size=a.batch, seq_len=a.seq, mode=mode, threads=a.threads, rounds=a.rounds),
            plan=PlanConfig(targets=tuple(a.targets), calib_path=str(calib), n_calib=a.n_calib),
            verify=VerifyConfig(reps=a.reps, threads=a.threads, text_path=str(heldout), n_text=a.n_text),
            recover=RecoverConfig(data_path=str(calib)), recover_minutes=a.recover_minutes)
        print(f"\n## {mode}: batch {a.batch}, {'prompt' if mode == 'prefill' else 'KV cache'} {a.seq} tokens")
        df = pipeline.run(model, a.work / mode, cfg, quiet=True)
        prof_path = next((a.work / mode).glob("profile-*.json"))
        prof = LatencyProfile.load(prof_path)
        print(f"largest reachable speedup (all blocks removed, as timed): {prof.max_speedup():.2f}x")
        if a.save_profiles:
            dst = default_profile_path(prof, a.save_profiles)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(prof_path, dst)
        for t in a.targets:
            p = df[(df.method == "planner") & (df.target == t)].iloc[0]
            b = df[(df.method != "planner") & (df.target == t)]
            b = b.iloc[0] if len(b) else None
            summary.append({
                "mode": mode, "target": t, "measured": p.measured, "speed bar (>= 0.95 t)": p.measured >= 0.95 * t,
                "pred/meas-1": p["pred/meas-1"], "prediction bar (<= 5%)": abs(p["pred/meas-1"]) <= 0.05,
                "ppl +planner": p.ppl_increase, "ppl +magnitude": None if b is None else b.ppl_increase,
                "magnitude measured": None if b is None else b.measured,
                "quality bar (>= 3x)": None if b is None else b.ppl_increase >= 3 * p.ppl_increase})
    print("\n## bars")
    print("| regime | target | measured | ≥0.95×target | pred/meas−1 | ≤5% | ppl increase planner | ppl increase "
          "magnitude (its measured speedup) | magnitude ≥ 3× planner |\n|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        mag = "n/a" if r["ppl +magnitude"] is None else f"{r['ppl +magnitude']:+.1%} ({r['magnitude measured']:.2f}x)"
        print(f"| {r['mode']} | {r['target']:g}x | {r['measured']:.2f}x | {'yes' if r['speed bar (>= 0.95 t)'] else 'NO'} "
              f"| {r['pred/meas-1']:+.1%} | {'yes' if r['prediction bar (<= 5%)'] else 'NO'} | {r['ppl +planner']:+.1%} "
              f"| {mag} | {'yes' if r['quality bar (>= 3x)'] else 'NO'} |")


if __name__ == "__main__":
    main()
