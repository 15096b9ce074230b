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

from .. import data, hardware, io, timing
from ..adapters.checkpoint import Checkpoint, check_pair, n_params
from ..config import ProfileConfig, VerifyConfig
from ..data import batches as make_batches
from ..data import token_windows
from ..errors import PlannerError, warn
from ..progress import bar as progress_bar
from ..timing import abba, median, ratio_of, spread, warm_up
from ..types import LatencyProfile, VerifyReport
from .profile import DTYPES, check_profile
from .regimes import latency_call


def measure_speedup(dense, comp, adapter, batch_size: int, seq_len: int, reps: int = VerifyConfig.reps,
                    warmup: int = VerifyConfig.warmup, device: str = "cpu", progress: bool = False,
                    mode: str = "prefill", decode_steps: int = ProfileConfig.decode_steps,
                    max_reps: int = VerifyConfig.max_reps, halfwidth: float = VerifyConfig.halfwidth) -> dict:
    """Interleaved timing of the two models in `mode` (timing.abba), each warmed to a steady pace first: `reps`
    pairs, then more until the 95% interval of the speedup (the median per-pair ratio) is within +-halfwidth or
    max_reps pairs. Times are per call (prefill, score) or per generated token step (decode, where
    tokens_per_s = batch / step time is added)."""
    fd, fc = (latency_call(m, adapter, mode, batch_size, seq_len, device, decode_steps=decode_steps)
              for m in (dense, comp))
    per = decode_steps if mode == "decode" and decode_steps else 1   # one call generates decode_steps tokens
    warm_up(fd, device, min_calls=max(warmup, 1))
    warm_up(fc, device, min_calls=max(warmup, 1))
    td, tc = [], []
    bar = progress_bar(total=reps, desc="verify: timing", unit="pair", progress=progress)
    while len(td) < max(reps, 1) or (len(td) < max_reps and ratio_of(tc, td).halfwidth > halfwidth):
        a, b = abba(fd, fc, 1, device, start=len(td))
        td.extend(t / per for t in a)
        tc.extend(t / per for t in b)
        bar.update()
    bar.close()
    sp = ratio_of(tc, td)                                            # dense / compressed per pair: the speedup
    out = {"dense_time": median(td), "compressed_time": median(tc), "speedup": sp.value,
           "speedup_interval": [sp.lo, sp.hi], "speedup_spread": spread(np.asarray(td) / np.asarray(tc)),
           "pairs": sp.pairs, "dense_spread": spread(td), "compressed_spread": spread(tc)}
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
    out = torch.empty(len(texts), model.config.hidden_size, device="cpu")    # (N, d) gathered on the host: numpy
                                                                             # and scipy score them
    batches = make_batches(tokenizer, texts, batch_size, max_len, model.config.vocab_size)
    for b in progress_bar(batches, desc=desc, unit="batch", progress=progress):
        e = adapter.embed(model, b["input_ids"].to(device), b["attention_mask"].to(device))
        out[b["index"]] = e.float().cpu()
    return out                                                       # (N, d), rows L2-normalised


def similarity_quality(e_dense: torch.Tensor, e_comp: torch.Tensor) -> dict:
    """Agreement between two embeddings of the same passages (rows aligned)."""
    from scipy.stats import spearmanr  # scipy.stats loads in ~1 s: only when quality is scored
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


def verify(dense_ck: Checkpoint, comp_ck: Checkpoint, cfg: VerifyConfig = VerifyConfig(),
           prof: LatencyProfile | None = None, out=None, dense_model=None, progress: bool = True) -> VerifyReport:
    """Measure the compressed model against the dense one in the regime of its profile (or cfg.mode):
    interleaved speedup, the profile's prediction for its architecture, and quality on held-out text. Every
    pairing and limit is checked before a model is loaded; the thread count is restored afterwards."""
    if out:
        io.check_out_file(out)
    hardware.check_device(cfg.device)
    check_pair(comp_ck, dense_ck, "pass the dense model it was made from first, then the compressed one")
    rec = comp_ck.record
    mode = cfg.mode or (prof.mode if prof else None) or rec.get("profile", {}).get("mode") or "prefill"
    if prof is not None:
        check_profile(prof, dense_ck.shape, cfg.device, allow_other_machine=True)
        if prof.mode != mode:
            raise PlannerError(f"profile is for the {prof.mode} regime, verifying {mode}: pass a {mode} profile "
                               f"or --mode {prof.mode}")
        if (prof.batch_size, prof.seq_len) != (cfg.batch_size, cfg.seq_len):
            raise PlannerError(f"profile is for batch {prof.batch_size} x seq {prof.seq_len}, verifying at "
                               f"{cfg.batch_size} x {cfg.seq_len}: pass a profile of the same shape")
    # decode: the profile's unit (steps of the generation loop; a profile of one step: one), else the default
    steps = cfg.decode_steps or (prof.decode_steps if prof is not None else
                                 rec.get("profile", {}).get("decode_steps", ProfileConfig.decode_steps))
    steps = steps if mode == "decode" else 0
    comp_ck.check_positions(cfg.seq_len, f"--seq-len {cfg.seq_len}" + (f" with {steps} decode steps" if mode == "decode"
                                                                      else ""), max(steps, 1) if mode == "decode" else 0)
    if comp_ck.causal_lm:
        comp_ck.check_positions(cfg.ppl_window, f"--ppl-window {cfg.ppl_window}")
    sets = {name: data.sample(data.read_lines(path, what="held-out text file"), cfg.n_text, seed=1)
            for name, path in data.heldout_sets(cfg.text_path).items()}
    _warn_far_from_calibration(comp_ck, sets)
    if timing.trained_here() and cfg.device == "cpu":
        warn("this process has trained a model, and a process that has trained can time models up to 7% slow "
             "afterwards (docs/results.md): quote the speedup of `planner verify` run in a fresh process")
    # both models in the dtype the latency was profiled in (the profile's, else the one the plan recorded): a
    # bfloat16 profile predicts bfloat16 speed
    dtype = (prof.dtype if prof is not None else rec.get("profile", {}).get("dtype")) or "float32"
    with hardware.threads(cfg.threads):
        dense = dense_model if _is_on(dense_model, cfg.device, DTYPES[dtype]) else dense_ck.load(cfg.device,
                                                                                               DTYPES[dtype])
        comp, adapter = comp_ck.load(cfg.device, DTYPES[dtype]), comp_ck.adapter
        sp = measure_speedup(dense, comp, adapter, cfg.batch_size, cfg.seq_len, cfg.reps, cfg.warmup, cfg.device,
                             progress=progress, mode=mode, decode_steps=steps, max_reps=cfg.max_reps,
                             halfwidth=cfg.halfwidth)
        cond = conditions(cfg.batch_size, cfg.seq_len, cfg.reps, cfg.device) | {"mode": mode, "dtype": dtype}
        q = quality_on_sets(dense, comp, adapter, comp_ck, sets, cfg, progress)
    if mode == "decode":
        cond["decode_steps"] = steps
    predicted = None
    if prof is not None:                   # with the closed loop's correction, where the plan had one
        pred_prof = prof.corrected(**rec["correction"]) if rec.get("correction") else prof
        predicted = prof.base["median"] / pred_prof.predict([s.to_dict() for s in adapter.spec(comp)])
    else:                                  # the plan's own prediction, where it was made for these conditions
        pc = rec.get("profile", {})
        if pc.get("batch_size") == cfg.batch_size and pc.get("seq_len") == cfg.seq_len and \
                pc.get("hardware") == cond["key"] and pc.get("mode", "prefill") == mode:
            predicted = rec.get("predicted_speedup")
    q.update({k: sp[k] for k in ("speedup_spread", "dense_tokens_per_s", "tokens_per_s") if k in sp})
    cond["pairs"] = sp["pairs"]
    rep = VerifyReport(dense=str(dense_ck.path), compressed=str(comp_ck.path), conditions=cond,
                       dense_time=sp["dense_time"], compressed_time=sp["compressed_time"],
                       measured_speedup=sp["speedup"], interval=sp["speedup_interval"], predicted_speedup=predicted,
                       prediction_ratio=(predicted / sp["speedup"]) if predicted else None,
                       quality=q, sizes={"dense_params": n_params(dense), "compressed_params": n_params(comp)},
                       created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), plan=rec)
    if out:
        rep.save(out)
    return rep


def _is_on(model, device: str, dtype: torch.dtype) -> bool:
    """Whether `model` (None: no model) is already on `device` ("cuda": any GPU) in floating-point `dtype`."""
    p = next(model.parameters(), None) if model is not None else None
    return p is not None and p.device.type == torch.device(device).type and p.dtype == dtype


# below this share of its tokens seen in the calibration text, a held-out text is far from it. Measured with
# MiniLM's tokenizer and 1024 calibration passages: the shipped calibration text covers 84% of the shipped held-out
# text's tokens, 79% of the standard-library docstrings' and 78% of the package descriptions'; calibrating on
# docstrings covers 93% of the docstring set and 62% of the shipped held-out text (benchmarks/bench_quality.py)
FAR_COVERAGE = 0.7


def _warn_far_from_calibration(ck: Checkpoint, sets: dict[str, list[str]]) -> None:
    """One warning line per held-out set whose tokens the compressed model's calibration text rarely had."""
    cal = ck.record.get("calibration")
    if not cal:
        return
    ref = data.sample(data.read_lines(cal.get("path"), tuple(cal.get("default") or data.DEFAULT_CALIBRATION), "calibration file"), cal.get("n") or 1024)
    for name, texts in sets.items():
        cov = data.token_coverage(ck.tokenizer, ref, texts)
        if cov < FAR_COVERAGE:
            warn(f"held-out set {name!r}: only {cov:.0%} of its tokens occur in the calibration text the model was "
                 f"compressed on; expect lower quality on text like it, and calibrate on text like the model's "
                 f"own input (planner plan --calib FILE)")


# how each quality metric orders: the worst held-out set is the one with the lowest of these, the highest of those
WORST = {"cosine": min, "spearman": min, "nn_agree": min, "top1_agree": min, "ppl_increase": max}


def quality_on_sets(dense, comp, adapter, ck: Checkpoint, sets: dict[str, list[str]], cfg: VerifyConfig,
                    progress: bool) -> dict:
    """Quality on every held-out set: {"sets": {name: metrics}, the worst set's value of each metric at the top
    level (the headline: text the user brings may be any of them), "worst": {metric: set name}}."""
    per = {name: quality(dense, comp, adapter, ck, texts, cfg, progress, desc=name) for name, texts in sets.items()}
    out = {"sets": per, "n_text": sum(q["n_text"] for q in per.values()), "worst": {}}
    first = next(iter(per.values()))
    for metric in first:
        if metric in WORST:
            name = WORST[metric](per, key=lambda n: per[n][metric])
            out[metric], out["worst"][metric] = per[name][metric], name
        elif metric not in ("n_text",) and len(per) == 1:
            out[metric] = first[metric]
    if "ppl" in first:                                   # perplexities of the set whose increase is the worst
        w = out["worst"]["ppl_increase"]
        out.update(ppl=per[w]["ppl"], ppl_dense=per[w]["ppl_dense"], n_tokens=per[w]["n_tokens"])
    return out


def quality(dense, comp, adapter, ck: Checkpoint, texts: list[str], cfg: VerifyConfig, progress: bool,
            desc: str = "") -> dict:
    """Held-out quality of `comp` against `dense`: perplexity and next-token agreement (causal LMs) or the
    embedding similarity structure (encoders); tokenised with the compressed checkpoint's tokenizer."""
    tok = ck.tokenizer
    if adapter.causal_lm:
        q = lm_quality(dense, comp, tok, texts, cfg.ppl_window, device=cfg.device, progress=progress)
    else:
        max_len = min(128, adapter.max_positions(comp.config) or 128)
        key = (io.sha256_text(*texts), max_len)
        cache = dense.__dict__.setdefault("_planner_embeddings", {})   # lives and dies with the dense model
        if key not in cache:    # the job verifies up to nine models against one dense model: 7 s each on 2 cores
            cache[key] = embeddings(dense, adapter, tok, texts, max_len=max_len, device=cfg.device,
                                    progress=progress, desc=f"verify {desc}: dense")
        ed = cache[key]
        ec = embeddings(comp, adapter, tok, texts, max_len=max_len, device=cfg.device, progress=progress,
                        desc=f"verify {desc}: compressed")
        q = similarity_quality(ed, ec)
    q["n_text"] = len(texts)
    return q
