"""How much does distillation recover, how fast, and does it leave the speed alone?

    python benchmarks/bench_recover.py [--run runs/b8-v3] [--targets 2 3] [--budgets 2.5 5 10] [--threads 2]
                                       [--work runs/recover-bench] [--set lr=2e-4 --set concat=0.5 ...]

For each target, the one-shot student `RUN/models/planner-<t>x` (from `planner run`) is distilled from the
dense model with `planner.recover` under each time budget (separate runs: a schedule made for a shorter budget
anneals earlier than the middle of a longer one). During the longest run, after every held-back evaluation,
the benchmark scores the student on the held-out text (`planner/data/heldout.txt`, 512 passages, seed 1 as `planner verify`; never
trained on) with the training clock stopped, which gives quality against recovery time. Then dense, one-shot
and recovered models are timed in one interleaved run (rotating order, batch × seq of the run's profile) to
show that recovery leaves the measured speedup where it was.

Writes WORK/results.json, WORK/results.md and WORK/quality-vs-time.png.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch

from planner import api, hardware, io
from planner.config import RecoverConfig
from planner.data import HELDOUT, latency_inputs, read_lines, sample
from planner.models import load_model, load_tokenizer
from planner.pipeline import default_model
from planner.timing import median, spread, time_calls
from planner.types import LatencyProfile
from planner.verify import embeddings, similarity_quality


def _parse_set(items: list[str]) -> dict:
    types = {f.name: f.type for f in fields(RecoverConfig)}
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        if k not in types:
            raise SystemExit(f"unknown RecoverConfig field {k}")
        out[k] = None if v == "None" else (v.lower() in ("1", "true", "yes")) if "bool" in str(types[k]) else \
            int(v) if types[k] in ("int", "int | None") else float(v) if "float" in str(types[k]) else v
    return out


def time_three(models: dict, vocab: int, batch: int, seq: int, reps: int) -> dict:
    """Median seconds per forward of each model, timed in rotating order on the same inputs."""
    x = latency_inputs(vocab, batch, seq)
    fns = {k: (lambda m=m: m(**x)) for k, m in models.items()}
    for f in fns.values():
        time_calls(f, 1, 2)
    acc = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in (order if r % 2 == 0 else order[::-1]):
            acc[k].extend(time_calls(fns[k], 1, 0))
    return {k: {"median": median(v), "spread": spread(v)} for k, v in acc.items()} | {"_raw": acc}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/b8-v3", help="a `planner run` directory (models/planner-<t>x, profile)")
    ap.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    ap.add_argument("--minutes", type=float, default=10.0, help="recovery budget per target")
    ap.add_argument("--budgets", type=float, nargs="*", default=None,
                    help="separate runs with these budgets (minutes; the longest also gives the curve)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15, help="interleaved timing rounds")
    ap.add_argument("--work", default="runs/recover-bench")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="RecoverConfig field=value")
    ap.add_argument("--no-timing", action="store_true", help="skip the speed measurement (probes)")
    a = ap.parse_args()
    hardware.set_threads(a.threads)
    run, work = Path(a.run), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model_path = default_model()
    prof = LatencyProfile.load(next(run.glob("profile-*.json")))
    cfg = RecoverConfig(**{"minutes": a.minutes, "threads": a.threads, **_parse_set(a.overrides)})
    dense, adapter = load_model(model_path)
    tok = load_tokenizer(model_path)
    texts = sample(read_lines(None, HELDOUT), 512, seed=1)
    e_dense = embeddings(dense, adapter, tok, texts)

    def heldout(model) -> dict:
        return similarity_quality(e_dense, embeddings(model, adapter, tok, texts))

    rows, curves, points = [], {}, {}
    budgets = sorted(a.budgets or [a.minutes])
    for t in a.targets:
        src = run / "models" / f"planner-{t:g}x"
        oneshot, _ = load_model(src)
        q0 = heldout(oneshot)
        curve = [{"minutes": 0.0, "step": 0, **q0}]
        points[f"{t:g}x"] = []

        def on_eval(row, student, curve=curve, t=t):
            if row["step"] == 0:
                return
            q = heldout(student)
            curve.append({"minutes": row["elapsed"] / 60, "step": row["step"], "val_total": row["val_total"], **q})
            print(f"  {t:g}x step {row['step']:5d} {row['elapsed']/60:5.2f} min  val {row['val_total']:.4f}  "
                  f"held-out cosine {q['cosine']:.3f} spearman {q['spearman']:.3f} nn_agree {q['nn_agree']:.3f}",
                  flush=True)

        for budget in budgets:
            longest = budget == budgets[-1]
            c = RecoverConfig(**{**cfg.to_dict(), "minutes": budget})
            out = work / f"recovered-{t:g}x-{budget:g}min"
            t0 = time.perf_counter()
            rep = api.recover(src, model_path, c, out=out, progress=False, callback=on_eval if longest else None)
            wall = time.perf_counter() - t0
            rec, _ = load_model(out)
            q1 = heldout(rec)
            points[f"{t:g}x"].append({"minutes": rep.train_time / 60, **q1})
            row = {"target": f"{t:g}x", "budget_min": budget, "oneshot_spearman": q0["spearman"],
                   "oneshot_nn": q0["nn_agree"], "recovered_spearman": q1["spearman"], "recovered_nn": q1["nn_agree"],
                   "oneshot_cosine": q0["cosine"], "recovered_cosine": q1["cosine"],
                   "train_min": rep.train_time / 60, "wall_min": wall / 60, "steps": rep.steps,
                   "epochs": rep.epochs, "stop": rep.stop, "best_step": rep.best_step}
            if longest:
                curves[f"{t:g}x"] = curve
                if not a.no_timing:
                    tm = time_three({"dense": dense, "oneshot": oneshot, "recovered": rec},
                                    adapter.shape(dense).vocab, prof.batch_size, prof.seq_len, a.reps)
                    row["speedup_oneshot"] = tm["dense"]["median"] / tm["oneshot"]["median"]
                    row["speedup_recovered"] = tm["dense"]["median"] / tm["recovered"]["median"]
                    row["speed_change"] = row["speedup_recovered"] / row["speedup_oneshot"] - 1
            rows.append(row)
            print(pd.DataFrame([row]).to_markdown(index=False, floatfmt=".3f"), flush=True)

    df = pd.DataFrame(rows)
    cond = (f"{hardware.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; timing at batch "
            f"{prof.batch_size} x seq {prof.seq_len}; held-out: 512 passages of planner/data/heldout.txt")
    settings = {k: v for k, v in cfg.to_dict().items() if v != getattr(RecoverConfig, k, None) or k == "minutes"}
    table = f"Conditions: {cond}\nRecoverConfig (non-default): {settings}\n\n" + df.to_markdown(index=False,
                                                                                                floatfmt=".3f")
    print("\n" + table)
    with io.atomic_path(work / "results.md") as tmp:
        tmp.write_text(table + "\n")
    io.write_json(work / "results.json", {"conditions": cond, "config": cfg.to_dict(), "rows": rows, "curves": curves,
                                          "points": points})
    plot(curves, points, work / "quality-vs-time.png", torch.get_num_threads())


def plot(curves: dict, points: dict, path: Path, threads: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for (name, curve), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        x = [c["minutes"] for c in curve]
        for ax, key in zip(axes, ("spearman", "nn_agree")):
            ax.plot(x, [c[key] for c in curve], marker=".", color=color, label=f"{name}: during the longest run")
            ax.plot([p["minutes"] for p in points[name]], [p[key] for p in points[name]], "D", color=color,
                    label=f"{name}: end of a run with that budget")
            ax.axhline(curve[0][key], color=color, ls=":", lw=1, label=f"{name} one-shot")
    for ax, key in zip(axes, ("Spearman of pairwise similarity", "nearest-neighbour agreement")):
        ax.set_xlabel(f"recovery time (min, {threads} CPU threads)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2: held-out quality against distillation time")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
