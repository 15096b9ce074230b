"""The public API: profile → plan (database + DP) → apply → verify, and load. The CLI calls only these."""
from __future__ import annotations

import copy
import datetime as _dt
from pathlib import Path

import numpy as np
import torch

from . import data, hardware, io
from .stages.apply import apply_
from .config import PlanConfig, ProfileConfig, VerifyConfig
from .stages.database import Database, DatabaseConfig
from .stages.database import build as build_db
from .errors import PlannerError
from .adapters import adapter_for
from .adapters.checkpoint import (check_pair, fingerprint, is_planner_model, load_model, load_tokenizer, n_params, origin,
                     save_portable)
from .stages.plan import solve_plans
from .stages.profile import check_profile, default_profile_path
from .stages.profile import profile as _profile
from .stages.profile import width_grid
from .types import LatencyProfile, Plan, VerifyReport
from .stages.verify import conditions, embeddings, lm_quality, measure_speedup, similarity_quality


def profile(model_path, cfg: ProfileConfig = ProfileConfig(), out=None, root="profiles", progress=True):
    """Measure a latency profile on this machine; write it to `out` (default under `root`). Returns (profile, path)."""
    if out:
        io.check_out_file(out)
    p = _profile(model_path, cfg, progress)
    path = Path(out) if out else default_profile_path(p, root)
    p.save(path)
    return p, path


def profile_summary(p: LatencyProfile, path=None) -> dict:
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
    Files that are not readable profiles are listed with the reason instead of failing the listing."""
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
        rows.append(profile_summary(p, path))
    return rows


def report(run_dir, out_dir=None, progress=True) -> Path:
    """Render a run's profile, plans and verify reports as an HTML page with PNG plots; returns index.html."""
    from .reporting.html import write
    if out_dir:
        io.check_out_dir(out_dir, replaceable=lambda d: (d / "index.html").exists())
    return write(run_dir, out_dir, progress=progress)


def calibration_batches(model_path, calib_path, n, max_len, batch_size):
    """(batches, hash): n passages of the calibration text as padded batches (encoders) or, for causal LMs,
    cut into token windows of max_len (no padding), and a hash identifying them."""
    from .adapters import get_adapter
    from .adapters.checkpoint import _config_dict
    texts = data.sample(data.read_lines(calib_path, data.CALIBRATION, "calibration file"), n)
    tok = load_tokenizer(model_path)
    cfg_dict = _config_dict(Path(model_path))
    causal = get_adapter(cfg_dict["model_type"]).causal_lm
    vocab = cfg_dict.get("vocab_size")
    if causal:
        return (data.window_batches(tok, texts, max_len, batch_size, vocab),
                io.sha256_text(*texts, str(max_len), str(batch_size), "windows"))
    return (data.batches(tok, texts, batch_size, max_len, vocab),
            io.sha256_text(*texts, str(max_len), str(batch_size)))


def build_database(model_path, prof: LatencyProfile, cfg: PlanConfig, db_dir, progress=True) -> Database:
    model, adapter = load_model(model_path, device="cpu" if cfg.offload else cfg.device)
    shape = adapter.shape(model)
    batches, calib_hash = calibration_batches(model_path, cfg.calib_path, cfg.n_calib, cfg.calib_max_len, cfg.calib_batch)
    levels = {"attn": width_grid("attn", shape.attn_units, 1), "ffn": prof.times("ffn").widths}
    sparse = sorted({float(lv) for s in prof.sparse.values() for lv, k in zip(s["levels"], s["kernels"]) if k == "csr"})
    if cfg.sparse and sparse and cfg.device == "cpu":
        levels["sparse"] = sparse          # only when asked for, so a structured-only database keeps its identity
    identity = {"model": fingerprint(model_path), "calibration": calib_hash}
    return build_db(model, adapter, batches, db_dir, levels, DatabaseConfig(cfg.damp, cfg.val_fraction, cfg.device,
                                                                                cfg.offload),
                    identity, progress)


def plan(model_path, profile_path, cfg: PlanConfig, out_dir, progress=True, db_dir=None) -> list[Plan]:
    """Build (or reuse) the OBS database (under out_dir/db, or db_dir) and write one Plan per target:
    out_dir/plan-<t>x.json."""
    prof = LatencyProfile.load(profile_path)
    io.check_out_dir(out_dir)
    model, adapter = load_model(model_path)
    check_profile(prof, adapter.shape(model), prof.hardware.get("device", "cpu"), cfg.allow_other_machine)
    adapter.check_positions(model.config, cfg.calib_max_len, f"--calib-max-len {cfg.calib_max_len}")
    # Refuse unreachable targets before the expensive database build.
    too_far = [t for t in cfg.targets if t > prof.max_speedup()]
    if too_far:
        from .errors import UnreachableTarget
        raise UnreachableTarget(f"speedup {max(too_far):g}x is not reachable with this profile: the largest "
                                f"reachable speedup is {prof.max_speedup():.2f}x")
    if not cfg.structured and not prof.sparse:
        raise PlannerError("--sparse-only needs a profile with sparse levels: profile with --sparsity "
                           "(e.g. 0.9,0.95)")
    out_dir = Path(out_dir)
    db = build_database(model_path, prof, cfg, Path(db_dir) if db_dir else out_dir / "db", progress)
    info = {"path": str(model_path), "fingerprint": fingerprint(model_path)}
    calib = {"calib_path": cfg.calib_path, "n_calib": cfg.n_calib, "calib_max_len": cfg.calib_max_len,
             "calib_batch": cfg.calib_batch, "damp": cfg.damp, "val_fraction": cfg.val_fraction,
             "weights": "sequential" if cfg.sequential else "obs", "sparse": cfg.sparse,
             **({} if cfg.structured else {"structured": False})}
    plans = solve_plans(db, prof, sorted(cfg.targets), cfg.error_norm, cfg.n_buckets, info, profile_path, calib,
                        structured=cfg.structured)
    if cfg.search:
        plans = [_searched(p, model_path, db, prof, cfg, info, profile_path, calib, out_dir, progress) for p in plans]
    for p in plans:
        p.save(out_dir / plan_name(p))
    return plans


def _searched(plain: Plan, model_path, db, prof, cfg: PlanConfig, info, profile_path, calib, out_dir,
              progress) -> Plan:
    """SPDY search for one target: the plan whose stitched model has the lowest calibration loss among
    cfg.search candidates (the plain DP's plan is the first, so the result is never worse on that loss)."""
    import dataclasses

    from .stages.plan import plan_key
    from .algorithms.search import search
    from .types import KINDS
    groups = [(l, k) for l in range(db.n_layers) for k in KINDS]
    loss_of = _stitched_loss(model_path, db, cfg)
    by_key = {plan_key(plain): plain}

    def solve(c):
        p = solve_plans(db, prof, [plain.target_speedup], cfg.error_norm, cfg.n_buckets, info, profile_path, calib,
                        scale=dict(zip(groups, c)), structured=cfg.structured)[0]
        by_key.setdefault(plan_key(p), p)
        return plan_key(p)

    seconds = cfg.search_minutes * 60 if cfg.search_minutes else None
    identity = {"database": db.index["identity"], "target": plain.target_speedup, "profile": plain.profile["created"],
                "norm": cfg.error_norm}
    res = search(len(groups), solve, lambda key: loss_of(by_key[key]), cfg.search, seconds,
                 out_dir / "search" / f"search-{plain.target_speedup:g}x.json", progress=progress, identity=identity)
    best_key = tuple(res.history[min(range(len(res.history)), key=lambda i: res.history[i]["loss"])]["plan_key"])
    if best_key not in by_key:                 # resumed: the winner came from the state file, not this session
        solve(np.asarray(res.coefs))
    best = by_key.get(best_key, plain)
    record = {"candidates": res.n_candidates, "evaluated": res.n_evaluated, "loss_dp": res.loss_dp,
              "loss": res.loss, "coefficients": {f"{l}.{k}": c for (l, k), c in zip(groups, res.coefs)},
              "total_error_dp": plain.total_error}
    return dataclasses.replace(best, options={**best.options, "search": record})


def _stitched_loss(model_path, db: Database, cfg: PlanConfig):
    """plan -> relative error of the last hidden states of the stitched model (OBS weights from the database)
    against the dense model, on the held-back calibration passages: Σ‖h − h_dense‖² / Σ‖h_dense − mean‖²."""
    from .stages.apply import apply_
    from .stages.database import _split
    dense, adapter = load_model(model_path, device=cfg.device)
    batches, _ = calibration_batches(model_path, cfg.calib_path, cfg.n_calib, cfg.calib_max_len, cfg.calib_batch)
    val = _split(batches, cfg.val_fraction)[1]

    @torch.no_grad()
    def last_hidden(m):
        out = []
        for b in val:
            ids, mask = b["input_ids"].to(cfg.device), b["attention_mask"].to(cfg.device)
            h = adapter.distill_outputs(m, ids, mask)["hidden"][-1]
            out.append(h[mask.bool()].double())                      # (tokens, d)
        return out

    ref = last_hidden(dense)
    den = sum(float(((r - r.mean(0)) ** 2).sum()) for r in ref)

    def loss(plan: Plan) -> float:
        m = copy.deepcopy(dense)
        apply_(m, adapter, plan, select="obs", weights="obs", db=db, damp=cfg.damp, progress=False)
        return sum(float(((h - r) ** 2).sum()) for h, r in zip(last_hidden(m), ref)) / max(den, 1e-30)
    return loss


def plan_name(p: Plan) -> str:
    tag = "" if p.method == "planner" else f"-{p.method}"
    return f"plan{tag}-{p.target_speedup:g}x.json"


def apply(model_path, plan_path_or_plan, out_dir, calib_path=None, weights: str | None = None, select: str = "obs",
          progress=True, check_fingerprint=True):
    """Compress `model_path` to the plan and write a portable HF directory. Returns (out_dir, model)."""
    p = plan_path_or_plan if isinstance(plan_path_or_plan, Plan) else Plan.load(plan_path_or_plan)
    io.check_out_dir(out_dir, replaceable=is_planner_model, protect=(model_path,))
    model, adapter = load_model(model_path)
    source_fp = fingerprint(model_path)
    if check_fingerprint and p.model.get("fingerprint") and p.model["fingerprint"] != source_fp:
        raise PlannerError(f"the plan was made for another checkpoint ({p.model.get('path')}); plan this model first")
    o = p.options
    weights = weights or o.get("weights", "sequential")
    db = None
    if select == "obs":
        db_path = Path(p.database.get("path", ""))
        if not (db_path / "index.json").exists():
            raise PlannerError(f"the plan's OBS database {db_path} is missing: rerun `planner plan`")
        db = Database(db_path)
    batches = None
    if weights == "sequential":
        batches, _ = calibration_batches(model_path, calib_path or o.get("calib_path"), o.get("n_calib", 1024),
                                         o.get("calib_max_len", 128), o.get("calib_batch", 32))
    apply_(model, adapter, p, select=select, weights=weights, db=db, batches=batches,
           damp=o.get("damp", 0.01), progress=progress)
    record = {"method": p.method, "target_speedup": p.target_speedup, "predicted_speedup": p.predicted_speedup,
              "weights": weights, "select": select, "profile": {k: p.profile.get(k) for k in
              ("batch_size", "seq_len", "dtype", "mode")} | {"hardware": p.profile.get("hardware", {}).get("key")},
              "source": p.model, "origin": origin(model) or source_fp}     # the dense ancestor (gradual: not the source)
    save_portable(model, adapter, model_path, out_dir, {"planner": record})
    return Path(out_dir), model


def load(path, device="cpu"):
    """Load a (compressed or dense) checkpoint written by planner or Hugging Face."""
    return load_model(path, device=device)[0]


def verify(dense_path, compressed_path, cfg: VerifyConfig = VerifyConfig(), profile_path=None, out=None,
           dense_model=None, progress=True) -> VerifyReport:
    """Measure the compressed model against the dense one in the regime of its profile (or cfg.mode):
    interleaved speedup, the profile's prediction for its architecture, and quality on held-out text."""
    if out:
        io.check_out_file(out)
    hardware.set_threads(cfg.threads)
    dense = dense_model if dense_model is not None else load_model(dense_path, device=cfg.device)[0]
    comp, adapter = load_model(compressed_path, device=cfg.device)
    check_pair(comp, adapter, dense, adapter_for(dense), "pass the dense model it was made from first, then the "
               "compressed one", dense_fingerprint=fingerprint(dense_path) if origin(comp) else None)
    rec = dict(getattr(comp.config, "planner", None) or {})
    prof = LatencyProfile.load(profile_path) if profile_path else None
    mode = cfg.mode or (prof.mode if prof else None) or rec.get("profile", {}).get("mode") or "prefill"
    if prof is not None:
        check_profile(prof, adapter_for(dense).shape(dense), cfg.device, allow_other_machine=True)
        if prof.mode != mode:
            raise PlannerError(f"profile is for the {prof.mode} regime, verifying {mode}: pass a {mode} profile "
                               f"or --mode {prof.mode}")
        if (prof.batch_size, prof.seq_len) != (cfg.batch_size, cfg.seq_len):
            raise PlannerError(f"profile is for batch {prof.batch_size} x seq {prof.seq_len}, verifying at "
                               f"{cfg.batch_size} x {cfg.seq_len}: pass a profile of the same shape")
    n_pos = cfg.seq_len + (cfg.decode_steps if mode == "decode" else 0)
    adapter.check_positions(comp.config, n_pos, f"--seq-len {cfg.seq_len}" +
                            (f" with --decode-steps {cfg.decode_steps}" if mode == "decode" else ""))
    if adapter.causal_lm:
        adapter.check_positions(comp.config, cfg.ppl_window, f"--ppl-window {cfg.ppl_window}")
    sp = measure_speedup(dense, comp, adapter, cfg.batch_size, cfg.seq_len, cfg.reps, cfg.warmup, cfg.device,
                         progress=progress, mode=mode, decode_steps=cfg.decode_steps)
    cond = conditions(cfg.batch_size, cfg.seq_len, cfg.reps, cfg.device) | {"mode": mode}
    if mode == "decode":
        cond["decode_steps"] = cfg.decode_steps
    predicted = None
    if prof is not None:
        spec = [s.to_dict() for s in adapter.spec(comp)]
        predicted = prof.base["median"] / prof.predict(spec)
    else:
        pc = rec.get("profile", {})
        if pc.get("batch_size") == cfg.batch_size and pc.get("seq_len") == cfg.seq_len and \
                pc.get("hardware") == cond["key"] and pc.get("mode", "prefill") == mode:
            predicted = rec.get("predicted_speedup")
    texts = data.sample(data.read_lines(cfg.text_path, data.HELDOUT, "held-out text file"), cfg.n_text, seed=1)
    tok = load_tokenizer(compressed_path)
    if adapter.causal_lm:
        q = lm_quality(dense, comp, tok, texts, cfg.ppl_window, device=cfg.device, progress=progress)
    else:
        ed = embeddings(dense, adapter, tok, texts, device=cfg.device, progress=progress, desc="verify: dense quality")
        ec = embeddings(comp, adapter, tok, texts, device=cfg.device, progress=progress,
                        desc="verify: compressed quality")
        q = similarity_quality(ed, ec)
    q["n_text"] = len(texts)
    q.update({k: sp[k] for k in ("speedup_spread", "dense_tokens_per_s", "tokens_per_s") if k in sp})
    rep = VerifyReport(dense=str(dense_path), compressed=str(compressed_path), conditions=cond,
                       dense_time=sp["dense_time"], compressed_time=sp["compressed_time"],
                       measured_speedup=sp["speedup"], predicted_speedup=predicted,
                       prediction_ratio=(predicted / sp["speedup"]) if predicted else None,
                       quality=q, sizes={"dense_params": n_params(dense), "compressed_params": n_params(comp)},
                       created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), plan=rec)
    if out:
        rep.save(out)
    return rep


# ------------------------------------------------------------------------------- recovery and gradual mode

def _training_text(tokenizer, cfg, vocab_size: int, truncate: bool = True):
    """(passage token ids without special tokens, labels or None, special ids, vocabulary pool, text hash).
    truncate: cut each passage to one training sequence (encoders); causal LMs join passages into windows."""
    import re

    import numpy as np

    from .stages.distill import Special
    if cfg.data_path and Path(cfg.data_path).resolve() == data.shipped(data.HELDOUT).resolve():
        raise PlannerError("the training text is the shipped held-out text that verify scores on: "
                           "train on other text (default: the calibration corpus)")
    # default: the calibration corpus and the distillation corpus (1350 passages alone were seen 40-50 times in
    # a 10-minute run; with 3951 more, nearest-neighbour agreement at 2x went from 0.697 to 0.760)
    lines = data.read_lines(cfg.data_path, data.CALIBRATION, "training text file") + \
        (data.read_lines(None, data.DISTILL) if cfg.data_path is None else [])
    labels = None
    if cfg.task_weight:
        parts = [l.rsplit("\t", 1) for l in lines]
        if not all(len(p) == 2 and p[1].strip().lstrip("-").isdigit() for p in parts):
            raise PlannerError("--task-weight needs labelled data: every line 'text<TAB>integer label'")
        lines, labels = [p[0] for p in parts], [int(p[1]) for p in parts]
    enc = tokenizer(lines, add_special_tokens=False, truncation=truncate,
                    max_length=cfg.max_len - 2 if truncate else None)["input_ids"]
    data.check_ids([t for e in enc for t in e], vocab_size)
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if not truncate:                                   # causal LM: passages are joined by one separator token
        sep = data.separator(tokenizer)
        cls = sep if cls is None else cls
    if cls is None or sep is None:
        raise PlannerError("the tokenizer has no [CLS]/<s> and [SEP]/</s> tokens: cannot build training sequences")
    special = set(tokenizer.all_special_ids)
    # substitution pool: real pieces only (no special, [unused] or <...> placeholders), ids the model embeds
    pool = np.array(sorted(i for t, i in tokenizer.get_vocab().items()
                           if i < vocab_size and i not in special and not re.fullmatch(r"\[.*\]|<.*>", t)))
    return enc, labels, Special(cls, sep, pad), pool, io.sha256_text(*lines, *map(str, labels or []))


def _lm_training_windows(ids, tr, va, tok, pool, cfg):
    """Causal LMs: (training windows, fixed validation window batches). The passages on each side of the
    split are joined by EOS into one stream (as calibration and `verify` cut theirs) and cut into windows of
    --max-len tokens."""
    import numpy as np

    from .stages.distill import WindowData
    sep = data.separator(tok)

    def stream(idx):
        return np.array([t for i in idx for t in (*ids[i], sep)], dtype=np.int64)

    train = WindowData(stream(tr), cfg.max_len, cfg.batch_size, cfg.substitute, pool, cfg.seed)
    v = stream(va)
    n = len(v) // cfg.max_len
    if n < 1:
        raise PlannerError(f"the held-back passages ({len(va)}) give fewer than one window of {cfg.max_len} "
                           f"tokens: give more text, a larger --val-fraction or a smaller --max-len")
    w = torch.from_numpy(v[:n * cfg.max_len]).view(n, cfg.max_len)           # (n, max_len)
    val = [{"input_ids": w[s:s + cfg.batch_size], "attention_mask": torch.ones_like(w[s:s + cfg.batch_size]),
            "labels": None} for s in range(0, n, cfg.batch_size)]
    return train, val


def recover(compressed_path, teacher_path, cfg=None, out=None, progress=True, callback=None):
    """Distil the compressed model at `compressed_path` from the dense `teacher_path`; write the recovered model
    to `out` (a portable HF directory like `apply` writes, with `recover.json`). Returns a RecoverReport.

    Resumable: a checkpoint lives in `<out>.ckpt/` while training; rerunning the same call resumes from it,
    and a finished run (same models, data and settings) is returned without training again.
    """
    import shutil
    import time

    from .config import RecoverConfig
    from .stages.distill import DistillData, distill_, pad, split_passages
    from .types import RecoverReport
    cfg = cfg or RecoverConfig()
    t_start = time.perf_counter()
    if out is None:
        raise PlannerError("give an output directory (--out)")
    compressed_path, teacher_path, out = Path(compressed_path), Path(teacher_path), Path(out)
    if out.resolve() in (compressed_path.resolve(), teacher_path.resolve()):
        raise PlannerError("--out must be a new directory, not the compressed or the teacher model")
    io.check_out_dir(out, replaceable=is_planner_model)
    hardware.set_threads(cfg.threads)
    student, adapter = load_model(compressed_path, device=cfg.device)
    teacher, t_adapter = load_model(teacher_path, device=cfg.device)
    teacher_fp = fingerprint(teacher_path)
    check_pair(student, adapter, teacher, t_adapter, "distil a compressed model from the dense model it was "
               "made from (--teacher)", dense_fingerprint=teacher_fp)
    sk, tk = adapter.head_kind(student), t_adapter.head_kind(teacher)
    if sk != tk:
        raise PlannerError(f"student and teacher have different heads ({type(student).__name__} vs "
                           f"{type(teacher).__name__}): load both with the same head")
    adapter.check_positions(student.config, cfg.max_len, f"--max-len {cfg.max_len}")
    tok = load_tokenizer(compressed_path)
    ids, labels, special, pool, data_hash = _training_text(tok, cfg, adapter.shape(student).vocab,
                                                           truncate=not adapter.causal_lm)
    if cfg.task_weight and adapter.head_kind(student) != "sequence":
        raise PlannerError("--task-weight needs a sequence-classification head on the models")
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("threads", "ckpt_every", "device")}
    identity = {"student": fingerprint(compressed_path), "teacher": teacher_fp, "data": data_hash,
                "config": settings}
    if (out / "recover.json").exists() and (out / "config.json").exists():
        try:
            done = RecoverReport.load(out / "recover.json")
        except PlannerError:
            done = None
        if done is not None and done.identity == identity:
            return done                                              # finished before: not redone
    tr, va = split_passages(len(ids), cfg.val_fraction, cfg.seed)
    if adapter.causal_lm:
        train, val = _lm_training_windows(ids, tr, va, tok, pool, cfg)
    else:
        train = DistillData([ids[i] for i in tr], special, pool, cfg.batch_size, cfg.max_len, cfg.concat,
                            cfg.substitute, cfg.seed, [labels[i] for i in tr] if labels else None)
        val_ids = sorted(va, key=lambda i: len(ids[i]))              # length-sorted: little padding
        val = [pad([[special.cls, *ids[i], special.sep] for i in val_ids[s:s + cfg.batch_size]], special.pad,
                   [labels[i] for i in val_ids[s:s + cfg.batch_size]] if labels else None)
               for s in range(0, len(val_ids), cfg.batch_size)]
    spec = [s.to_dict() for s in adapter.spec(student)]
    ckpt = out.with_name(out.name + ".ckpt")
    ckpt.mkdir(parents=True, exist_ok=True)
    res = distill_(student, teacher, adapter, train, val, cfg, ckpt, identity, progress, callback)
    if [s.to_dict() for s in adapter.spec(student)] != spec:        # recovery only moves weights
        raise RuntimeError("recovery changed the architecture")     # pragma: no cover (a bug, not bad input)
    hist = res["history"]
    after = next(h for h in hist if h["step"] == res["best_step"])
    rec = dict(getattr(student.config, "planner", None) or {})
    rec["recover"] = {"teacher": {"path": str(teacher_path), "fingerprint": identity["teacher"]},
                      "student": {"path": str(compressed_path), "fingerprint": identity["student"]},
                      "steps": res["steps"], "train_time": res["train_time"], "stop": res["stop"],
                      "before": {k: v for k, v in hist[0].items() if k.startswith("val_")},
                      "after": {k: v for k, v in after.items() if k.startswith("val_")}}
    save_portable(student, adapter, compressed_path, out, {"planner": rec})
    report = RecoverReport(
        student=str(compressed_path), teacher=str(teacher_path), out=str(out), identity=identity,
        config=cfg.to_dict(), conditions=hardware.describe(cfg.device), steps=res["steps"],
        total_steps=res["total_steps"], stop=res["stop"], best_step=res["best_step"], train_time=res["train_time"],
        wall_time=time.perf_counter() - t_start, epochs=res["epochs"],
        data={"path": cfg.data_path, "hash": data_hash, "n_train": len(tr), "n_val": len(va)},
        before=rec["recover"]["before"], after=rec["recover"]["after"], history=hist, spec=spec,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    report.save(out / "recover.json")
    shutil.rmtree(ckpt, ignore_errors=True)                         # finished: the resume point is not needed
    return report


def apply_recover(model_path, plan_path_or_plan, out, recover_cfg=None, calib_path=None, weights=None,
                  progress=True):
    """`apply` then `recover` from `model_path` as the teacher: the one-shot model is kept in `<out>.ckpt/oneshot`
    while recovery runs (resumable like `recover`) and removed with the checkpoint at the end."""
    from .config import RecoverConfig
    from .types import RecoverReport
    out, recover_cfg = Path(out), recover_cfg or RecoverConfig()
    oneshot = out.with_name(out.name + ".ckpt") / "oneshot"
    if (out / "recover.json").exists() and not oneshot.exists():     # finished before (the one-shot is gone)
        try:
            done = RecoverReport.load(out / "recover.json")
        except PlannerError:
            done = None
        if done and done.student == str(oneshot) and done.config == recover_cfg.to_dict() and \
                done.identity.get("teacher") == fingerprint(model_path):
            return done
    if not (oneshot / "config.json").exists():
        apply(model_path, plan_path_or_plan, oneshot, calib_path=calib_path, weights=weights, progress=progress)
    return recover(oneshot, model_path, recover_cfg, out=out, progress=progress)


def compress(model_path, profile_path, out_dir, plan_cfg: PlanConfig, recover_cfg=None, verify_cfg=None,
             progress=True):
    """Gradual compression: one member per target, each planned, applied and recovered from the previous one
    (see planner/gradual.py). Returns the family table."""
    from .jobs.compress import compress as _compress
    return _compress(model_path, profile_path, out_dir, plan_cfg, recover_cfg, verify_cfg, progress)
