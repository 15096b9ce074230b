"""The recover stage: distil a compressed checkpoint from its dense teacher (ZipLM's token-level distillation;
the losses, data and loop are in distill.py), and `apply --recover`.

Training text: the shipped calibration and distillation corpora by default, never the held-out text verify
scores on. Encoders train on passages (and variants made from them), causal LMs on token windows cut from the
passages joined by the tokenizer's separator.
"""
from __future__ import annotations

import datetime as _dt
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .. import data, hardware, io
from ..adapters.checkpoint import Checkpoint, check_pair, is_planner_model, save_portable
from ..config import ApplyConfig, RecoverConfig
from ..errors import PlannerError
from ..types import Plan, RecoverReport
from .apply import apply
from .distill import DistillData, Special, WindowData, distill_, pad, split_passages


def _training_text(tokenizer, cfg, vocab_size: int, truncate: bool = True):
    """(passage token ids without special tokens, labels or None, special ids, vocabulary pool, text hash).
    truncate: cut each passage to one training sequence (encoders); causal LMs join passages into windows."""
    if cfg.data_path and Path(cfg.data_path).resolve() in {p.resolve() for p in data.heldout_sets().values()}:
        raise PlannerError("the training text is a shipped held-out set that verify scores on: "
                           "train on other text (default: the shipped calibration and distillation text)")
    lines, labels = _lines(cfg)
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
    return enc, labels, Special(cls, sep, pad), pool, _text_hash(lines, labels)


def _lines(cfg) -> tuple[list[str], list[int] | None]:
    """(training passages, their labels or None) as read from --data or the shipped default."""
    # default: the calibration text and the distillation text, prose and docstrings (1350 passages alone were seen
    # 40-50 times in a 10-minute run; with 3951 more, nearest-neighbour agreement at 2x went from 0.697 to 0.760)
    lines = data.read_lines(cfg.data_path, data.DEFAULT_TRAINING, "training text file")
    labels = None
    if cfg.task_weight:
        parts = [l.rsplit("\t", 1) for l in lines]
        if not all(len(p) == 2 and p[1].strip().lstrip("-").isdigit() for p in parts):
            raise PlannerError("--task-weight needs labelled data: every line 'text<TAB>integer label'")
        lines, labels = [p[0] for p in parts], [int(p[1]) for p in parts]
    return lines, labels


def _text_hash(lines, labels) -> str:
    return io.sha256_text(*lines, *map(str, labels or []))


def _identity(student_ck: Checkpoint, teacher_ck: Checkpoint, cfg: RecoverConfig, data_hash: str) -> dict:
    """What a finished recovery is matched on: both models, the training text and the settings that change the
    result (not threads, checkpoint cadence or device)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("threads", "ckpt_every", "device")}
    return {"student": student_ck.fingerprint, "teacher": teacher_ck.fingerprint, "data": data_hash,
            "config": settings}


def finished(student_ck: Checkpoint, teacher_ck: Checkpoint, cfg: RecoverConfig, out) -> RecoverReport | None:
    """The report of a recovery of these models with this text and these settings already written to `out`,
    or None: a finished run is returned without training again."""
    out = Path(out)
    if not ((out / "recover.json").exists() and (out / "config.json").exists()):
        return None                                                  # nothing written: no text read, no hash
    return _done(out, _identity(student_ck, teacher_ck, cfg, _text_hash(*_lines(cfg))))


def _done(out: Path, identity: dict) -> RecoverReport | None:
    """`out`'s report where it was written by a finished run of this identity, else None."""
    try:
        done = RecoverReport.load(out / "recover.json") if (out / "config.json").exists() else None
    except PlannerError:                                             # missing or damaged: not finished
        return None
    return done if done is not None and done.identity == identity else None


def _lm_training_windows(ids, tr, va, tok, pool, cfg):
    """Causal LMs: (training windows, fixed validation window batches). The passages on each side of the
    split are joined by EOS into one stream (as calibration and `verify` cut theirs) and cut into windows of
    --max-len tokens."""
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


def recover(student_ck: Checkpoint, teacher_ck: Checkpoint, cfg: RecoverConfig = RecoverConfig(), out=None,
            progress: bool = True, callback=None) -> RecoverReport:
    """Distil the compressed checkpoint from its dense teacher; write the recovered model to `out` (a portable
    HF directory like `apply` writes, with `recover.json`). Returns a RecoverReport.

    Resumable: a checkpoint lives in `<out>.ckpt/` while training; rerunning the same call resumes from it,
    and a finished run (same models, data and settings) is returned without training again. The thread count
    is set for the call and restored after it.
    """
    t_start = time.perf_counter()
    hardware.check_device(cfg.device)
    if out is None:
        raise PlannerError("give an output directory (--out)")
    out = Path(out)
    if out.resolve() in (student_ck.path.resolve(), teacher_ck.path.resolve()):
        raise PlannerError("--out must be a new directory, not the compressed or the teacher model")
    io.check_out_dir(out, replaceable=is_planner_model)
    check_pair(student_ck, teacher_ck, "distil a compressed model from the dense model it was made from (--teacher)")
    student_ck.check_positions(cfg.max_len, f"--max-len {cfg.max_len}")
    with hardware.threads(cfg.threads):
        return _recover(student_ck, teacher_ck, cfg, out, progress, callback, t_start)


def _recover(student_ck, teacher_ck, cfg, out, progress, callback, t_start):
    compressed_path, teacher_path = student_ck.path, teacher_ck.path
    adapter, tok = student_ck.adapter, student_ck.tokenizer
    ids, labels, special, pool, data_hash = _training_text(tok, cfg, student_ck.shape.vocab,
                                                           truncate=not adapter.causal_lm)
    student, teacher = student_ck.load(cfg.device), teacher_ck.load(cfg.device)
    sk, tk = adapter.head_kind(student), teacher_ck.adapter.head_kind(teacher)
    if sk != tk:
        raise PlannerError(f"student and teacher have different heads ({type(student).__name__} vs "
                           f"{type(teacher).__name__}): load both with the same head")
    if cfg.task_weight and sk != "sequence":
        raise PlannerError("--task-weight needs a sequence-classification head on the models")
    identity = _identity(student_ck, teacher_ck, cfg, data_hash)
    if (done := _done(out, identity)) is not None:
        return done                                                  # finished before: not redone
    tr, va = split_passages(len(ids), cfg.val_fraction, cfg.seed)
    if adapter.causal_lm:
        train, val = _lm_training_windows(ids, tr, va, tok, pool, cfg)
    else:
        train = DistillData([ids[i] for i in tr], special, pool, cfg.batch_size, cfg.max_len, cfg.concat,
                            cfg.substitute, cfg.seed, [labels[i] for i in tr] if labels else None,
                            plain_epochs=cfg.plain_epochs)
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


def apply_recover(ck: Checkpoint, p: Plan, out, recover_cfg: RecoverConfig = RecoverConfig(), calib_path=None,
                  weights=None, progress: bool = True, apply_cfg: ApplyConfig = ApplyConfig()) -> RecoverReport:
    """`apply` then `recover` with `ck` as the teacher: the one-shot model is kept in `<out>.ckpt/oneshot` while
    recovery runs (resumable like `recover`) and removed with the checkpoint at the end."""
    out = Path(out)
    hardware.check_device(apply_cfg.device)
    hardware.check_device(recover_cfg.device, "--recover-device")
    io.check_out_dir(out, replaceable=is_planner_model, protect=(ck.path,))
    oneshot = out.with_name(out.name + ".ckpt") / "oneshot"
    if (out / "recover.json").exists() and not oneshot.exists():     # finished before (the one-shot is gone)
        try:
            done = RecoverReport.load(out / "recover.json")
        except PlannerError:
            done = None
        if done and done.student == str(oneshot) and done.config == recover_cfg.to_dict() and \
                done.identity.get("teacher") == ck.fingerprint:
            return done
    if not (oneshot / "config.json").exists():
        apply(ck, p, oneshot, calib_path=calib_path, weights=weights, progress=progress, cfg=apply_cfg)
    return recover(Checkpoint.open(oneshot), ck, recover_cfg, out=out, progress=progress)


def _recover_paths(student_path: str, teacher_path: str, cfg: RecoverConfig, out: str, progress: bool):
    """`recover` by paths: what a child process runs (models and tokenizers are opened there)."""
    return recover(Checkpoint.open(student_path), Checkpoint.open(teacher_path), cfg, out=out, progress=progress)


class Apart:
    """Recovery in a spawned child process, one reused for every call, for jobs that time models in this process
    afterwards. A process that has trained times models slower: the same one-shot 3x weights measured 3.13x
    against the dense model before a 1-minute recovery in the process and 2.93x after it (3.14x with the recovery
    in a child), and the main job's recovered models verified at 0.93-0.98x of their own fresh-process timing
    (runs/main-v9, docs/results.md). Use as a context manager; the child is started by the first call.
    Errors come back as raised in the child: a PlannerError stays one line."""

    def __init__(self):
        self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if self._pool is None:
            return
        if exc_type is not None:      # interrupted or failed: the child is not waited for (recovery resumes)
            for p in list((getattr(self._pool, "_processes", None) or {}).values()):
                p.terminate()
        self._pool.shutdown(wait=exc_type is None, cancel_futures=True)

    def recover(self, student_path, teacher_path, cfg: RecoverConfig, out, progress: bool = True) -> RecoverReport:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        if (done := finished(Checkpoint.open(student_path), Checkpoint.open(teacher_path), cfg, out)) is not None:
            return done               # a resumed job whose recovery finished: no child is started for it
        if self._pool is None:        # spawn, not fork: a fresh interpreter, not a copy of this process's heap
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._pool.submit(_recover_paths, str(student_path), str(teacher_path), cfg, str(out),
                                     progress).result()
        except BrokenProcessPool:
            raise PlannerError(f"the recovery process for {out} ended without a result (out of memory?): run "
                               f"again to resume from its checkpoint, or lower --recover-minutes") from None
