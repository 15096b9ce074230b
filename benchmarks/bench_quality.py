"""Which choice helped? Quality at each target for ZipLM-faithful planning and the planner's additions.

    python benchmarks/bench_quality.py [--run runs/minilm-b8] [--targets 1.5 2 3]

Reuses the profile of a `planner run` directory (same machine), then for each variant builds the database,
solves, applies and measures quality on the held-out text (speed is the same profile's, so the variants are
compared at the same predicted speedup; `planner run` measures the real speedups of the default variant).
  A  ZipLM-faithful: errors on the calibration data itself, normalised by the module output, OBS weights
  B  A + errors scored on held-out calibration passages
  C  B + errors normalised by the residual stream
  D  C + sequential re-fit of kept weights (the planner's default)
  M  uniform magnitude baseline
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from planner import api
from planner.adapters.checkpoint import load_model, load_tokenizer
from planner.config import PlanConfig
from planner.data import HELDOUT, read_lines, sample
from planner.jobs.run import default_model
from planner.stages.plan import uniform_plan
from planner.stages.verify import embeddings, similarity_quality
from planner.types import LatencyProfile

VARIANTS = {
    "A zipLM-faithful": dict(val_fraction=0.0, error_norm="module", weights="obs"),
    "B +held-out errors": dict(val_fraction=0.25, error_norm="module", weights="obs"),
    "C +residual norm": dict(val_fraction=0.25, error_norm="residual", weights="obs"),
    "D +sequential (default)": dict(val_fraction=0.25, error_norm="residual", weights="sequential"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/minilm-b8")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--work", default="runs/bench-quality")
    a = ap.parse_args()
    torch.set_num_threads(2)
    model_path = default_model()
    prof_path = next(Path(a.run).glob("profile-*.json"))
    prof = LatencyProfile.load(prof_path)
    dense, adapter = load_model(model_path)
    tok = load_tokenizer(model_path)
    texts = sample(read_lines(None, HELDOUT), 512, seed=1)
    e_dense = embeddings(dense, adapter, tok, texts)
    rows = []
    for name, v in VARIANTS.items():
        t0 = time.time()
        cfg = PlanConfig(targets=tuple(a.targets), val_fraction=v["val_fraction"], error_norm=v["error_norm"],
                         sequential=v["weights"] == "sequential")
        plans = api.plan(model_path, prof_path, cfg, Path(a.work) / f"db-val{v['val_fraction']}-{v['error_norm']}",
                         progress=False)
        for p in plans:
            _, m = api.apply(model_path, p, Path(a.work) / "tmp-model", weights=v["weights"], progress=False)
            q = similarity_quality(e_dense, embeddings(m, adapter, tok, texts))
            ffn = [l["ffn"] for l in p.layers]
            rows.append({"variant": name, "target": p.target_speedup, "pred": p.predicted_speedup, **q,
                         "min_ffn": min(ffn), "mean_ffn": sum(ffn) / len(ffn)})
        print(f"{name}: {time.time() - t0:.0f}s", flush=True)
    for t in a.targets:
        u = uniform_plan(prof, t, len(adapter.layers(dense)))
        _, m = api.apply(model_path, u, Path(a.work) / "tmp-model", select="magnitude", weights="none",
                         progress=False, check_fingerprint=False)
        q = similarity_quality(e_dense, embeddings(m, adapter, tok, texts))
        rows.append({"variant": "M uniform magnitude", "target": t, "pred": u.predicted_speedup, **q,
                     "min_ffn": u.layers[0]["ffn"], "mean_ffn": u.layers[0]["ffn"]})
    df = pd.DataFrame(rows).sort_values(["target", "variant"])
    print(f"\nConditions: {prof.conditions}; held-out: {len(texts)} passages of planner/data/heldout.txt\n")
    print(df.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
