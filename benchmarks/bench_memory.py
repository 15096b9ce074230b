"""Peak memory of calibration on a Llama-shaped model: the OBS database build and the sequential apply.

The model has random weights (memory and shapes do not depend on them): hidden 2048, 16 layers, GQA 32 query /
8 key-value heads, FFN 5632, vocabulary 32000 (a TinyLlama-like shape, about 1 B parameters, 4 GiB in float32).
Each stage runs in its own process so that its peak resident memory (ru_maxrss) is its own:
  load      the model alone: the floor every stage pays
  database  load + capture the first block's inputs + build the OBS database block by block
  apply     load + sequential apply of a plan (half of every module kept), block by block
Calibration: random token windows (memory depends on the token count, not on the tokens).

    python benchmarks/bench_memory.py --work runs/bench-memory [--layers 16] [--tokens 4096] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def build_model(path: Path, layers: int) -> None:
    import transformers
    if (path / "config.json").exists():
        return
    cfg = transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=5632, vocab_size=32000,
                                   max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(str(tmp))
    tmp.rename(path)


def batches(n_tokens: int, vocab: int, window: int = 128, batch: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (max(n_tokens // window, 2), window), generator=g)   # (N, window)
    return [{"input_ids": ids[s:s + batch], "attention_mask": torch.ones_like(ids[s:s + batch])}
            for s in range(0, len(ids), batch)]


def stage(name: str, model_dir: Path, work: Path, n_tokens: int) -> dict:
    from planner.adapters.checkpoint import load_model
    from planner.stages.apply import apply_
    from planner.stages.database import DatabaseConfig, build
    from planner.types import Plan
    t0 = time.perf_counter()
    model, adapter = load_model(model_dir)
    shape = adapter.shape(model)
    out = {"stage": name, "params": sum(p.numel() for p in model.parameters()),
           "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    data = batches(n_tokens, shape.vocab)
    levels = {"attn": list(range(shape.attn_units + 1)), "ffn": sorted({0, shape.ffn, *range(256, shape.ffn, 256)})}
    if name in ("database", "apply"):
        db = build(model, adapter, data, work / "db", levels, DatabaseConfig(0.01, 0.25), {"model": "random"},
                   progress=True)
    if name == "apply":
        layers = [{"heads": shape.attn_units // 2, "ffn": shape.ffn // 2}] * shape.n_layers
        plan = Plan(method="planner", target_speedup=2.0, predicted_time=0.0, predicted_speedup=0.0, base_time=0.0,
                    layers=layers, total_error=0.0, profile={}, model={}, database={"path": str(work / "db")})
        apply_(model, adapter, plan, select="obs", weights="sequential", db=db, batches=data, progress=True)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["tokens"] = sum(int(b["attention_mask"].sum()) for b in data)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-memory"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (windows of 128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", default="load,database,apply")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)      # internal: run one stage, print JSON
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model_dir = a.work / f"llama-2048-L{a.layers}"
    if a.stage:
        print(json.dumps(stage(a.stage, model_dir, a.work, a.tokens)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    build_model(model_dir, a.layers)
    rows = []
    for name in a.stages.split(","):
        r = subprocess.run([sys.executable, __file__, "--work", str(a.work), "--layers", str(a.layers), "--tokens",
                            str(a.tokens), "--threads", str(a.threads), "--stage", name],
                           stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (a.work / "memory.json").write_text(json.dumps(rows, indent=2))
    gib = 1 << 30
    print(f"\nLlama-shaped, random weights: {rows[0]['params'] / 1e9:.2f} B parameters, "
          f"{rows[0]['model_bytes'] / gib:.2f} GiB float32, {rows[0]['tokens']} calibration tokens, "
          f"{a.threads} threads, torch {torch.__version__}")
    print("| stage | peak RSS (GiB) | over the model (GiB) | wall (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['peak_rss_bytes'] / gib:.2f} | {(r['peak_rss_bytes'] - r['model_bytes']) / gib:.2f} "
              f"| {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
