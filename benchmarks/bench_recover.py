"""How much does distillation recover, how fast, and does it leave the speed alone?

    python benchmarks/bench_recover.py [--run runs/b8-v3] [--targets 2 3] [--budgets 2.5 5 10] [--threads 2]
                                       [--work runs/recover-bench] [--recover-lr 2e-4 --recover-concat 0.5 ...]
    python benchmarks/bench_recover.py --run runs/bench-lm/decode --targets 2 --work runs/recover-lm
                                       [--lm-train-passages 20000]

For each target, the one-shot student `RUN/models/planner-<t>x` (from `planner run`) is distilled from the
dense model it was planned from (the plan's model path) with `planner.recover` under each time budget (separate
runs: a schedule made for a shorter budget anneals earlier than the middle of a longer one). During the longest
run, after every held-back evaluation, the benchmark scores the student on held-out text with the training
clock stopped, which gives quality against recovery time:
  encoders     similarity of 512 passages of `planner/data/heldout.txt` (seed 1, as `planner verify`) to the
               dense model's: Spearman of pairwise similarity, nearest-neighbour agreement, cosine;
  causal LMs   perplexity and next-token agreement with the dense model on RUN/../heldout.txt (bench_lm's
               generated held-out passages); the training text, unless --recover-data is given, is passages of the
               tiny LM's own training generator (tinylm), never the held-out seed.
Then dense, one-shot and recovered models are timed in one interleaved run (rotating order) in the regime and
at the batch x seq of the run's profile, to show that recovery leaves the measured speedup where it was. The
timing runs in a spawned process: this one has trained, and a process that has trained can time slow.

Writes WORK/results.json, WORK/results.md and WORK/quality-vs-time.png.
"""
from __future__ import annotations

import time
from pathlib import Path

import click
import pandas as pd
import torch

from planner import api, hardware, io
from planner.adapters.checkpoint import load_model, load_tokenizer
from planner.cli import config_from, config_options
from planner.config import RecoverConfig
from planner.data import HELDOUT, read_lines, sample
from planner.stages.regimes import latency_call
from planner.stages.verify import embeddings, lm_quality, similarity_quality
from planner.timing import interleaved, median, spread, time_calls
from planner.types import LatencyProfile, Plan

# held-out metrics per model kind: (keys shown in the table and the plot, plot titles)
METRICS = {False: (("spearman", "nn_agree", "cosine"), ("Spearman of pairwise similarity",
                                                         "nearest-neighbour agreement")),
           True: (("ppl_increase", "top1_agree", "ppl"), ("perplexity increase over the dense model",
                                                          "next-token agreement with the dense model"))}


def time_three(models: dict, adapter, prof: LatencyProfile, reps: int) -> dict:
    """Median seconds per timed call (the profile's regime, batch and seq) of each model, in rotating order."""
    fns = {k: latency_call(m, adapter, prof.mode, prof.batch_size, prof.seq_len) for k, m in models.items()}
    with torch.inference_mode():
        for f in fns.values():
            time_calls(f, 0, 2)
        acc = dict(zip(fns, interleaved(list(fns.values()), reps)))
    return {k: {"median": median(v), "spread": spread(v)} for k, v in acc.items()} | {"_raw": acc}


def _time_paths(paths: dict, prof_path: str, reps: int, threads) -> dict:
    """time_three on the models saved at `paths`, in this (fresh) process."""
    hardware.set_threads(threads)
    loaded = {k: load_model(p) for k, p in paths.items()}
    return time_three({k: m for k, (m, _) in loaded.items()}, next(iter(loaded.values()))[1],
                      LatencyProfile.load(prof_path), reps)


def time_apart(paths: dict, prof_path, reps: int, threads) -> dict:
    """time_three in a spawned process: this one has trained, and a process that has trained can time models
    slow afterwards (docs/results.md, "Timing after training")."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(_time_paths, {k: str(v) for k, v in paths.items()}, str(prof_path), reps, threads).result()


def _heldout(model_path, adapter, run: Path, dense):
    """model -> held-out quality dict against `dense` (see the module docstring)."""
    tok = load_tokenizer(model_path)
    if adapter.causal_lm:
        texts = read_lines(run.parent / "heldout.txt", "held-out text")
        return lambda model: lm_quality(dense, model, tok, texts, window=128)
    texts = sample(read_lines(None, HELDOUT), 512, seed=1)
    e_dense = embeddings(dense, adapter, tok, texts)
    return lambda model: similarity_quality(e_dense, embeddings(model, adapter, tok, texts))


@click.command(help=__doc__)
@click.option("--run", "run_dir", default="runs/b8-v3", help="a `planner run` directory (models/planner-<t>x, profile)")
@click.option("--targets", type=float, multiple=True, default=(2.0, 3.0))
@click.option("--budgets", type=float, multiple=True, default=(10.0,),
              help="separate runs with these budgets (minutes; the longest also gives the curve)")
@click.option("--threads", type=int, default=2)
@click.option("--reps", type=int, default=15, help="interleaved timing rounds")
@click.option("--work", default="runs/recover-bench")
@click.option("--no-timing", is_flag=True, help="skip the speed measurement (probes)")
@click.option("--lm-train-passages", type=int, default=20000,
              help="causal LMs without --recover-data: generated training passages (tinylm)")
@config_options("bench_recover", RecoverConfig, prefix="recover-", exclude=("minutes", "threads"))
def main(run_dir, targets, budgets, threads, reps, work, no_timing, lm_train_passages, **kw):
    a = type("Args", (), {"run": run_dir, "targets": targets, "budgets": budgets, "minutes": max(budgets),
                          "threads": threads, "reps": reps, "work": work, "no_timing": no_timing,
                          "lm_train_passages": lm_train_passages})
    hardware.set_threads(a.threads)
    run, work = Path(a.run), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prof_path = next(run.glob("profile-*.json"))
    prof = LatencyProfile.load(prof_path)
    model_path = Path(Plan.load(next((run / "plans").glob("plan-*.json"))).model["path"])
    dense, adapter = load_model(model_path)
    cfg = config_from(RecoverConfig, kw, prefix="recover-", exclude=("minutes", "threads"), minutes=a.minutes,
                      threads=a.threads)
    if adapter.causal_lm and cfg.data_path is None:
        import tinylm
        train = work / "train.txt"
        if not train.exists():
            with io.atomic_path(train) as tmp:
                tmp.write_text("\n".join(tinylm.generate(a.lm_train_passages, seed=tinylm.TRAIN_SEED)) + "\n")
        cfg = cfg.replace(data_path=str(train))
    heldout = _heldout(model_path, adapter, run, dense)
    keys, titles = METRICS[adapter.causal_lm]

    rows, curves, points = [], {}, {}
    budgets = sorted(a.budgets)
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
            print(f"  {t:g}x step {row['step']:5d} {row['elapsed']/60:5.2f} min  val {row['val_total']:.4f}  held-out "
                  + " ".join(f"{k} {q[k]:.3f}" for k in keys), flush=True)

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
            row = {"target": f"{t:g}x", "budget_min": budget,
                   **{f"{w}_{k}": q[k] for k in keys for w, q in (("oneshot", q0), ("recovered", q1))},
                   "train_min": rep.train_time / 60, "wall_min": wall / 60, "steps": rep.steps,
                   "epochs": rep.epochs, "stop": rep.stop, "best_step": rep.best_step}
            if longest:
                curves[f"{t:g}x"] = curve
                if not a.no_timing:
                    tm = time_apart({"dense": model_path, "oneshot": src, "recovered": out}, prof_path, a.reps,
                                    a.threads)
                    row["speedup_oneshot"] = tm["dense"]["median"] / tm["oneshot"]["median"]
                    row["speedup_recovered"] = tm["dense"]["median"] / tm["recovered"]["median"]
                    row["speed_change"] = row["speedup_recovered"] / row["speedup_oneshot"] - 1
            rows.append(row)
            print(pd.DataFrame([row]).to_markdown(index=False, floatfmt=".3f"), flush=True)

    df = pd.DataFrame(rows)
    held = f"{run.parent / 'heldout.txt'} (perplexity, 128-token windows)" if adapter.causal_lm else \
        "512 passages of planner/data/heldout.txt"
    cond = (f"{hardware.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; timing: "
            f"{prof.mode}, batch {prof.batch_size} x seq {prof.seq_len}; held-out: {held}")
    settings = {k: v for k, v in cfg.to_dict().items() if v != getattr(RecoverConfig, k, None) or k == "minutes"}
    table = f"Conditions: {cond}\nRecoverConfig (non-default): {settings}\n\n" + df.to_markdown(index=False,
                                                                                                floatfmt=".3f")
    print("\n" + table)
    with io.atomic_path(work / "results.md") as tmp:
        tmp.write_text(table + "\n")
    io.write_json(work / "results.json", {"conditions": cond, "config": cfg.to_dict(), "rows": rows, "curves": curves,
                                          "points": points})
    plot(curves, points, work / "quality-vs-time.png", torch.get_num_threads(), keys[:2], titles,
         f"{model_path.name}: held-out quality against distillation time")


def plot(curves: dict, points: dict, path: Path, threads: int, keys=("spearman", "nn_agree"),
         titles=METRICS[False][1], suptitle=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for (name, curve), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        x = [c["minutes"] for c in curve]
        for ax, key in zip(axes, keys):
            ax.plot(x, [c[key] for c in curve], marker=".", color=color, label=f"{name}: during the longest run")
            ax.plot([p["minutes"] for p in points[name]], [p[key] for p in points[name]], "D", color=color,
                    label=f"{name}: end of a run with that budget")
            ax.axhline(curve[0][key], color=color, ls=":", lw=1, label=f"{name} one-shot")
    for ax, key in zip(axes, titles):
        ax.set_xlabel(f"recovery time (min, {threads} CPU threads)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(suptitle)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
