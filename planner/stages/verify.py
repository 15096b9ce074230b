"""Verify a compressed model: measured speedup next to predicted, and the quality kept on held-out text.

Speed: dense and compressed calls are interleaved (ABBA order) on the same fixed inputs, so drift of a
shared machine hits both alike; the speedup is the ratio of the medians. The call is the profile's regime
(regimes.py): a prefill pass, or for decode a greedy generation loop through the KV cache (tokens/s).
Quality (causal LMs): perplexity of both models on held-out token windows, and how often their next-token
argmax agrees.
Quality (encoders): embeddings = mean-pooled, L2-normalised last hidden states, on held-out passages.
  cosine    mean cosine between each passage's dense and compressed embedding
  spearman  Spearman correlation of the two pairwise-similarity matrices (upper triangles)
  nn_agree  share of passages whose nearest neighbour (excluding itself) is the same under both models
"""
from __future__ import annotations

import datetime as _dt
import math

import numpy as np
import torch
from scipy.stats import spearmanr

from .. import hardware
from ..data import batches as make_batches
from ..data import token_windows
from .regimes import generation_loop, latency_call
from ..progress import bar as progress_bar
from ..timing import median, spread, time_calls


def measure_speedup(dense, comp, adapter, batch_size: int, seq_len: int, reps: int = 15, warmup: int = 3,
                    device: str = "cpu", progress: bool = False, mode: str = "prefill", decode_steps: int = 16) -> dict:
    """Interleaved timing of the two models in `mode`. Times are per call (prefill) or per generated token
    step (decode, where tokens_per_s = batch / step time is added)."""
    if mode == "decode":
        fd, fc = (generation_loop(m, adapter, batch_size, seq_len, decode_steps, device) for m in (dense, comp))
        per = decode_steps                                           # one call generates decode_steps tokens
    else:
        fd, fc = (latency_call(m, adapter, mode, batch_size, seq_len, device) for m in (dense, comp))
        per = 1
    time_calls(fd, 1, warmup, device)
    time_calls(fc, 1, warmup, device)
    td, tc = [], []
    for r in progress_bar(range(reps), desc="verify: timing", unit="pair", progress=progress):
        pair = [(fd, td), (fc, tc)] if r % 2 == 0 else [(fc, tc), (fd, td)]
        for fn, acc in pair:
            acc.extend(t / per for t in time_calls(fn, 1, 0, device))
    ratios = [a / b for a, b in zip(td, tc)]
    out = {"dense_time": median(td), "compressed_time": median(tc), "speedup": median(td) / median(tc),
           "speedup_spread": spread(ratios), "dense_spread": spread(td), "compressed_spread": spread(tc)}
    if mode == "decode":
        out.update(dense_tokens_per_s=batch_size / out["dense_time"], tokens_per_s=batch_size / out["compressed_time"])
    return out


@torch.no_grad()
def lm_quality(dense, comp, tokenizer, texts, window: int = 128, batch_size: int = 8, device: str = "cpu",
               progress: bool = False) -> dict:
    """Perplexity of both causal LMs on the same held-out token windows, and their next-token agreement."""
    wins = token_windows(tokenizer, texts, window, comp.config.vocab_size)       # (N, window)
    nll = {"dense": 0.0, "comp": 0.0}
    agree = n = 0
    for s in progress_bar(range(0, len(wins), batch_size), desc="verify: perplexity", unit="batch",
                          progress=progress):
        ids = wins[s:s + batch_size].to(device)                      # (b, W)
        target = ids[:, 1:].reshape(-1)                              # (b*(W-1),) each position predicts the next
        top = {}
        for name, m in (("dense", dense), ("comp", comp)):
            logits = m(input_ids=ids, use_cache=False).logits[:, :-1].float()    # (b, W-1, V)
            logits = logits.reshape(-1, logits.shape[-1])
            nll[name] += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            top[name] = logits.argmax(-1)
        agree += int((top["dense"] == top["comp"]).sum())
        n += target.numel()
    ppl_d, ppl_c = math.exp(nll["dense"] / n), math.exp(nll["comp"] / n)
    return {"ppl_dense": ppl_d, "ppl": ppl_c, "ppl_increase": ppl_c / ppl_d - 1, "top1_agree": agree / n,
            "n_tokens": n}


@torch.no_grad()
def embeddings(model, adapter, tokenizer, texts, batch_size=32, max_len=128, device="cpu", progress: bool = False,
               desc: str = "embeddings") -> torch.Tensor:
    out = torch.empty(len(texts), model.config.hidden_size)
    batches = make_batches(tokenizer, texts, batch_size, max_len, model.config.vocab_size)
    for b in progress_bar(batches, desc=desc, unit="batch", progress=progress):
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
