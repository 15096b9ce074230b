"""Latency profiles: the dense model and every prunable module at every kept width, on this machine.

Latency depends on shapes, not weights, so the profiler builds a randomly initialised dense model of
the checkpoint's architecture and times it.

Two methods:
- "model" (default): each option is timed *inside the running model*: a variant where every block's
  attention keeps k heads (or every FFN keeps w neurons) is timed against the dense model, interleaved (ABBA).
  Module time = base * (ratio(w) - ratio(0)) / L with ratio = variant / dense, anchored at the removed module. This captures what isolated
  timing misses: cache pressure from the other blocks and per-call overheads, which dominate at batch 1.
- "module": the module alone in a loop, as ZipLM did; fast, but at small batch it under-predicts speedups.
The constant (embeddings, norms, pooler, everything not prunable) is base - Σ dense module times.
The module curves are de-noised (latency.smooth_curve). Then a few random mixed architectures are timed against
the dense model; an affine correction of the additive model is fitted on them and folded into the module times
only when it predicts them better (latency.py). The profile records this check in `fit`.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import random
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from .. import hardware, io
from ..adapters.checkpoint import Checkpoint, quiet_transformers
from ..algorithms import latency, sparse
from ..config import ProfileConfig
from ..data import latency_inputs
from ..errors import PlannerError, warn
from ..progress import bar as progress_bar
from ..timing import abba, median, ratio_of, spread, time_calls, warm_up
from ..types import KINDS, LatencyProfile
from . import regimes

VARIANT_CACHE_BYTES = 4 << 30          # keep built variants up to this many parameter bytes, else rebuild per use
EXTRA_SHARE = 1.0                      # repeats of noisy variants: at most this share of the fixed rounds' time
# The machine's noise (the dense model against a copy of itself) gets this many more pairs: at one pair per round
# its 95% interval from the rounds alone is the range of ~7 single calls (median_ci); one slow call put it at
# +-25.7% where the next run's 23 pairs gave +-6.5% (MiniLM, 2-core EPYC, batch 8 x 128, reps 1)
NOISE_PAIRS = 16
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def width_grid(kind: str, dense: int, step: int, max_levels: int | None = None) -> list[int]:
    """Kept widths to time: every head count; FFN multiples of `step` plus 0 and the dense width. A wide FFN
    (more than `max_levels` multiples) gets a coarser step, itself a multiple of `step`: 11008 neurons at step
    32 would be 345 widths to time and score, at 128 they are 86, and GPU kernels favour multiples of 128."""
    if kind == "attn":
        return list(range(dense + 1))
    if max_levels and dense // step > max_levels:
        step *= -(-dense // (step * max_levels))                     # ceil: at most max_levels multiples
    return sorted({0, dense, *range(step, dense, step)})


def dense_model_from_config(ck, dtype=torch.float32, device="cpu"):
    """A randomly initialised dense model with the checkpoint's architecture (planner_layers dropped): latency
    depends on shapes, not weights. `ck`: a Checkpoint or a model directory."""
    ck = Checkpoint.open(ck)
    cfg = {k: v for k, v in ck.config.items() if k not in ("planner_layers", "auto_map", "planner", "architectures")}
    arch = (ck.config.get("architectures") or ["AutoModel"])[0].removeprefix("Planner")
    with quiet_transformers():
        config = transformers.AutoConfig.for_model(**cfg)
    cls = getattr(transformers, arch, None) or transformers.AutoModel
    torch.manual_seed(0)
    model = (cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config))
    ck.adapter.prepare_(model)
    return model.eval().to(device=device, dtype=dtype), ck.adapter


def _variant(model, adapter, layers: list[dict]):
    """A copy whose block i keeps the first layers[i]['heads'] heads and ['ffn'] neurons (weights are
    irrelevant for latency); dense entries are left untouched. A spec may also carry
    "sparse": {kind: level} and "kernel": the linears of that module then run on the sparse kernel at that
    sparsity (a random mask with the right number of non-zeros)."""
    # share the embedding tables (and a tied LM head): they are never pruned
    v = copy.deepcopy(model, memo={id(p): p for p in adapter.embedding_parameters(model)})
    shape = adapter.shape(model)
    dense = {"attn": shape.attn_units, "ffn": shape.ffn}
    gen = torch.Generator().manual_seed(0)
    for layer, spec in zip(adapter.layers(v), layers):
        for k, key in (("attn", "heads"), ("ffn", "ffn")):
            if spec[key] != dense[k]:
                adapter.shrink_(layer, k, torch.arange(spec[key]), None, v.config)
        for k, level in (spec.get("sparse") or {}).items():
            if spec["kernel"] == "csr":                 # the portable layer a saved sparse plan loads into
                ws = []
                for p, n in adapter.linear_slots(layer, k):
                    w = getattr(p, n).weight                     # (out, in); the mask comes from a CPU generator
                    ws.append(w * sparse.random_mask(w.shape, level, gen).to(w.device))
                adapter.sparsify_(layer, k, level, ws)
            else:
                for parent, name in adapter.linear_slots(layer, k):
                    setattr(parent, name, sparse.sparse_like(getattr(parent, name), level, spec["kernel"], gen))
    return v


def _uniform(shape, kind: str, width: int) -> list[dict]:
    """Every block at `width` for `kind` ("all": both kinds), dense otherwise; width -1: dense (a copy)."""
    h = width if kind in ("attn", "all") and width >= 0 else shape.attn_units
    f = width if kind in ("ffn", "all") and width >= 0 else shape.ffn
    return [{"heads": h, "ffn": f}] * shape.n_layers


def profile(ck, cfg: ProfileConfig = ProfileConfig(), progress: bool = True) -> LatencyProfile:
    """Time the dense model and every prunable module at every kept width on this machine (module docstring);
    the thread count is set for the call and restored after it."""
    hardware.check_device(cfg.device)
    hardware.steady_allocator()                      # before the models are built: all of it under one allocator
    with hardware.threads(cfg.threads):
        prof = _profile(Checkpoint.open(ck), cfg, progress)
    noise = prof.base.get("noise") or {}
    if noise.get("halfwidth", 0) > cfg.noise_bound:
        warn(f"this machine is noisy: the dense model timed against a copy of itself varied +-{noise['halfwidth']:.1%} "
             f"(95% interval, {noise['pairs']} pairs), wider than --noise-bound {cfg.noise_bound:.0%}; close other "
             f"programs, use fewer --threads than cores, or plan with a wider --tolerance")
    return prof


def _profile(ck: Checkpoint, cfg: ProfileConfig, progress: bool) -> LatencyProfile:
    model, adapter = dense_model_from_config(ck, DTYPES[cfg.dtype], cfg.device)
    regimes.check_mode(adapter, cfg.mode)
    # decode: the cache holds seq_len tokens and the timed loop adds decode_steps
    decoding = cfg.mode == "decode"
    adapter.check_positions(model.config, cfg.seq_len, f"--seq-len {cfg.seq_len}" +
                            (f" with --decode-steps {cfg.decode_steps}" if decoding else ""),
                            cfg.decode_steps if decoding else 0)
    if cfg.method == "module" and adapter.module_call(adapter.layers(model)[0], "attn", None, (), {}) is None:
        raise PlannerError(f"--method module cannot time {adapter.family} modules alone; use --method model")
    shape = adapter.shape(model)
    dense = {"attn": shape.attn_units, "ffn": shape.ffn}
    grids = {k: width_grid(k, dense[k], cfg.ffn_step, cfg.ffn_levels) for k in KINDS}
    notes, floor, sparse_mods = [], 0.0, {}
    levels = _sparse_levels(cfg)
    mixed = latency.mixed_architectures(shape.n_layers, shape.attn_units, grids["ffn"], cfg.n_mixed, seed=0)
    if cfg.method == "model":
        base, mods, all_removed, mixed_times, sparse_mods = _profile_in_model(model, adapter, grids, dense,
                                                                              mixed, cfg, progress, levels)
        # The timed all-removed model is a diagnostic of non-additivity (2-12 ms at batch 8 on a 2-core CPU,
        # where base - Σ dense modules came out near 0). Used as the constant it under-predicted speedups by
        # 10-15%; the check on mixed architectures (_fit) corrects the model where plans actually land.
        notes.append(f"all modules removed, timed: {all_removed * 1e3:.3f} ms")
        floor = float(all_removed)
    else:
        x = latency_inputs(shape.vocab, cfg.batch_size, cfg.seq_len, cfg.device)
        base, mods = _profile_modules(model, adapter, x, grids, cfg, progress)
        ratios = _time_variants(model, adapter, dict(enumerate(mixed)), cfg, progress, "validate")[0]
        mixed_times = {i: base["median"] * median(r) for i, r in ratios.items()}
    for k in KINDS:
        mods[k]["model"] = [float(t) for t in latency.smooth_curve(mods[k]["widths"], mods[k]["median"],
                                                                   cfg.smooth if k == "ffn" else min(cfg.smooth, 2))]
    constant = base["median"] - shape.n_layers * sum(mods[k]["model"][-1] for k in KINDS)
    prof = LatencyProfile(
        hardware=hardware.describe(cfg.device), shape={**shape.__dict__, "key": shape.key},
        batch_size=cfg.batch_size, seq_len=cfg.seq_len, dtype=cfg.dtype, mode=cfg.mode, method=cfg.method,
        base=base, constant=float(constant), modules=mods, notes=notes, floor=floor, sparse=sparse_mods,
        decode_steps=cfg.decode_steps if cfg.mode == "decode" else 0,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return _fit(prof, mixed, [mixed_times[i] for i in range(len(mixed))])


def _sparse_levels(cfg: ProfileConfig) -> list[tuple[float, str]]:
    """(sparsity, kernel) pairs to time: CSR at every requested level; on CUDA also 2:4 where supported."""
    out = [(float(s), "csr") for s in sorted(cfg.sparsity)]
    if cfg.sparsity and cfg.device == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        out.append((0.5, "2:4"))
    return out


def _fit(prof: LatencyProfile, mixed: list[list[dict]], measured: list[float]) -> LatencyProfile:
    """Check the additive model on the timed mixed architectures, and fold in the affine correction fitted on
    them (see latency.py) when it predicts them better, also when each is left out of its own fit."""
    base = prof.base["median"]
    additive = [prof.predict(m) for m in mixed]
    fit = {"n_mixed": len(mixed), "offset": 0.0, "scale": 1.0, "applied": False,
           "max_rel_error_additive": latency.max_rel_error(additive, measured)}
    corrected = _clamped(prof)
    err_add = latency.max_rel_error([corrected.predict(m) for m in mixed], measured)   # what is stored without a fit
    if len(mixed) >= 3:
        xs, ys = [base, *additive], [base, *measured]          # the dense model is a point too
        offset, scale = latency.affine_fit(xs, ys)
        loo = latency.loo_max_rel_error(xs, ys)
        fit.update(offset=offset, scale=scale, loo_max_rel_error=loo)
        cand = _clamped(prof.corrected(offset, scale))
        err_fit = latency.max_rel_error([cand.predict(m) for m in mixed], measured)
        # a negative scale is noise, not physics; so is a constant at or above the dense time (a fit on mixed
        # architectures that all timed like the dense model, seen on a tiny model on a busy 2-core machine)
        if scale > 0 and cand.constant < base and err_fit < err_add and loo < err_add:
            corrected, fit["applied"] = cand, True
    fit["variants"] = [{"layers": m, "measured": y, "additive": a, "predicted": corrected.predict(m)}
                       for m, y, a in zip(mixed, measured, additive)]
    fit["max_rel_error"] = latency.max_rel_error([v["predicted"] for v in fit["variants"]], measured)
    return dataclasses.replace(corrected, fit=fit)


def _clamped(prof: LatencyProfile) -> LatencyProfile:
    """A negative constant (the dense modules summed to more than the dense model: timing noise) is impossible;
    scale the module times down so that it is 0 while the dense model is still predicted exactly. Shifting every
    prediction by the deficit instead made plans look up to 7% slower than measured at batch 8."""
    if prof.constant >= 0:
        return prof
    base = prof.base["median"]
    s = base / (base - prof.constant)
    note = f"constant came out negative ({prof.constant:.2e} s): module times scaled by {s:.4f} to make it 0"
    return dataclasses.replace(prof.scaled(s), constant=0.0, notes=[*prof.notes, note])


def _forward(model, adapter, cfg):
    """The timed call of `model` in the profiled regime (regimes.py)."""
    return regimes.latency_call(model, adapter, cfg.mode, cfg.batch_size, cfg.seq_len, cfg.device,
                                decode_steps=cfg.decode_steps if cfg.mode == "decode" else 0)


def _time_variants(model, adapter, variants: dict, cfg, progress, desc="profile", reps: int | None = None,
                   anchors: tuple = (), more: dict | None = None):
    """Time each variant (key -> per-layer specs) against the dense model, interleaved as `verify` does.

    Variants are built once and kept (when they fit in VARIANT_CACHE_BYTES), so every timing sees a long-lived
    model as a user's deployment does: rebuilding a copy per timing churned the allocator and shifted the FFN
    times by up to 15% on a 2-core CPU; each is warmed to a steady pace when built (timing.warm_up). Each round
    visits the variants in a new random order and times dense, variant, variant, dense (ABBA); the round's ratio
    is variant / dense. Load from other processes and frequency changes scale both alike, so the ratio cancels
    them where a difference would keep their noise. After cfg.rounds, variants whose ratio is not yet known to
    +-cfg.noise_bound (95% interval of the median per-pair ratio) get more rounds, with the `anchors` (the
    variants others are measured against), until they are or cfg.extra_minutes run out.
    `more`: {key: pairs} timed last for those variants (their Ratio, not their per-round ratios).
    `reps`: ABBA pairs per variant and round (default cfg.reps). Returns ({key: [variant / dense time, one per
    round]}, [dense times], {key: Ratio of all its pairs}, extra rounds run).
    """
    keys = list(variants)
    more = more or {}
    # a variant shares the embedding table; its blocks are at most the dense blocks' size
    block_bytes = sum(p.numel() * p.element_size() for l in adapter.layers(model) for p in l.parameters())
    keep = block_bytes * len(keys) <= VARIANT_CACHE_BYTES
    built = {}

    def get(k):
        if k in built:
            return built[k]
        v = _variant(model, adapter, variants[k])
        fv = _forward(v, adapter, cfg)                  # decode: each variant holds its own KV cache
        warm_up(fv, cfg.device, min_calls=max(cfg.warmup, 1))
        if keep:
            built[k] = fv
        return fv

    ratios, pairs, bases = {k: [] for k in keys}, {k: ([], []) for k in keys}, []
    fd = _forward(model, adapter, cfg)
    warm_up(fd, cfg.device, min_calls=max(cfg.warmup, 1))

    def one_round(r, which, bar):
        order = which[:]
        random.Random(r).shuffle(order)
        for i, k in enumerate(order):
            td, tv = abba(fd, get(k), reps or cfg.reps, cfg.device, start=i)
            ratios[k].append(median(tv) / median(td))
            pairs[k][0].extend(td)
            pairs[k][1].extend(tv)
            bases.extend(td)
            bar.update()

    bar = progress_bar(total=cfg.rounds * len(keys), desc=desc, progress=progress, unit="variant")
    t_fixed = time.perf_counter()
    for r in range(cfg.rounds):
        one_round(r, keys, bar)
    bar.close()
    # repeats take at most as long as the fixed rounds did (and at most --extra-minutes)
    t0, extra = time.perf_counter(), 0
    budget = min(cfg.extra_minutes * 60, EXTRA_SHARE * (t0 - t_fixed))
    while time.perf_counter() - t0 < budget:
        loose = [k for k in keys if ratio_of(*pairs[k]).halfwidth > cfg.noise_bound]
        if not loose:
            break
        todo = sorted(set(loose) | {a for a in anchors if a in variants}, key=keys.index)
        bar = progress_bar(total=len(todo), desc=f"{desc}: repeating {len(loose)} noisy", progress=progress,
                           unit="variant")
        one_round(cfg.rounds + extra, todo, bar)
        bar.close()
        extra += 1
    for k in more:              # ratios known better than the rounds give: more pairs, in one run of their own
        if k in variants:
            td, tv = abba(fd, get(k), more[k], cfg.device)
            pairs[k][0].extend(td)
            pairs[k][1].extend(tv)
            bases.extend(td)
    return ratios, bases, {k: ratio_of(*pairs[k]) for k in keys}, extra


def _profile_in_model(model, adapter, grids, dense, mixed, cfg, progress, sparse_levels=()):
    shape = adapter.shape(model)
    L = shape.n_layers
    # ("all", 0): every module removed, a diagnostic of how non-additive the savings are;
    # ("mix", i): random mixed architectures for the affine correction (latency.py)
    # ("null", 0): a copy of the dense model, the machine's noise: a ratio that should be 1
    variants = {(k, w): _uniform(shape, k, w) for k in KINDS for w in grids[k] if w != dense[k]}
    variants[("all", 0)] = _uniform(shape, "all", 0)
    variants[("null", 0)] = _uniform(shape, "all", -1)
    variants.update({("mix", i): m for i, m in enumerate(mixed)})
    ratios, bases, est, extra = _time_variants(model, adapter, variants, cfg, progress,
                                               anchors=tuple((k, 0) for k in KINDS), more={("null", 0): NOISE_PAIRS})
    # ("sparse", kind, level, kernel): every block's `kind` at full width with its linears on a sparse kernel.
    # Timed in a phase of their own, once the structured variants are freed. Timed among ~60 live variants,
    # a 95%-sparse CSR FFN came out at 61% of the dense FFN and every-FFN-sparse models ran 18% faster than
    # predicted; in their own phase it came out at 47% and that error fell to 10% (MiniLM, 2-core EPYC,
    # batch 8 x 128; the CSR kernel is memory-bound, unlike the dense GEMM it is compared with).
    full = {"heads": shape.attn_units, "ffn": shape.ffn}
    sparse_variants = {("sparse", k, lv, ker): [{**full, "sparse": {k: lv}, "kernel": ker}] * L
                       for k in KINDS for lv, ker in sparse_levels}
    if sparse_variants:
        ratios.update(_time_variants(model, adapter, sparse_variants, cfg, progress, "profile: sparse",
                                     reps=cfg.sparse_reps)[0])
    t0 = median(bases) / (cfg.decode_steps if cfg.mode == "decode" else 1)      # seconds per call, or per step
    # Every variant is a copy of the dense model, and a copy does not always run at the original's pace (a tiny
    # Llama's copy, decoding, measured 10-13% slower; MiniLM's at batch 8 within 1%): the dense width's ratio is
    # the copy's, so that every module time is a difference between copies, as the models a user deploys are
    # (verify loads both fresh). R(null) also rescales the timed mixed and all-removed models below.
    r_null = median(ratios[("null", 0)])
    mods = {}
    for k in KINDS:
        # module time relative to the removed module: t(w) = t0 * (R(w) - R(0)) / L, R = variant / dense (the
        # median over rounds of each; variants repeated for noise have more rounds than others)
        per_round = {w: (ratios[("null", 0)] if w == dense[k] else ratios[(k, w)]) for w in grids[k]}
        r0 = median(per_round[0])
        med = [max(t0 * (median(per_round[w]) - r0) / L, 0.0) for w in grids[k]]   # noise can push a tiny
        spr = [t0 * float(np.hypot(spread(per_round[w]), spread(per_round[0]))) / L if cfg.rounds > 1 else 0.0
               for w in grids[k]]                                               # module below its removal
        mods[k] = {"widths": grids[k], "median": med, "spread": spr}
    all_removed = t0 * median(ratios[("all", 0)]) / r_null
    mixed_times = {i: t0 * median(ratios[("mix", i)]) / r_null for i in range(len(mixed))}
    null = est[("null", 0)]
    base = {"median": t0, "spread": spread(bases), "reps": len(bases),
            # the machine's noise: the dense model against a copy of itself, and what stayed noisy
            "noise": {"ratio": null.value, "halfwidth": null.halfwidth, "pairs": null.pairs, "extra_rounds": extra,
                      "bound": cfg.noise_bound,
                      "loose": sum(r.halfwidth > cfg.noise_bound for r in est.values()), "variants": len(est)}}
    sparse_mods = {}
    for k in KINDS if sparse_levels else ():
        zero = ratios[(k, 0)][:cfg.rounds]                 # the sparse phase has cfg.rounds rounds
        vals = [[t0 * (a - b) / L for a, b in zip(ratios[("sparse", k, lv, ker)], zero)] for lv, ker in sparse_levels]
        med = [max(median(v), 0.0) for v in vals]
        sparse_mods[k] = {"levels": [lv for lv, _ in sparse_levels], "kernels": [ker for _, ker in sparse_levels],
                          "median": med, "model": sparse_model([lv for lv, _ in sparse_levels],
                                                               [ker for _, ker in sparse_levels], med),
                          "spread": [spread(v) if cfg.rounds > 1 else 0.0 for v in vals]}
    return base, mods, all_removed, mixed_times, sparse_mods


def sparse_model(levels, kernels, times) -> list[float]:
    """Per kernel, the least-squares fit of the times that does not grow with sparsity: a kernel's work only
    falls as non-zeros go, so a sparser level timed slower is noise (2 rounds once timed a 95% CSR FFN slower
    than the 90% one). levels/kernels/times: one entry per timed option, in any order."""
    out = list(map(float, times))
    for ker in set(kernels):
        idx = sorted((i for i, k in enumerate(kernels) if k == ker), key=lambda i: levels[i])
        fit = -latency.isotonic([-times[i] for i in idx])       # non-increasing in sparsity
        for i, t in zip(idx, fit):
            out[i] = float(t)
    return out


def _profile_modules(model, adapter, x, grids, cfg, progress):
    layer0 = adapter.layers(model)[0]
    captured = {}

    def hook(mod, a, kw):
        captured["a"], captured["kw"] = a, kw

    h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.inference_mode():
        model(**x)
    h.remove()
    hidden, rest, kw = captured["a"][0], captured["a"][1:], captured["kw"]
    base_times = time_calls(_forward(model, adapter, cfg), cfg.reps * cfg.rounds, cfg.warmup, cfg.device)
    mods = {}
    bar = progress_bar(total=sum(len(g) for g in grids.values()), desc="profile", progress=progress, unit="option")
    for k in KINDS:
        med, spr = [], []
        for w in grids[k]:
            layer = copy.deepcopy(layer0)
            adapter.shrink_(layer, k, torch.arange(w), None, model.config)
            ts = time_calls(adapter.module_call(layer, k, hidden, rest, kw), cfg.reps * cfg.rounds, cfg.warmup,
                            cfg.device)
            med.append(median(ts))
            spr.append(spread(ts))
            bar.update()
        mods[k] = {"widths": grids[k], "median": med, "spread": spr}
    bar.close()
    return {"median": median(base_times), "spread": spread(base_times), "reps": len(base_times)}, mods


def summary(p: LatencyProfile, path=None) -> dict:
    """A profile's conditions and headline numbers as one flat row (listing, `profile --json`)."""
    top = p.max_speedup()
    return {"path": str(path) if path else None, "hardware": p.hardware.get("name"), "machine": p.hardware.get("key"),
            "device": p.hardware.get("device"), "threads": p.hardware.get("threads"),
            "shape": p.shape.get("key"), "mode": p.mode, "batch": p.batch_size, "seq": p.seq_len,
            "dtype": p.dtype, "dense_ms": p.base["median"] * 1e3, "constant_ms": p.constant * 1e3,
            "max_speedup": top if np.isfinite(top) else None,       # JSON has no infinity
            "check_max_err": p.fit.get("max_rel_error") if p.fit else None,
            "sparse_crossover": {k: p.sparse_crossover(k) for k in p.sparse},
            "torch": p.hardware.get("torch"), "created": p.created}


def list_profiles(root="profiles") -> list[dict]:
    """One row per stored profile under `root`: its conditions and how well it predicted its own check.
    Files that are not readable profiles are listed with the reason; other planner files are skipped."""
    rows = []
    for path in sorted(Path(root).rglob("*.json")):
        try:
            d = io.read_json(path, "profile")
            if isinstance(d, dict) and d.get("kind") not in (None, LatencyProfile.KIND):
                continue                                     # another planner artefact (plan, verify report)
            p = LatencyProfile.from_dict(d, path)
        except PlannerError as e:
            rows.append({"path": str(path), "error": str(e).splitlines()[0]})
            continue
        rows.append(summary(p, path))
    return rows


def default_profile_path(p: LatencyProfile, root="profiles") -> Path:
    return Path(root) / p.hardware["key"] / p.shape["key"] / f"{p.mode}-b{p.batch_size}-s{p.seq_len}-{p.dtype}.json"


def check_profile(p: LatencyProfile, shape, device: str = "cpu", allow_other_machine: bool = False) -> None:
    """Refuse a profile measured for another architecture shape, or (unless allowed) another machine."""
    if p.shape.get("key") != shape.key:
        raise PlannerError(f"profile is for architecture {p.shape.get('key')}, the model is {shape.key}: "
                           f"profile this model with `planner profile`")
    # the machine, at the profile's own thread count: a plan may be made with any number of threads, the
    # deployment (and verify) runs at the profile's
    here = hardware.describe(device, threads=p.hardware.get("threads"))
    if p.hardware.get("key") != here["key"] and not allow_other_machine:
        raise PlannerError(f"profile was measured on {p.hardware.get('name')!r} ({p.hardware.get('key')}), "
                           f"this machine is {here['key']}: profile here, or pass --allow-other-machine")
