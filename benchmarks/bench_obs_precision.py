"""What the database's lean settings change on one wide FFN layer: time, loss curve and removal order.

One down projection of the 0.85 B Llama shape (2048 x 5632) with a synthetic, realistic input distribution
(a decaying spectrum, a few outlier features, SiLU-gated activations; 3072 tokens). The greedy OBS pass runs:
  float64, one neuron per step      the exact greedy reference
  float32, one per step             the pass in float32 (the damped inverse still float64)
  float32, 16 per step              the database's default (DatabaseConfig: precision, per_step), whose damped
                                    inverse is float32 too (float64 only when its float32 Cholesky fails)
  float64 inverse, 16 per step      the same with the inverse formed in float64 and rounded
For each: wall time, and at several kept widths the loss of the kept set (the least-squares objective, computed
exactly in float64 for every variant's set) relative to the reference, and the overlap of the kept sets.

    python benchmarks/bench_obs_precision.py [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from planner.algorithms import obs


def problem(d_out=2048, d_in=5632, n=3072, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -3, d_in, dtype=torch.float64)
    scale[torch.randperm(d_in, generator=g)[:16]] *= 100                 # outlier features
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    X = (torch.randn(n, d_in, generator=g, dtype=torch.float64) * scale) @ Q.T
    X = X * torch.sigmoid(X)                                              # SiLU-like activations
    return torch.randn(d_out, d_in, generator=g) / d_in ** 0.5, 2 / n * X.T @ X


def true_loss(W, H, res, keep):
    """The damped least-squares loss of `res`'s kept set at `keep` columns, in float64."""
    cols = res.kept_groups(keep)
    W_hat = torch.zeros(W.shape, dtype=torch.float64)
    W_hat[:, cols] = obs.reconstruct(W.double(), H, cols)
    return obs.layer_error(W, W_hat, obs.dampen(H))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    W, H = problem()
    d_in = W.shape[1]
    keeps = [d_in * 3 // 4, d_in // 2, d_in // 4, d_in // 8, d_in // 32]
    variants = [("float64, one per step", torch.float64, 1, None), ("float32, one per step", torch.float32, 1, None),
                ("float32, 16 per step (default)", torch.float32, 16, None),
                ("float64 inverse, 16 per step", torch.float32, 16, torch.float64)]
    rows = []
    for name, dt, ps, inv in variants:
        t0 = time.perf_counter()
        res = obs.group_obs(W, H, 1, dtype=dt, inverse_dtype=inv, per_step=ps)
        rows.append((name, time.perf_counter() - t0, res))
    ref = rows[0][2]
    ref_loss = {k: true_loss(W, H, ref, k) for k in keeps}
    print(f"\nOBS on one {W.shape[0]} x {d_in} FFN down projection, synthetic activations, {a.threads} threads, "
          f"torch {torch.__version__}")
    print("| pass | wall (s) | " + " | ".join(f"loss / ref, {k} kept" for k in keeps) + " | "
          + " | ".join(f"kept-set overlap, {k}" for k in keeps) + " |")
    print("|---|---|" + "---|" * (2 * len(keeps)))
    for name, wall, res in rows:
        rel = [f"{true_loss(W, H, res, k) / ref_loss[k] - 1:+.1e}" for k in keeps]
        ov = [f"{len(set(res.kept_groups(k).tolist()) & set(ref.kept_groups(k).tolist())) / k:.3f}" for k in keeps]
        print(f"| {name} | {wall:.1f} | " + " | ".join(rel) + " | " + " | ".join(ov) + " |")


if __name__ == "__main__":
    main()
