"""Train (or reuse) the project's small Llama-style LM and print what it learned.

    python benchmarks/train_lm.py [--out DIR] [--steps N] [--set key=value ...] [--retrain] [--quiet]

Without --out the model lands in the cache that `tinylm.ensure` uses ($PLANNER_CACHE or
~/.cache/planner, folder tinylm-<hash of config + text>) and is reused when it is already there; with --out it is
trained into DIR (again reused when DIR holds a model trained with the same config and text). --set overrides any
TinyLMConfig field (e.g. --set hidden=128 --set autocast=fp32). Prints the figures from DIR/train.json.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import fields, replace
from pathlib import Path

import tinylm
from tabulate import tabulate

from planner import io


def _parse_set(items: list[str]) -> dict:
    types = {f.name: f.type for f in fields(tinylm.TinyLMConfig)}
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--set expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        if k not in types:
            raise SystemExit(f"unknown TinyLMConfig field {k!r}; fields: {', '.join(types)}")
        t = str(types[k])
        out[k] = int(v) if t == "int" else float(v) if t == "float" else v
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="model directory (default: the ensure() cache)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: TinyLMConfig.steps)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="TinyLMConfig field=value")
    ap.add_argument("--retrain", action="store_true", help="train even when a matching model exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args()
    kw = _parse_set(a.overrides)
    if a.steps is not None:
        kw["steps"] = a.steps
    cfg = replace(tinylm.TinyLMConfig(), **kw)

    t0 = time.perf_counter()
    if a.out is None and not a.retrain:
        path = tinylm.ensure(cfg=cfg, progress=not a.quiet)
    elif a.out is not None and not a.retrain and tinylm.is_trained(a.out, tinylm.cache_key(cfg)):
        path = Path(a.out)
    else:
        out = Path(a.out) if a.out else Path(tinylm._default_cache()) / f"tinylm-{tinylm.cache_key(cfg)}"
        path = tinylm.train(out, cfg, progress=not a.quiet)
    wall = time.perf_counter() - t0
    info = io.read_json(path / "train.json", "train.json")

    c = info["config"]
    rows = [
        ["model", f"Llama {c['layers']}L h{c['hidden']} {c['heads']}q/{c['kv_heads']}kv ffn{c['intermediate']} "
                  f"vocab{c['vocab']}"],
        ["params", f"{info['params'] / 1e6:.2f} M"],
        ["steps x batch x window", f"{info['steps']} x {c['batch']} x {c['window']} "
                                   f"({info['tokens_trained'] / 1e6:.2f} M tokens, {info['epochs']} epoch(s))"],
        ["training text", f"{info['text']['chars'] / 1e6:.1f} M chars, {info['text']['tokens'] / 1e6:.2f} M tokens"],
        ["autocast / threads", f"{c['autocast']} / {c['threads']}"],
        ["train seconds", f"{info['train_seconds']:.1f}  (prep {info['prep_seconds']:.1f}, "
                          f"eval {info['eval_seconds']:.1f}, total {info['total_seconds']:.1f})"],
        ["tokens/s", f"{info['tokens_per_s']:.0f}"],
        ["train loss (first -> last 5%)", f"{info['first_loss']:.3f} -> {info['train_loss']:.3f}"],
        ["ppl held-out generated", f"{info['ppl_heldout_generated']:.2f}"],
        ["ppl heldout.txt", f"{info['ppl_heldout_txt']:.2f}"],
        ["ppl calibration.txt (trained on)", f"{info['ppl_calibration_seen']:.2f}"],
        ["cpu", info["conditions"]["name"]],
        ["dir", str(path)],
        ["this call (wall s)", f"{wall:.1f}"],
    ]
    print(tabulate(rows, tablefmt="github", headers=["tinylm", ""]))


if __name__ == "__main__":
    main()
