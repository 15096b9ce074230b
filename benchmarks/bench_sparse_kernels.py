"""Where does a sparse kernel beat the dense GEMM on this machine? Per linear shape of a model, at the
profile's token count (batch x seq), dense `x @ W^T` against the sparse layer planner would run (CSR on CPU,
2:4 on CUDA), interleaved (dense, sparse, sparse, dense), median of the per-pair ratios.

    python benchmarks/bench_sparse_kernels.py [MODEL] --batch-size 8 --seq-len 128 --threads 2

The module-level view (every linear of attention / FFN sparse, timed inside the running model) is what
`planner profile --sparsity 0.5,0.7,0.9,0.95` stores; this table is the kernel-level evidence behind it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from planner import hardware
from planner.adapters.checkpoint import read_config
from planner.algorithms.sparse import kernel_for, sparse_like
from planner.jobs.run import default_model


def _time(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--levels", default="0.5,0.7,0.8,0.9,0.95,0.98")
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    hardware.set_threads(a.threads)
    cfg = read_config(default_model() if a.model is None else a.model)
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"attn q/k/v/out": (d, d), "ffn in": (f, d), "ffn out": (d, f)}
    kernel = kernel_for(a.device)
    levels = [0.5] if kernel == "2:4" else [float(x) for x in a.levels.split(",")]
    n = a.batch_size * a.seq_len
    dt = torch.float16 if a.device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    print(f"{hardware.describe(a.device)['name']} ({a.device}, {torch.get_num_threads()} threads), "
          f"{n} tokens (batch {a.batch_size} x seq {a.seq_len}), kernel {kernel}, torch {torch.__version__}")
    print("| linear (out x in) | sparsity | dense ms | sparse ms | sparse / dense |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name, (o, i) in shapes.items():
            lin = torch.nn.Linear(i, o).to(a.device, dt).eval()
            x = torch.randn(n, i, device=a.device, dtype=dt)
            crossover = None
            for lv in levels:
                sp = sparse_like(lin, lv, kernel, g)
                fd, fs = (lambda: lin(x)), (lambda: sp(x))
                for _ in range(3):
                    fd(), fs()
                td, ts, ratios = [], [], []
                for r in range(a.reps):
                    pair = [fd, fs, fs, fd] if r % 2 == 0 else [fs, fd, fd, fs]
                    t = [_time(fn, a.device) for fn in pair]
                    dd = [x_ for fn, x_ in zip(pair, t) if fn is fd]
                    ss = [x_ for fn, x_ in zip(pair, t) if fn is fs]
                    td += dd
                    ts += ss
                    ratios.append(sum(ss) / sum(dd))
                ratio = statistics.median(ratios)
                if ratio < 1 and crossover is None:
                    crossover = lv
                print(f"| {name} ({o} x {i}) | {lv:g} | {statistics.median(td)*1e3:.2f} | "
                      f"{statistics.median(ts)*1e3:.2f} | {ratio:.2f} |")
            print(f"| {name}: faster than dense from | {crossover if crossover is not None else 'never'} | | | |")


if __name__ == "__main__":
    main()
