"""Latency regimes: what one timed call is, for the profiler and for verify alike.

- "prefill": the model on a batch of B prompts of T tokens. Encoders: a plain forward. Causal LMs: the prompt
  pass of `generate()`: a fresh KV cache is filled and only the last position's logits are computed
  (`logits_to_keep=1`), i.e. the time to the first token.
- "score": causal LMs: one forward over the whole sequence with the logits of every position, no cache: what
  perplexity, reranking and classification with an LM do, where the LM head (B x T x vocab) is a large share.
- "decode": one new token per sequence against a KV cache holding T tokens, batch B (causal LMs only).
  The cache is filled once; each call appends one token and crops the cache back to T, so every call sees
  the same cache length and the same allocation pattern as a step of `generate()`.
verify measures decode as a greedy generation loop (`generation_loop`): tokens/s over many cached steps.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..adapters.remote.planner_compat import cache_kwargs, output_cache
from ..config import MODES
from ..data import latency_inputs
from ..errors import PlannerError


def check_mode(adapter, mode: str) -> None:
    if mode not in MODES:
        raise PlannerError(f"--mode must be one of {', '.join(MODES)}")
    if mode in ("decode", "score") and not adapter.causal_lm:
        raise PlannerError(f"--mode {mode} needs a causal language model; a {adapter.family} model has only the "
                           f"prefill regime (use --mode prefill)")


@torch.inference_mode()
def _filled_cache(model, x: dict):
    """A KV cache holding the prompt `x` (B, T), and the last prompt token (B, 1)."""
    out = model(**x, use_cache=True, logits_to_keep=1)
    return output_cache(out), x["input_ids"][:, -1:]


def latency_call(model, adapter, mode: str, batch_size: int, seq_len: int, device: str = "cpu",
                 decode_steps: int = 0) -> Callable[[], object]:
    """A zero-argument callable that runs one timed unit of `mode` on fixed inputs (run it under no_grad).
    decode: `decode_steps` greedy steps of a generation loop (`generation_loop`, what profile, plan and verify
    time), or with 0 one step against a cache cropped back after it (profiles made before the loop was the
    unit)."""
    check_mode(adapter, mode)
    if mode == "decode" and decode_steps:
        return generation_loop(model, adapter, batch_size, seq_len, decode_steps, device)
    x = latency_inputs(adapter.shape(model).vocab, batch_size, seq_len, device)        # (B, T) ids and mask
    if mode == "score":
        return lambda: model(**x, use_cache=False)                    # logits of every position
    if mode == "prefill":
        if adapter.causal_lm:
            return lambda: model(**x, use_cache=True, logits_to_keep=1)
        return lambda: model(**x)
    cache, tok = _filled_cache(model, x)
    mask = torch.ones(batch_size, seq_len + 1, dtype=torch.long, device=device)      # (B, T + 1)
    kw = cache_kwargs(model, cache)                           # by the name this transformers release takes

    def step():
        out = model(input_ids=tok, attention_mask=mask, use_cache=True, **kw)
        cache.crop(-1)                            # back to T cached tokens (transformers 5: crop(-n) drops n)
        return out
    step.cache = cache                                        # for inspection (tests)
    return step


def generation_loop(model, adapter, batch_size: int, cache_len: int, steps: int, device: str = "cpu"):
    """A callable running `steps` greedy decode steps from a cache of `cache_len` tokens (the token fed back is
    the argmax), then cropping the cache back: what `generate()` does per new token, without its bookkeeping.
    Why the loop and not one step: on the trained tiny Llama, a plan's one decode step measured 1.9-2.2x against
    the dense model's while 16 steps of this loop measured 2.2-2.6x (per step the dense model's cache grows and its
    attention reads it; the compressed model's removed attentions do not), and a user's generate() is the loop."""
    check_mode(adapter, "decode")
    x = latency_inputs(adapter.shape(model).vocab, batch_size, cache_len, device)
    cache, first = _filled_cache(model, x)
    mask = torch.ones(batch_size, cache_len + steps, dtype=torch.long, device=device)  # (B, T + steps)
    kw = cache_kwargs(model, cache)

    def run():
        tok = first                                                                  # (B, 1)
        for i in range(steps):
            out = model(input_ids=tok, attention_mask=mask[:, :cache_len + i + 1], use_cache=True, **kw)
            tok = out.logits[:, -1:].argmax(-1)                                      # (B, 1)
        cache.crop(-steps)                                                           # back to cache_len
    return run
