"""Text tables and one-line summaries of plans, verify reports and recovery, written once for the CLI, the jobs,
the HTML report and the benchmarks. Every quality metric's name, format and direction lives in METRICS."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..types import LatencyProfile, Plan, RecoverReport, VerifyReport

if TYPE_CHECKING:
    import pandas as pd

# metric -> (format, what it is, its value for the dense model itself: None where it has none)
METRICS = {
    "cosine": (".3f", "mean cosine of the dense and compressed embedding of each passage", 1.0),
    "spearman": (".3f", "Spearman correlation of the pairwise-similarity matrices", 1.0),
    "nn_agree": (".3f", "share of passages whose nearest neighbour is the same", 1.0),
    "ppl_dense": (".2f", "perplexity of the dense model", None),
    "ppl": (".2f", "perplexity of the compressed model", None),
    "ppl_increase": ("+.1%", "relative perplexity increase", 0.0),
    "top1_agree": (".3f", "share of positions where both models predict the same next token", 1.0),
    "tokens_per_s": (".0f", "decode throughput of the compressed model", None),
}
# (every metric a row shows, the headline metrics): encoders / causal LMs
QUALITY = {False: (("cosine", "spearman", "nn_agree"), ("spearman", "nn_agree")),
           True: (("ppl", "ppl_increase", "top1_agree"), ("ppl_increase", "top1_agree"))}
# plotted against speedup (the first two present)
PLOTTED = ("spearman", "nn_agree", "cosine", "ppl_increase", "top1_agree")


def fmt(metric: str, value) -> str:
    return "n/a" if value is None else format(value, METRICS[metric][0])


def layer_cell(plan_layer: dict, kind: str) -> str:
    """"12" (kept width) or "1536@s90" (full width, the module's linears 90% sparse)."""
    key = "heads" if kind == "attn" else "ffn"
    sp = plan_layer.get(f"{kind}_sparsity", 0)
    return f"{plan_layer[key]}" + (f"@s{sp * 100:g}" if sp else "")


def format_plan_table(plans: list[Plan]) -> str:
    """Per-layer kept heads / FFN width for each target, side by side; the prediction and, where the closed loop
    ran, the measured speedup of the architecture and the loop's rounds."""
    rows = ["layer " + " ".join(f"{p.target_speedup:>5g}x heads/ffn" for p in plans)]
    for l in range(len(plans[0].layers)):
        rows.append(f"{l:5d} " + " ".join(f"{layer_cell(p.layers[l], 'attn'):>8}/{layer_cell(p.layers[l], 'ffn'):<7}"
                                          for p in plans))
    rows.append("pred  " + " ".join(f"{p.predicted_speedup:>14.2f}x " for p in plans))
    loops = [p.options.get("closed_loop") or {} for p in plans]
    if any("measured" in c for c in loops):
        rows.append("meas  " + " ".join(f"{c['measured']:>14.2f}x " if "measured" in c else f"{'-':>15} "
                                        for c in loops))
        rows.append("rounds" + " ".join(f"{len(c.get('rounds', [])):>15d} " for c in loops))
    return "\n".join(rows)


def loop_lines(p: Plan) -> list[str]:
    """Every round of a plan's closed loop: open-loop and corrected prediction, measurement and its interval."""
    c = p.options.get("closed_loop") or {}
    if "rounds" not in c:
        return [f"{p.target_speedup:g}x: closed loop {c.get('status', 'off')}"]
    out = [f"{p.target_speedup:g}x: {c['status']} (tolerance {c['tolerance']:.0%}, round {c['chosen']} kept)"]
    for r in loop_rows(p):
        out.append(f"  round {r['round']}: predicted {r['predicted']} (profile alone {r['profile alone']}), measured "
                   f"{r['measured']} {r['95% interval']} over {r['pairs']} pairs, correction {r['correction']}")
    return out


def per_set(q: dict) -> dict:
    """The headline metrics on each held-out set, as columns "spearman[docs]" (where there is more than one)."""
    sets = q.get("sets") or {}
    if len(sets) < 2:
        return {}
    causal = "ppl_increase" in next(iter(sets.values()))
    return {f"{m}[{name}]": v[m] for m in QUALITY[causal][1] for name, v in sets.items()}


def interval_cell(rep: VerifyReport) -> str:
    """The measured speedup's 95% interval, "[lo, hi]" ("" for a report that predates intervals)."""
    return f"[{rep.interval[0]:.3f}, {rep.interval[1]:.3f}]" if rep.interval else ""


def loop_rows(p: Plan) -> list[dict]:
    """A plan's closed-loop rounds as table rows (none where the loop did not run)."""
    c = p.options.get("closed_loop") or {}
    return [{"method": p.method, "target": f"{p.target_speedup:g}x", "round": r["round"],
             "kept": "yes" if r["round"] == c.get("chosen") else "",
             "profile alone": f"{r['open_loop_predicted']:.3f}x", "predicted": f"{r['predicted']:.3f}x",
             "measured": f"{r['measured']:.3f}x", "95% interval": f"[{r['lo']:.3f}, {r['hi']:.3f}]",
             "pairs": r["pairs"], "correction": f"{r['correction']['scale']:.3f} x + "
                                                f"{r['correction']['offset'] * 1e3:.2f} ms",
             "status": c.get("status", "") if r["round"] == c.get("chosen") else ""}
            for r in c.get("rounds", [])]


def result_row(plan: Plan, rep: VerifyReport) -> dict:
    """One row of the main job's results table: the worst held-out set's quality first, then every set's."""
    return {"method": plan.method, "target": plan.target_speedup, "predicted": rep.predicted_speedup,
            "measured": rep.measured_speedup, "95% interval": interval_cell(rep), "pred/meas-1": rep.prediction_ratio - 1 if rep.prediction_ratio
            else None, **{k: rep.quality[k] for k in METRICS if k in rep.quality}, **per_set(rep.quality),
            "params_M": rep.sizes["compressed_params"] / 1e6}


def format_results(df: pd.DataFrame, prof: LatencyProfile) -> str:
    d = df.copy()
    for c in ("predicted", "measured"):
        d[c] = d[c].map(lambda x: f"{x:.2f}x" if x is not None else "n/a")
    d["target"] = d["target"].map(lambda x: f"{x:g}x")
    d["pred/meas-1"] = d["pred/meas-1"].map(lambda x: f"{x:+.1%}" if x is not None else "n/a")
    for c in d.columns:
        m = c.split("[")[0]
        if m in METRICS:
            d[c] = d[c].map(lambda x, m=m: fmt(m, x))
    d["params_M"] = d["params_M"].map(lambda x: f"{x:.1f}")
    return f"Conditions: {prof.conditions}\n\n" + d.to_markdown(index=False)


def format_family(df: pd.DataFrame, prof: LatencyProfile) -> str:
    d = df.drop(columns=["model"]).copy()
    d["target"] = d["target"].map(lambda x: f"{x:g}x")
    for c in ("predicted", "measured"):
        d[c] = d[c].map(lambda x: f"{x:.2f}x" if x is not None else "n/a")
    d = d.dropna(axis=1, how="all")
    return f"Conditions: {prof.conditions}\n\n" + d.to_markdown(index=False, floatfmt=".3f")


def verify_lines(rep: VerifyReport) -> list[str]:
    """What `planner verify` prints: speed in the regime, decode throughput, quality."""
    pred = f"{rep.predicted_speedup:.2f}x" if rep.predicted_speedup else "n/a"
    ratio = f"{rep.prediction_ratio:.3f}" if rep.prediction_ratio else "n/a"
    q = rep.quality
    unit = "ms/token step" if rep.conditions.get("mode") == "decode" else "ms"
    lines = [f"{rep.conditions.get('mode', 'prefill')}: dense {rep.dense_time*1e3:.2f} {unit} | compressed "
             f"{rep.compressed_time*1e3:.2f} {unit} | measured {rep.measured_speedup:.2f}x | predicted {pred} | "
             f"predicted/measured {ratio}"]
    if "tokens_per_s" in q:
        lines.append(f"decode throughput: dense {q['dense_tokens_per_s']:.0f} tokens/s | compressed "
                     f"{q['tokens_per_s']:.0f} tokens/s")
    sets = q.get("sets") or {"held-out": q}
    for name, s in sets.items():
        if "ppl" in s:
            lines.append(f"{name}: {s['n_tokens']} tokens: perplexity dense {s['ppl_dense']:.2f} | compressed "
                         f"{s['ppl']:.2f} ({s['ppl_increase']:+.1%}) | next-token agreement {s['top1_agree']:.3f}")
        else:
            lines.append(f"{name}: {s['n_text']} passages: " +
                         " | ".join(f"{m} {fmt(m, s[m])}" for m in QUALITY[False][0]))
    if len(sets) > 1:
        causal = "ppl_increase" in q
        lines.append("worst set: " + " | ".join(f"{m} {fmt(m, q[m])} ({q['worst'][m]})" for m in QUALITY[causal][1]))
    return lines


def held_back(d: dict) -> str:
    """A recovery evaluation (RecoverReport.before / after, or one history row) in a few words."""
    if "val_spearman" in d:
        return f"spearman {d['val_spearman']:.3f}, nn_agree {d['val_nn_agree']:.3f}, loss {d['val_total']:.4f}"
    if "val_ppl" in d:
        return f"perplexity {d['val_ppl']:.2f}, loss {d['val_total']:.4f}"
    return f"loss {d.get('val_total', float('nan')):.4f}"


def recover_summary(rep: RecoverReport) -> str:
    return (f"{rep.out}: {rep.steps} steps ({rep.epochs:.1f} epochs) in {rep.train_time/60:.1f} min, stopped by "
            f"{rep.stop}; held-back passages: one-shot {held_back(rep.before)} -> recovered {held_back(rep.after)}")
