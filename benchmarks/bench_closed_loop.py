"""Delivered speedup against the target: profile -> plan (closed loop) -> apply -> verify, per scenario.

    python benchmarks/bench_closed_loop.py --work runs/bench-closed-loop --threads 2
        [--scenarios encoder-b8 encoder-b1 tinylm-prefill tinylm-decode tinylm-score] [--targets 1.5 2 3]
        [--search 0] [--diagnose]

Scenarios: the default encoder (all-MiniLM-L6-v2) at batch 8 and batch 1 x 128 tokens; the project's trained tiny
Llama (benchmarks/tinylm.py) at batch 8 x 128 in the prefill, decode and score regimes. Each runs `planner run`
(with the uniform magnitude baseline for encoder-b8; no recovery, which keeps the architecture; by default no
end-to-end search, whose timed plans bench_quality.py measures) in WORK/<scenario>, which resumes. Targets beyond
what the scenario's profile reaches are left out and said so.

Per target the table shows the open-loop prediction (what the profile alone predicted for the DP's first plan),
every loop round's measurement (the checkpoint's weights, interleaved against a copy of the dense model, 95%
interval), the loop's status and time, and the saved model's final measured speedup: the job's `verify`, dense
and compressed timed in one interleaved run until the interval is +-1% (or 60 pairs), with its interval and the
ratio to the target (a saved model outside the tolerance is planned once more: `planner run` does it); and
"fresh verify": the same saved model re-measured by `planner verify` in a process of its own, as its user would.

--diagnose also times, right after encoder-b8's profile, architectures that isolate where the additive latency
model errs: attention cut alone, the FFN of every block cut alone (three widths, and a plan's mixed widths),
both cut uniformly, everything's FFN removed; each predicted by the profile and measured twice (30 pairs).

Writes WORK/results.md and WORK/results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from planner import io
from planner.config import PlanConfig, ProfileConfig, RunConfig, VerifyConfig
from planner.jobs import run as run_job
from planner.stages.loop import ArchTimer
from planner.types import LatencyProfile, Plan, VerifyReport

SCENARIOS = {
    "encoder-b8": dict(model="minilm", batch=8, mode="prefill", baseline=True),
    "encoder-b1": dict(model="minilm", batch=1, mode="prefill", baseline=False),
    "tinylm-prefill": dict(model="tinylm", batch=8, mode="prefill", baseline=False),
    "tinylm-decode": dict(model="tinylm", batch=8, mode="decode", baseline=False),
    "tinylm-score": dict(model="tinylm", batch=8, mode="score", baseline=False),
}


def _model(kind: str, work: Path) -> tuple[Path, dict]:
    """(model directory, plan/verify text settings) of a scenario's model."""
    if kind == "minilm":
        return run_job.default_model(), {}
    import tinylm
    calib, held = work / "tinylm-calibration.txt", work / "tinylm-heldout.txt"
    if not calib.exists():
        calib.write_text("\n".join(tinylm.generate(1024)) + "\n")
    if not held.exists():
        held.write_text("\n".join(tinylm.lm_heldout_text(512)) + "\n")
    return tinylm.ensure(), {"calib_path": str(calib), "text_path": str(held)}


def _reachable(work: Path, model: Path, pcfg: ProfileConfig, targets) -> tuple[list[float], list[float]]:
    """The targets the scenario's profile reaches (profiling first if needed), and those it does not."""
    regime = "" if pcfg.mode == "prefill" else f"{pcfg.mode}-"
    path = work / f"profile-{regime}b{pcfg.batch_size}-s{pcfg.seq_len}-{pcfg.dtype}.json"
    if not path.exists():
        import planner
        planner.profile(model, pcfg, out=path, progress=False)
    top = LatencyProfile.load(path).max_speedup() * 0.97           # a little room for the loop's corrections
    return [t for t in targets if t <= top], [t for t in targets if t > top]


def scenario(name: str, a, work: Path) -> list[dict]:
    spec = SCENARIOS[name]
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    model, text = _model(spec["model"], work)
    pcfg = ProfileConfig(batch_size=spec["batch"], seq_len=128, mode=spec["mode"], threads=a.threads)
    targets, skipped = _reachable(out, model, pcfg, a.targets)
    for t in skipped:
        print(f"{name}: {t:g}x is beyond the profile's reach, left out", flush=True)
    if not targets:
        return []
    cfg = RunConfig(targets=tuple(targets), profile=pcfg,
                    plan=PlanConfig(calib_path=text.get("calib_path"), tolerance=a.tolerance, search=a.search),
                    verify=VerifyConfig(text_path=text.get("text_path")), baseline=spec["baseline"],
                    recover_minutes=0)      # recovery keeps the architecture (bench_quality.py times recovered models)
    t0 = time.perf_counter()
    run_job.run(model, out, cfg, quiet=True)
    wall = time.perf_counter() - t0
    rows = []
    for method in ("planner", "magnitude-uniform") if spec["baseline"] else ("planner",):
        tag = "" if method == "planner" else "-magnitude-uniform"
        for t in targets:
            p = Plan.load(out / "plans" / f"plan{tag}-{t:g}x.json")
            mname = "planner" if method == "planner" else "magnitude"
            rep = VerifyReport.load(out / "verify" / f"{mname}-{t:g}x.json")
            loop = p.options.get("closed_loop") or {}
            rounds = loop.get("rounds", [])
            rows.append({
                "scenario": name, "method": method, "target": t,
                "open-loop predicted": rounds[0]["open_loop_predicted"] if rounds else None,
                "loop rounds (measured)": " -> ".join(f"{r['measured']:.2f}" for r in rounds),
                "loop status": loop.get("status", "off"), "loop s": loop.get("seconds"),
                "replanned after verify": "replanned" in p.options,
                "measured": rep.measured_speedup, "interval": rep.interval, "pairs": rep.conditions.get("pairs"),
                "meas/target": rep.measured_speedup / t,
                "fresh verify": _fresh_verify(model, out / "models" / f"{mname}-{t:g}x", pcfg, text) / t,
                **{k: rep.quality.get(k) for k in
                                                            ("spearman", "nn_agree", "ppl_increase")},
                "job wall s": wall})
    return rows


def _fresh_verify(dense: Path, comp: Path, pcfg: ProfileConfig, text: dict) -> float:
    """The saved model's speedup as a user re-measures it: `planner verify` in a process of its own (the job's
    verify runs inside the job, after everything the job allocated), in the profile's regime and threads."""
    cmd = [sys.executable, "-m", "planner.cli", "verify", str(dense), str(comp), "-b", str(pcfg.batch_size), "-s",
           str(pcfg.seq_len), "--mode", pcfg.mode, "--threads", str(pcfg.threads), "--n-text", "16", "--json", "-q"]
    if text.get("text_path"):
        cmd += ["--text", text["text_path"]]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(r.stdout[r.stdout.index("{"):])["measured_speedup"])


def diagnose(a, work: Path) -> list[dict]:
    """Architectures that isolate where the additive model errs, on encoder-b8's profile (module docstring)."""
    out = work / "encoder-b8"
    prof = LatencyProfile.load(next(out.glob("profile-*.json")))
    model = run_job.default_model()
    timer = ArchTimer(model, prof)
    L, H, F = prof.arch.n_layers, prof.arch.attn_units, prof.arch.ffn
    p2 = Plan.load(out / "plans" / "plan-2x.json").kept if (out / "plans" / "plan-2x.json").exists() else None
    archs = {"attention 6 of 12 heads everywhere": [{"heads": 6, "ffn": F}] * L,
             "FFN 64 of 1536 everywhere": [{"heads": H, "ffn": 64}] * L,
             "FFN 320 everywhere": [{"heads": H, "ffn": 320}] * L,
             "FFN 768 everywhere": [{"heads": H, "ffn": 768}] * L,
             "every FFN removed": [{"heads": H, "ffn": 0}] * L,
             "6 heads and FFN 704 everywhere": [{"heads": 6, "ffn": 704}] * L,
             "4 heads and FFN 448 everywhere": [{"heads": 4, "ffn": 448}] * L}
    if p2:
        archs["the 2x plan's FFN widths, attention dense"] = [{"heads": H, "ffn": l["ffn"]} for l in p2]
        archs["the 2x plan"] = p2
    rows = []
    first = timer.measure(list(archs.values()), 0.005, min_rounds=30, max_rounds=30)
    second = timer.measure(list(archs.values()), 0.005, min_rounds=30, max_rounds=30)
    for (name, arch), r1, r2 in zip(archs.items(), first, second):
        pred = prof.base["median"] / prof.predict(arch)
        meas = 2 / (r1.value + r2.value)
        rows.append({"architecture": name, "predicted": pred, "measured (two runs)": f"{1/r1.value:.3f}, {1/r2.value:.3f}",
                     "pred/meas-1": pred / meas - 1})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-closed-loop"))
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--tolerance", type=float, default=PlanConfig.tolerance)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--search", type=int, default=0, help="end-to-end search candidates per target (the main job's "
                    "default is 64; bench_quality.py measures the searched plans)")
    ap.add_argument("--diagnose", action="store_true", help="also time the architectures that locate the bias")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    import pandas as pd
    rows = []
    for name in a.scenarios:
        print(f"== {name}", flush=True)
        got = scenario(name, a, a.work)
        rows += got
        if got:
            print(pd.DataFrame(got).drop(columns=["interval"]).to_markdown(index=False, floatfmt=".3f"), flush=True)
    diag = diagnose(a, a.work) if a.diagnose and "encoder-b8" in a.scenarios else []
    df = pd.DataFrame(rows)
    df["interval"] = df["interval"].map(lambda iv: f"[{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")
    cond = (f"{torch.get_num_threads()} threads, torch {torch.__version__}; 128 tokens; tolerance {a.tolerance:.0%}; "
            f"verify until +-1% (at most 60 pairs)")
    text = f"Conditions: {cond}\n\n" + df.to_markdown(index=False, floatfmt=".3f")
    if diag:
        text += "\n\nWhere the additive model errs (encoder-b8 profile, 30 interleaved pairs per run):\n\n" + \
            pd.DataFrame(diag).to_markdown(index=False, floatfmt=".3f")
    print("\n" + text)
    with io.atomic_path(a.work / "results.md") as tmp:
        tmp.write_text(text + "\n")
    io.write_json(a.work / "results.json", json.loads(json.dumps({"conditions": cond, "rows": rows, "diagnosis": diag},
                                                                  default=str)))


if __name__ == "__main__":
    main()
