"""The OBS pipeline at LLM scale: wall time and peak memory of each stage on a Llama-shaped model.

The model has random weights (time and memory depend on shapes, not on weights), saved once and loaded the way
a user's checkpoint is (`from_pretrained` from a local directory). Stages, in one process:
  load         the checkpoint into host memory (or onto the device without --offload)
  calibration  capture the first block's inputs on the calibration windows (the database repeats it)
  database     the OBS database, block by block (calibration statistics, greedy OBS, held-out scoring, writing)
  dp           the SPDY/ZipLM dynamic program for a 2x budget (latency linear in width: pure numbers)
  apply        the sequential refit of a plan keeping half of every module (every module refit; --apply-plan dp:
               the DP's plan, which on random weights may drop whole modules), block by block
Each stage reports wall time, peak resident host memory (sampled every 10 ms), peak device memory (CUDA) and,
for the database, its size on disk. With --blocks fewer than the shape has, the model has only that many blocks
and the per-block figures are extrapolated to the full depth (printed as such).

    python benchmarks/bench_scale.py --shape 0.85b                          # this 2-core CPU: all 16 blocks
    python benchmarks/bench_scale.py --shape 7b --blocks 4 --device cuda --offload --out runs/scale-7b
    python benchmarks/bench_scale.py --shape 7b --kv-heads 8 ...             # the GQA variant
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # Llama-family geometries: hidden, blocks, query heads, key-value heads, FFN width
    "0.85b": {"hidden": 2048, "layers": 16, "heads": 32, "kv": 8, "ffn": 5632},    # TinyLlama-like, GQA
    "7b": {"hidden": 4096, "layers": 32, "heads": 32, "kv": 32, "ffn": 11008},     # Llama-2-7B
    "tiny": {"hidden": 256, "layers": 2, "heads": 4, "kv": 2, "ffn": 704},         # the test's shape
}
GIB = 1 << 30


class PeakRSS:
    """Peak resident memory of this process between start() and stop(), sampled every 10 ms."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak, self._run, self._t = 0, False, None

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def start(self):
        self.peak, self._run = self.now(), True
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, self.now())
            time.sleep(0.01)

    def stop(self) -> int:
        self._run = False
        self._t.join()
        return max(self.peak, self.now())


def build_model(path: Path, shape: dict, layers: int, vocab: int) -> None:
    """A random Llama of `shape` with `layers` blocks saved at `path` (kept between runs)."""
    import transformers
    if (path / "config.json").exists():
        return
    cfg = transformers.LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=layers,
                                   num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                                   intermediate_size=shape["ffn"], vocab_size=vocab, max_position_embeddings=4096,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    del model
    tmp.rename(path)


def windows(n_tokens: int, vocab: int, window: int = 128, batch: int = 8) -> list[dict]:
    """Random token windows (memory and time depend on the token count, not on the tokens)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (max(n_tokens // window, 2), window), generator=g)      # (N, window)
    return [{"input_ids": ids[s:s + batch], "attention_mask": torch.ones_like(ids[s:s + batch])}
            for s in range(0, len(ids), batch)]


def dp_plan(db, shape, n_layers: int, target: float):
    """The 2x plan of the DP on the database's errors, with a latency model linear in kept width (attention and
    FFN weighted by their FLOPs per token): only the solver's cost is measured here, not a profile's."""
    from planner.algorithms.solver import solve
    from planner.types import Plan
    kv_dim = shape["hidden"] * shape["kv"] // shape["heads"]
    t_attn, t_ffn = 2 * shape["hidden"] + 2 * kv_dim, 3 * shape["ffn"]     # per-token weights read, arbitrary unit
    times, errors, widths = [], [], []
    for layer in range(n_layers):
        for kind, full, t in (("attn", None, t_attn), ("ffn", shape["ffn"], t_ffn)):
            e = db.errors(layer, kind)
            w = sorted(e)
            top = max(w) if full is None else full
            times.append(np.array([t * x / top for x in w]))
            errors.append(np.array([e[x] for x in w]))
            widths.append(w)
    base = n_layers * (t_attn + t_ffn)
    sol = solve(times, errors, [base / target])[0]
    layers = [{"heads": widths[2 * i][sol.choices[2 * i]], "ffn": widths[2 * i + 1][sol.choices[2 * i + 1]]}
              for i in range(n_layers)]
    return Plan(method="planner", target_speedup=target, predicted_time=sol.time, predicted_speedup=base / sol.time,
                base_time=base, layers=layers, total_error=sol.error, profile={}, model={},
                database={"path": str(db.path)})


def run(a) -> list[dict]:
    from planner.adapters.checkpoint import load_model
    from planner.config import DatabaseConfig, ProfileConfig
    from planner.stages.apply import apply_
    from planner.stages.calibration import capture_block_inputs, outside_blocks_on
    from planner.stages.database import build
    from planner.stages.profile import width_grid
    shape = dict(SHAPES[a.shape])
    if a.kv_heads:
        shape["kv"] = a.kv_heads
    layers = a.blocks or shape["layers"]
    tag = f"llama-{a.shape}-kv{shape['kv']}-L{layers}"
    model_dir = a.work / tag
    a.work.mkdir(parents=True, exist_ok=True)
    build_model(model_dir, shape, layers, a.vocab)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    rows, rss = [], PeakRSS()

    def stage(name, fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss.start()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        row = {"stage": name, "wall_s": time.perf_counter() - t0, "peak_rss_bytes": rss.stop(),
               "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        return out

    model, adapter = stage("load", lambda: load_model(model_dir, device="cpu" if a.offload else a.device))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    data = windows(a.tokens, a.vocab)
    blocks = adapter.layers(model)

    def calibrate():
        with outside_blocks_on(model, blocks, dev) if a.offload else nullcontext():
            x = capture_block_inputs(model, blocks, data, dev, adapter.forward_kwargs())
        return x.n_tokens
    n_tokens = stage("calibration", calibrate)
    db_dir = a.work / f"db-{tag}"
    shutil.rmtree(db_dir, ignore_errors=True)                  # measured from scratch (the build resumes otherwise)
    pcfg = ProfileConfig()
    levels = {"attn": list(range(adapter.shape(model).attn_units + 1)),       # the profile's default grid
              "ffn": width_grid("ffn", shape["ffn"], pcfg.ffn_step, pcfg.ffn_levels)}
    cfg = DatabaseConfig(0.01, 0.25, a.device, a.offload)
    db = stage("database", lambda: build(model, adapter, data, db_dir, levels, cfg, {"model": tag}, progress=True))
    rows[-1]["disk_bytes"] = sum(p.stat().st_size for p in db_dir.iterdir())
    plan = stage("dp", lambda: dp_plan(db, shape, layers, 2.0))
    if a.apply_plan == "half":          # every module refit (a random model's DP plan may drop whole modules)
        plan = dataclasses.replace(plan, layers=[{"heads": adapter.shape(model).attn_units // 2,
                                                  "ffn": shape["ffn"] // 2}] * layers)
    kept = {k: sum(lay[k] for lay in plan.layers) / (layers * full) for k, full in
            (("heads", adapter.shape(model).attn_units), ("ffn", shape["ffn"]))}
    stage("apply", lambda: apply_(model, adapter, plan, select="obs", weights="sequential", db=db, batches=data,
                                  progress=True, device=dev, offload=a.offload))
    meta = {"shape": a.shape, **shape, "blocks": layers, "full_blocks": SHAPES[a.shape]["layers"],
            "params": sum(p.numel() for p in model.parameters()),
            "model_bytes": model_bytes, "apply_plan": a.apply_plan, "kept": kept, "tokens": n_tokens, "ffn_levels": len(levels["ffn"]),
            "device": a.device, "offload": a.offload, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda_device": torch.cuda.get_device_name() if cuda else None}
    return meta, rows


def table(meta: dict, rows: list[dict]) -> str:
    scale = meta["full_blocks"] / meta["blocks"]
    dev = meta["device"] + (" (offload)" if meta["offload"] else "")
    lines = [f"Llama-shaped, random weights: hidden {meta['hidden']}, {meta['blocks']} blocks "
             f"(full depth {meta['full_blocks']}), {meta['heads']} query / {meta['kv']} key-value heads, FFN "
             f"{meta['ffn']} ({meta['ffn_levels']} FFN levels), {meta['model_bytes'] / GIB:.2f} GiB of weights, "
             f"{meta['tokens']} calibration tokens, device {dev}"
             + (f" {meta['cuda_device']}" if meta["cuda_device"] else "")
             + f", {meta['threads']} threads, torch {meta['torch']}; apply: the "
             + ("DP's 2x plan" if meta["apply_plan"] == "dp" else "plan keeping half of every module")
             + f" ({meta['kept']['heads']:.0%} of attention units, {meta['kept']['ffn']:.0%} of FFN neurons kept)",
             "| stage | wall (s) | per block (s) | peak RSS (GiB) | RSS / weights | peak device (GiB) | disk (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per = f"{r['wall_s'] / meta['blocks']:.1f}" if r["stage"] in ("database", "apply") else ""
        devm = f"{r['peak_device_bytes'] / GIB:.2f}" if r["peak_device_bytes"] is not None else "-"
        disk = f"{r['disk_bytes'] / GIB:.2f}" if "disk_bytes" in r else ""
        lines.append(f"| {r['stage']} | {r['wall_s']:.1f} | {per} | {r['peak_rss_bytes'] / GIB:.2f} | "
                     f"{r['peak_rss_bytes'] / meta['model_bytes']:.2f} | {devm} | {disk} |")
    if scale != 1:
        by = {r["stage"]: r for r in rows}
        lines.append(f"\nExtrapolated to {meta['full_blocks']} blocks (per-block figures x {meta['full_blocks']}, "
                     f"not measured): database {by['database']['wall_s'] * scale / 60:.1f} min, apply "
                     f"{by['apply']['wall_s'] * scale / 60:.1f} min, database on disk "
                     f"{by['database']['disk_bytes'] * scale / GIB:.1f} GiB")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.85b")
    ap.add_argument("--blocks", type=int, default=None, help="blocks to build (default: the shape's depth)")
    ap.add_argument("--kv-heads", type=int, default=None, help="key-value heads (GQA variant)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (windows of 128)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--offload", action="store_true", help="model in host memory, one block on the device")
    ap.add_argument("--apply-plan", choices=("half", "dp"), default="half",
                    help="what apply refits: half of every module, or the DP's 2x plan")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-scale"), help="models and databases")
    ap.add_argument("--out", type=Path, default=None, help="write scale.json and scale.md here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for, but CUDA is not available here; use --device cpu")
    meta, rows = run(a)
    text = table(meta, rows)
    print("\n" + text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "scale.json").write_text(json.dumps({"conditions": meta, "stages": rows}, indent=2))
        (a.out / "scale.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
