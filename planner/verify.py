"""Verify a compressed model: measured speedup next to predicted, and the quality kept on held-out text.

Speed: dense and compressed forwards are interleaved (ABBA order) on the same fixed inputs, so drift of a
shared machine hits both alike; the speedup is the ratio of the medians.
Quality (encoders): embeddings = mean-pooled, L2-normalised last hidden states, on held-out passages.
  cosine    mean cosine between each passage's dense and compressed embedding
  spearman  Spearman correlation of the two pairwise-similarity matrices (upper triangles)
  nn_agree  share of passages whose nearest neighbour (excluding itself) is the same under both models
"""
from __future__ import annotations

import datetime as _dt

import numpy as np
import torch
from scipy.stats import spearmanr

from . import hardware
from .data import batches as make_batches
from .data import latency_inputs
from .progress import bar as progress_bar
from .timing import median, spread, time_calls


def measure_speedup(dense, comp, vocab: int, batch_size: int, seq_len: int, reps: int = 15, warmup: int = 3,
                    device: str = "cpu", progress: bool = False) -> dict:
    x = latency_inputs(vocab, batch_size, seq_len, device)
    fd, fc = (lambda: dense(**x)), (lambda: comp(**x))
    time_calls(fd, 1, warmup, device)
    time_calls(fc, 1, warmup, device)
    td, tc = [], []
    for r in progress_bar(range(reps), desc="verify: timing", unit="pair", progress=progress):
        pair = [(fd, td), (fc, tc)] if r % 2 == 0 else [(fc, tc), (fd, td)]
        for fn, acc in pair:
            acc.extend(time_calls(fn, 1, 0, device))
    ratios = [a / b for a, b in zip(td, tc)]
    return {"dense_time": median(td), "compressed_time": median(tc), "speedup": median(td) / median(tc),
            "speedup_spread": spread(ratios), "dense_spread": spread(td), "compressed_spread": spread(tc)}


@torch.no_grad()
def embeddings(model, adapter, tokenizer, texts, batch_size=32, max_len=128, device="cpu", progress: bool = False,
               desc: str = "embeddings") -> torch.Tensor:
    out = torch.empty(len(texts), model.config.hidden_size)
    for b in progress_bar(make_batches(tokenizer, texts, batch_size, max_len), desc=desc, unit="batch",
                          progress=progress):
        e = adapter.embed(model, b["input_ids"].to(device), b["attention_mask"].to(device))
        out[b["index"]] = e.float().cpu()
    return out                                                       # (N, d), rows L2-normalised


def similarity_quality(e_dense: torch.Tensor, e_comp: torch.Tensor) -> dict:
    """Agreement between two embeddings of the same passages (rows aligned)."""
    cos = float((e_dense * e_comp).sum(-1).mean())
    sd, sc = (e_dense @ e_dense.T).numpy(), (e_comp @ e_comp.T).numpy()          # (N, N)
    iu = np.triu_indices(len(sd), k=1)
    rho = float(spearmanr(sd[iu], sc[iu]).statistic)
    np.fill_diagonal(sd, -np.inf)
    np.fill_diagonal(sc, -np.inf)
    nn = float((sd.argmax(1) == sc.argmax(1)).mean())
    return {"cosine": cos, "spearman": rho, "nn_agree": nn}


def conditions(batch_size, seq_len, reps, device="cpu") -> dict:
    return {**hardware.describe(device), "batch_size": batch_size, "seq_len": seq_len, "reps": reps,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
