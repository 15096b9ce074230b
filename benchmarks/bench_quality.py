"""Quality that holds on text the planner never saw: one-shot DP, end-to-end search, and recovery, scored on every
held-out set, with the measured speedup of each saved model; and what the calibration text's source costs.

    python benchmarks/bench_quality.py --work runs/bench-quality --threads 2 [--targets 1.5 2 3]
        [--recover-minutes 1.5] [--sources] [--model DIR]
    python benchmarks/bench_quality.py --work runs/bench-sources --sources-only --profile RUN/profile-....json

Part 1 runs the main job twice on the default encoder (all-MiniLM-L6-v2, batch 8 x 128): `planner run --search 0
--recover-minutes 0` (the DP's plans, one-shot), then `planner run` with its defaults (end-to-end search and
recovery) on the same profile and OBS database. Every model is verified on every shipped held-out set: the
project's own (written with the calibration text) and the two from outside sources (heldout_docs: standard library
docstrings; heldout_packages: package descriptions). The table has each set's Spearman and nearest-neighbour
agreement, the worst set's (the headline), and the saved model's measured speedup with its 95% interval.

Part 2 (--sources; --sources-only with an existing --profile) plans 2x with the calibration text from each source
(the default: the project's prose and its dependencies' docstrings; each of those halves alone; standard-library
docstrings; package descriptions, from the pools benchmarks/make_heldout_sets.py leaves out of the held-out sets,
so no scored passage was calibrated on), applies it (one-shot, open loop: speed is not the question) and scores it
on every held-out set, and reports each source's token coverage of every set (data.token_coverage), the statistic
`verify` warns on.

Part 3 (--refits) applies the same open-loop DP plans (2x, 3x; default calibration) with `--refit module` and
`--refit stream` and scores both on every held-out set.

Writes WORK/results.md and WORK/results.json.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

import planner
from planner import data, io
from planner.adapters.checkpoint import Checkpoint
from planner.config import PlanConfig, ProfileConfig, RunConfig, VerifyConfig
from planner.jobs import run as run_job
from planner.reporting.tables import interval_cell
from planner.types import Plan, VerifyReport

SETS = ("heldout", "docs", "packages")


def _row(variant: str, t: float, rep: VerifyReport) -> dict:
    q = rep.quality
    row = {"variant": variant, "target": t, "measured": rep.measured_speedup,
           "interval": interval_cell(rep)}
    for s in SETS:
        v = q.get("sets", {}).get(s, {})
        row[f"spearman[{s}]"], row[f"nn[{s}]"] = v.get("spearman"), v.get("nn_agree")
    row["spearman (worst)"], row["nn (worst)"] = q["spearman"], q["nn_agree"]
    return row


def part1(a, model: Path, work: Path) -> tuple[list[dict], dict]:
    pcfg = ProfileConfig(batch_size=8, seq_len=128, threads=a.threads)
    dp, full = work / "dp", work / "full"
    t0 = time.perf_counter()
    run_job.run(model, dp, RunConfig(targets=tuple(a.targets), profile=pcfg, plan=PlanConfig(search=0),
                                     recover_minutes=0.0), quiet=True)
    t_dp = time.perf_counter() - t0
    full.mkdir(parents=True, exist_ok=True)                          # the same profile and database
    for f in dp.glob("profile-*.json"):
        shutil.copy(f, full / f.name)
    if not (full / "plans" / "db").exists():
        shutil.copytree(dp / "plans" / "db", full / "plans" / "db")
    t0 = time.perf_counter()
    run_job.run(model, full, RunConfig(targets=tuple(a.targets), profile=pcfg, recover_minutes=a.recover_minutes),
                quiet=True)
    t_full = time.perf_counter() - t0
    rows = []
    for t in a.targets:
        rows.append(_row("one-shot DP", t, VerifyReport.load(dp / "verify" / f"planner-{t:g}x.json")))
        p = Plan.load(full / "plans" / f"plan-{t:g}x.json")
        kept = (p.options.get("search") or {}).get("kept", True)
        rows.append(_row("searched" if kept else "searched (the DP's plan kept)", t,
                         VerifyReport.load(full / "verify" / f"planner-{t:g}x.json")))
        rec = full / "verify" / f"recovered-{t:g}x.json"
        if rec.exists():
            rows.append(_row(f"searched + {a.recover_minutes:g} min recovery", t, VerifyReport.load(rec)))
        rows.append(_row("uniform magnitude", t, VerifyReport.load(dp / "verify" / f"magnitude-{t:g}x.json")))
    return rows, {"dp job s": t_dp, "full job s (same profile and database)": t_full}


def _pools(n: int) -> dict[str, list[str]]:
    """Calibration text per source: the shipped corpus, and the outside sources' sentences not held out."""
    import make_heldout_sets as m
    held = {s: set(data.read_lines(data.shipped(data.HELDOUT_SETS[s]))) for s in ("docs", "packages")}
    docs = sorted(set(m.stdlib_docstrings()) - held["docs"])
    pkgs = sorted(set(m.package_descriptions()[0]) - held["packages"])
    out = {"default (prose + docstrings)": data.read_lines(None), "prose (calibration.txt)":
           data.read_lines(None, data.CALIBRATION), "docstrings (calibration_tech.txt)":
           data.read_lines(None, data.CALIBRATION_TECH)}
    for name, lines in (("stdlib docs pool", docs), ("packages pool", pkgs)):
        random.Random(1).shuffle(lines)
        out[name] = lines[:n]
    return out


def part2(a, model: Path, work: Path) -> list[dict]:
    prof_path = a.profile or next((work / "dp").glob("profile-*.json"))
    ck = Checkpoint.open(model)
    sets = {name: data.sample(data.read_lines(p), 512, seed=1) for name, p in data.heldout_sets().items()}
    rows = []
    for i, (src, lines) in enumerate(_pools(1024).items()):
        calib = work / f"calib-{i}.txt"
        calib.write_text("\n".join(lines) + "\n")
        cfg = PlanConfig(targets=(2.0,), calib_path=str(calib), n_calib=len(lines), search=0, loop_rounds=0)
        [p] = planner.plan(model, prof_path, cfg, work / f"plans-{i}", progress=False)
        out, _ = planner.apply(model, p, work / f"model-calib-{i}", progress=False)
        rep = planner.verify(model, out, VerifyConfig(batch_size=8, seq_len=128, threads=a.threads, reps=5,
                                                      max_reps=5), progress=False)
        row = {"calibrated on": src, "passages": len(lines)}
        for s in SETS:
            row[f"spearman[{s}]"] = rep.quality["sets"][s]["spearman"]
            row[f"coverage[{s}]"] = data.token_coverage(ck.tokenizer, lines, sets[s])
        row["spearman (worst)"], row["nn (worst)"] = rep.quality["spearman"], rep.quality["nn_agree"]
        rows.append(row)
        print(row, flush=True)
    return rows


def part3(a, model: Path, work: Path) -> list[dict]:
    """The sequential refit's target: the same open-loop 2x DP plan (default calibration) applied with
    --refit module (the consumer only, to the module's output) and --refit stream (the default)."""
    import dataclasses
    prof_path = a.profile or next((work / "dp").glob("profile-*.json"))
    rows = []
    for t in (2.0, 3.0):
        [p] = planner.plan(model, prof_path, PlanConfig(targets=(t,), search=0, loop_rounds=0), work / "plans-refit",
                           progress=False)
        for refit in ("module", "stream"):
            q = dataclasses.replace(p, options={**p.options, "refit": refit})
            out, _ = planner.apply(model, q, work / f"model-refit-{refit}-{t:g}x", progress=False)
            rep = planner.verify(model, out, VerifyConfig(batch_size=8, seq_len=128, threads=a.threads, reps=5,
                                                          max_reps=5), progress=False)
            row = {"target": t, "refit": refit}
            for s_ in SETS:
                v = rep.quality["sets"][s_]
                row[f"spearman[{s_}]"], row[f"nn[{s_}]"] = v["spearman"], v["nn_agree"]
            row["spearman (worst)"], row["nn (worst)"] = rep.quality["spearman"], rep.quality["nn_agree"]
            rows.append(row)
            print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-quality"))
    ap.add_argument("--model", type=Path, default=None, help="an encoder directory (default: all-MiniLM-L6-v2)")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--recover-minutes", type=float, default=RunConfig.recover_minutes)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sources", action="store_true", help="also the calibration-source table (part 2)")
    ap.add_argument("--sources-only", action="store_true", help="only parts 2 (and 3 with --refits), on --profile")
    ap.add_argument("--refits", action="store_true", help="also the refit table (part 3)")
    ap.add_argument("--profile", type=Path, default=None, help="part 2's profile (default: part 1's)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.model or run_job.default_model()
    import pandas as pd
    if a.sources_only and not a.profile:
        ap.error("--sources-only needs --profile")
    rows, times = part1(a, model, a.work) if not a.sources_only else ([], {})
    text = (f"Conditions: all-MiniLM-L6-v2, batch 8 x 128, {a.threads} threads, torch {torch.__version__}; held-out "
            f"sets: {', '.join(SETS)} (512 passages each)" +
            (f"; job times {json.dumps({k: round(v) for k, v in times.items()})}" if times else "") +
            "\n\n" + (pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f") if rows else ""))
    src = part2(a, model, a.work) if a.sources or a.sources_only else []
    if src:
        text += "\n\nCalibration source (2x, one-shot DP, open loop):\n\n" + \
            pd.DataFrame(src).to_markdown(index=False, floatfmt=".3f")
    ref = part3(a, model, a.work) if a.refits else []
    if ref:
        text += "\n\nSequential refit (open-loop DP plans, default calibration):\n\n" + \
            pd.DataFrame(ref).to_markdown(index=False, floatfmt=".3f")
    print(text)
    with io.atomic_path(a.work / "results.md") as tmp:
        tmp.write_text(text + "\n")
    io.write_json(a.work / "results.json", {"rows": rows, "times": times, "sources": src, "refits": ref})


if __name__ == "__main__":
    main()
