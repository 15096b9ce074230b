"""Recovery by distillation (ZipLM, DESIGN §5): teach the compressed student to reproduce its dense teacher.

Losses (pure tensor functions; they know no model):
  hidden      token-level: every block's output of the student against the teacher's, on every real token,
              relative to the teacher's energy, averaged over blocks. Possible because compression keeps the
              hidden size and every block slot (a removed module leaves its residual path).
  logit       KL(teacher ‖ student) of the head's softmax at temperature T, times T² (Hinton): per sequence
              for classification heads, per token for token / masked-LM heads.
  embed       bare encoders have no head; what users consume is the pooled sentence embedding, so it takes
              the head's place: the cosine distance between the student's and the teacher's embedding of each
              passage. (A KL between in-batch similarity distributions, the contrastive analogue of logit KD,
              was tried, also with batches of nearest-neighbour passages: it destabilised training at useful
              learning rates and made held-out quality worse.)
  task        cross-entropy on labels, where the data gives them.

Training data (`DistillData`): the passages as they are for the first `plain_epochs` epochs, then also new
sequences made from them (two passages joined; a share of tokens swapped for random vocabulary pieces).
Token-level distillation needs no labels, so any input the teacher can be run on is a training example; the
variants show the student token contexts and vocabulary that a small corpus lacks, once its passages repeat.
Causal LMs (`WindowData`) train on fixed token windows cut from the joined text, as they calibrate and are
scored, from a new offset every epoch. Every micro-batch is a pure function of (seed,
its index), so the data position of a resumed run is just its step.

The loop (`distill_`): AdamW (no decay on biases and norms), linear warm-up then linear decay over a fixed
number of steps or over a time budget (the step count refitted to the pace after every step), gradient
accumulation, clipping, bf16 autocast where bf16 is native (GPU, recent CPUs), evaluation in float32 on
held-back passages every `eval_every` steps
(the best evaluation's weights are the result; `patience` stops early), and a checkpoint (weights,
optimizer, step, best weights, history, RNG) written atomically every `ckpt_every` steps, from which
rerunning resumes bit for bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import hardware, io, timing
from ..config import RecoverConfig
from ..errors import PlannerError
from ..progress import bar as progress_bar

CKPT_FILE = "state.pt"
CKPT_VERSION = 1


# ---------------------------------------------------------------------------------------------- losses

def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over blocks of Σ‖h_s − h_t‖² / Σ‖h_t‖² over real tokens. Each h (B, T, d); mask (B, T) bool.
    Exactly 0 when the student equals the teacher."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s[mask].float(), t[mask].float()                     # (tokens, d)
        losses.append(((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · mean over rows of KL(softmax(z_t/T) ‖ softmax(z_s/T)). z (..., C); mask selects rows (e.g. real
    tokens of (B, T, C) token logits)."""
    if mask is not None:
        student, teacher = student[mask], teacher[mask]             # (rows, C)
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / temperature, -1)
    t = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def embed_loss(e_student: torch.Tensor, e_teacher: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between each passage's student and teacher sentence embedding. e (B, d), rows
    L2-normalised."""
    return (1 - (e_student.float() * e_teacher.float()).sum(-1)).mean()


def losses(s_out: dict, t_out: dict, mask: torch.Tensor, cfg: RecoverConfig,
           labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted terms that apply to this model and batch; "total" is their sum. Outputs as returned by
    `adapter.distill_outputs`; mask (B, T) bool real tokens; labels (B,) with -100 where there is none."""
    out = {}
    if cfg.hidden_weight:
        out["hidden"] = hidden_loss(s_out["hidden"], t_out["hidden"], mask)
    if cfg.logit_weight and s_out["logits"] is not None:
        tok = mask if s_out["head"] == "token" else None
        out["logit"] = logit_kl(s_out["logits"], t_out["logits"], cfg.temperature, tok)
    if cfg.embed_weight and s_out["embedding"] is not None:
        out["embed"] = embed_loss(s_out["embedding"], t_out["embedding"])
    if cfg.task_weight and labels is not None and s_out["head"] == "sequence" and bool((labels >= 0).any()):
        out["task"] = F.cross_entropy(s_out["logits"].float(), labels, ignore_index=-100)
    w = {"hidden": cfg.hidden_weight, "logit": cfg.logit_weight, "embed": cfg.embed_weight, "task": cfg.task_weight}
    out["total"] = sum(w[k] * v for k, v in out.items())
    return out


# ------------------------------------------------------------------------------------------------ data

@dataclass(frozen=True)
class Special:
    cls: int
    sep: int
    pad: int


class DistillData:
    """Training micro-batches as a pure function of (seed, index m).

    Epoch e = m // n_per_epoch visits the passages in a permutation drawn from (seed, e). In the first
    `plain_epochs` epochs every sequence is its passage as it is; after them each sequence is, with probability
    `concat`, its passage joined with a random other one, and a share `substitute` of its tokens is replaced by
    random pieces of `vocab` (ids the tokenizer can produce). The variants are there to make passages that
    repeat many times new (a small corpus, a long run); until then they only move the inputs away from the
    text: 10 minutes on the default encoder's 2x model (5.2 epochs of the shipped training text) kept 0.859
    worst-set Spearman with every sequence plain, 0.851 with variants from the start. Sequences are made `chunk`
    batches at a time, sorted by length and cut into batches (in shuffled order), so that padding stays small.
    Labels (when given) are kept only on sequences left as they were; the others get -100.
    """

    def __init__(self, ids: list[list[int]], special: Special, vocab: np.ndarray, batch_size: int, max_len: int,
                 concat: float, substitute: float, seed: int, labels: list[int] | None = None, chunk: int = 16,
                 plain_epochs: int = 0):
        if not ids:
            raise PlannerError("no training passages: give a text file with at least a few passages, one per line")
        self.ids, self.labels, self.special, self.vocab = ids, labels, special, vocab
        self.batch_size, self.max_len, self.concat, self.substitute, self.seed = \
            batch_size, max_len, concat, substitute, seed
        self.chunk, self.plain_epochs = chunk, plain_epochs
        self.n_per_epoch = math.ceil(len(ids) / batch_size)
        self._cache: tuple[tuple[int, int], list[dict]] | None = None

    def _sequence(self, i: int, rng: np.random.Generator, vary: bool) -> tuple[list[int], int]:
        toks, plain = list(self.ids[i]), True
        if vary and self.concat and rng.random() < self.concat:
            toks += self.ids[int(rng.integers(len(self.ids)))]
            plain = False
        toks = np.asarray(toks[:self.max_len - 2], dtype=np.int64)
        if vary and self.substitute and len(toks):
            swap = rng.random(len(toks)) < self.substitute
            if swap.any():
                toks[swap] = self.vocab[rng.integers(len(self.vocab), size=int(swap.sum()))]
                plain = False
        label = self.labels[i] if self.labels is not None and plain else -100
        return [self.special.cls, *toks.tolist(), self.special.sep], label

    def _chunk(self, e: int, c: int) -> list[dict]:
        order = np.random.default_rng([self.seed, e]).permutation(len(self.ids))
        per = self.chunk * self.batch_size
        idx = order[c * per:(c + 1) * per]
        rng = np.random.default_rng([self.seed, e, c, 1])
        made = [self._sequence(int(i), rng, e >= self.plain_epochs) for i in idx]
        made.sort(key=lambda x: len(x[0]))                           # stable: ties keep the permutation's order
        batches = [made[s:s + self.batch_size] for s in range(0, len(made), self.batch_size)]
        batches = [batches[k] for k in rng.permutation(len(batches))]
        return [pad([s for s, _ in b], self.special.pad, [l for _, l in b] if self.labels is not None else None)
                for b in batches]

    def batch(self, m: int) -> dict:
        e, b = divmod(m, self.n_per_epoch)
        c, j = divmod(b, self.chunk)
        if self._cache is None or self._cache[0] != (e, c):
            self._cache = ((e, c), self._chunk(e, c))
        return self._cache[1][j]


class WindowData:
    """Causal-LM training micro-batches as a pure function of (seed, index m): fixed windows of `window` tokens
    cut from one token stream (the passages joined by EOS, as `data.token_windows` does for calibration).

    Epoch e cuts the stream from an offset drawn from (seed, e), so every epoch sees other window boundaries,
    and visits the windows in a permutation drawn from (seed, e); a share `substitute` of the tokens is
    replaced by random pieces of `vocab` (the teacher's predictions on any context are a valid target).
    No padding: every position is a real token and predicts the next one.
    """

    def __init__(self, stream: np.ndarray, window: int, batch_size: int, substitute: float, vocab: np.ndarray,
                 seed: int):
        self.stream, self.window, self.batch_size = np.asarray(stream, dtype=np.int64), window, batch_size
        self.n_windows = (len(self.stream) - window) // window          # whole windows from any offset < window
        if self.n_windows < 1:
            raise PlannerError(f"the training text has {len(self.stream)} tokens, fewer than two windows of "
                               f"{window}: give more text or a smaller --max-len")
        self.substitute, self.vocab, self.seed = substitute, vocab, seed
        self.n_per_epoch = math.ceil(self.n_windows / batch_size)

    def batch(self, m: int) -> dict:
        e, b = divmod(m, self.n_per_epoch)
        rng = np.random.default_rng([self.seed, e])
        offset = int(rng.integers(self.window))
        idx = rng.permutation(self.n_windows)[b * self.batch_size:(b + 1) * self.batch_size]     # (B,)
        starts = offset + idx * self.window
        ids = self.stream[starts[:, None] + np.arange(self.window)[None, :]]                     # (B, window)
        if self.substitute:
            r = np.random.default_rng([self.seed, e, b, 1])
            swap = r.random(ids.shape) < self.substitute
            ids[swap] = self.vocab[r.integers(len(self.vocab), size=int(swap.sum()))]
        ids = torch.from_numpy(ids)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": None}


def pad(seqs: list[list[int]], pad_id: int, labels: list[int] | None = None) -> dict:
    """{input_ids (B, T), attention_mask (B, T), labels (B,) or None} right-padded to the longest sequence."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor(labels, dtype=torch.long) if labels is not None else None}


def split_passages(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) passage indices: a fixed random share held back, at least one each side."""
    if n < 2:
        raise PlannerError(f"recovery needs at least 2 passages (one to train on, one to evaluate), got {n}")
    perm = np.random.default_rng([seed, 12345]).permutation(n)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ------------------------------------------------------------------------------------------------ loop

def sparse_linears(model, adapter) -> list[torch.nn.Linear]:
    """The linears of every module the plan made sparse (their zeros are part of the architecture)."""
    out = []
    for layer, spec in zip(adapter.layers(model), adapter.spec(model)):
        for kind in ("attn", "ffn"):
            if getattr(spec, f"{kind}_sparsity", 0.0) > 0:
                out += [getattr(parent, name) for parent, name in adapter.linear_slots(layer, kind)]
    return out


def lr_at(step: int, total: int, cfg: RecoverConfig) -> float:
    """Linear warm-up over the first `warmup` share of the steps, then linear decay to 0 at `total`."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def _param_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices only; biases and norm scales are not shrunk towards 0."""
    decay = [p for n, p in params if p.ndim >= 2]
    rest = [p for n, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class _Clock:
    """Training time: runs only while started (callbacks, checkpoint writes and loading are not counted)."""

    def __init__(self, elapsed: float = 0.0):
        self.elapsed, self._t0 = elapsed, None

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self):
        if self._t0 is not None:
            self.elapsed += time.perf_counter() - self._t0
            self._t0 = None

    def now(self) -> float:
        return self.elapsed + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)


def load_checkpoint(ckpt_dir: Path, identity: dict) -> dict | None:
    """The saved state if `ckpt_dir` holds one for the same run, None if there is none."""
    p = Path(ckpt_dir) / CKPT_FILE
    if not p.exists():
        return None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PlannerError(f"recovery checkpoint {p} is corrupted ({type(e).__name__}): delete {ckpt_dir} "
                           f"to start over") from None
    if not isinstance(state, dict) or state.get("version") != CKPT_VERSION or "student" not in state:
        raise PlannerError(f"recovery checkpoint {p} is not one this planner wrote: delete {ckpt_dir} to start over")
    if state.get("identity") != identity:
        raise PlannerError(f"recovery checkpoint {ckpt_dir} belongs to another run (other models, data or "
                           f"settings): rerun the same command to resume it, or delete it to start over")
    return state


def _save_checkpoint(ckpt_dir: Path, state: dict) -> None:
    with io.atomic_path(Path(ckpt_dir) / CKPT_FILE) as tmp:
        torch.save(state, tmp)


def distill_(student, teacher, adapter, data: DistillData, val: list[dict], cfg: RecoverConfig, ckpt_dir,
             identity: dict, progress: bool = True,
             callback: Callable[[dict, torch.nn.Module], None] | None = None) -> dict:
    """Train `student` in place towards `teacher`; returns the run's record (steps, stop reason, history).

    `val`: fixed batches of held-back passages. `callback(event, student)` runs after every evaluation
    (event = the history row) with the clock stopped; raising KeyboardInterrupt from it interrupts the run
    as Ctrl-C would. Rerunning with the same `ckpt_dir` and `identity` resumes from the last checkpoint.
    """
    timing.mark_trained()                                            # verify in this process warns afterwards
    dev = torch.device(cfg.device)
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and hardware.fast_bf16(dev.type))
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16)     # training passes only
    teacher.eval().requires_grad_(False)
    frozen = {id(p) for p in adapter.embedding_parameters(student)} if cfg.freeze_embeddings else set()
    named = [(n, p) for n, p in student.named_parameters() if id(p) not in frozen]
    for n, p in student.named_parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = torch.optim.AdamW(_param_groups(named, cfg.weight_decay), lr=cfg.lr)
    trainable = [p for _, p in named]
    sparse = sparse_linears(student, adapter)
    masks = [lin.weight != 0 for lin in sparse]                      # sparse modules stay exactly as sparse

    def train_mode():
        student.train(cfg.dropout)                                   # no dropout: a short run wants the exact objective
        for lin in sparse:
            lin.train()                                              # their dense path (the CSR one has no autograd)

    train_mode()

    with torch.no_grad():                                            # the teacher never changes: score it once
        t_val = [adapter.distill_outputs(teacher, b["input_ids"].to(dev), b["attention_mask"].to(dev)) for b in val]

    def evaluate() -> dict:
        """Losses and (bare encoders) embedding agreement on the held-back passages, in float32 as the saved
        model will run."""
        student.eval()
        sums, n, n_tok, es, et = {}, 0, 0, [], []
        with torch.no_grad():
            for b, t_out in zip(val, t_val):
                b = _to(b, dev)
                s_out = adapter.distill_outputs(student, b["input_ids"], b["attention_mask"])
                for k, v in losses(s_out, t_out, b["attention_mask"].bool(), cfg, b.get("labels")).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(b["input_ids"])
                n += len(b["input_ids"])
                if adapter.causal_lm and s_out["logits"] is not None:     # next-token NLL of the student
                    ce = F.cross_entropy(s_out["logits"][:, :-1].float().flatten(0, 1), b["input_ids"][:, 1:].flatten(),
                                         reduction="sum")
                    sums["nll"] = sums.get("nll", 0.0) + float(ce)
                    n_tok += b["input_ids"][:, 1:].numel()
                if s_out["embedding"] is not None:
                    es.append(s_out["embedding"].float().cpu())
                    et.append(t_out["embedding"].float().cpu())
        train_mode()
        nll = sums.pop("nll", None)
        row = {f"val_{k}": v / n for k, v in sums.items()}
        if nll is not None:
            row["val_ppl"] = math.exp(nll / n_tok)
        if es:
            from .verify import similarity_quality
            row.update({f"val_{k}": v for k, v in similarity_quality(torch.cat(et), torch.cat(es)).items()})
        return row

    def micro_step(m: int) -> dict[str, float]:
        b = _to(data.batch(m), dev)
        mask = b["attention_mask"].bool()
        with torch.autocast(**amp):
            with torch.no_grad():
                t_out = adapter.distill_outputs(teacher, b["input_ids"], b["attention_mask"])
            s_out = adapter.distill_outputs(student, b["input_ids"], b["attention_mask"])
            ls = losses(s_out, t_out, mask, cfg, b.get("labels"))
        (ls["total"] / cfg.grad_accum).backward()
        return {k: float(v.detach()) for k, v in ls.items()}

    state = load_checkpoint(ckpt_dir, identity)
    if state is not None:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:      # dropout on the GPU draws from it
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        step, total, history, best = state["step"], state["total"], state["history"], state["best"]
        clock, stop, bad = _Clock(state["elapsed"]), state.get("stop"), state["bad_evals"]
    else:
        step, total, history, best, clock, stop, bad = 0, cfg.steps, [], None, _Clock(), None, 0
    resumed_at = step
    budget = cfg.minutes * 60 if cfg.minutes else None

    def record_eval(row):
        nonlocal best, bad
        history.append(row)
        # patience counts evaluations that did not improve on the best by min_delta (relative): a loss that only
        # creeps down is not worth the clock; the best weights are kept whatever the margin
        improved = best is None or row["val_total"] < best["val_total"] * (1 - cfg.min_delta)
        if best is None or row["val_total"] < best["val_total"] - 1e-12:
            best = {"step": row["step"], "val_total": row["val_total"],
                    "state": {n: p.detach().cpu().clone() for n, p in named}}
        bad = 0 if improved else bad + 1
        if callback is not None:
            clock.stop()
            callback(row, student)
            clock.start()

    clock.start()
    t_eval = 0.0                                                     # the last evaluation's seconds
    if step == 0 and not history:                                    # the one-shot student's numbers
        t0 = time.perf_counter()
        row = {"step": 0, "elapsed": 0.0, "lr": 0.0, **evaluate()}
        t_eval = time.perf_counter() - t0
        if total is None:
            # Time budget: time a few forward/backward passes (no update; grads dropped) for a first estimate of
            # the step count; it is refitted to the pace after every step. (With --steps nothing depends on
            # timings, and a resumed run repeats an uninterrupted one bit for bit.)
            micro_step(0)
            t1 = time.perf_counter()
            for m in range(1, 5):
                micro_step(m)
            opt.zero_grad(set_to_none=True)
            t_step = (time.perf_counter() - t1) / 4 * cfg.grad_accum * 1.05    # + optimizer update
            left = budget - clock.now()
            total = max(1, int(left / (t_step + t_eval / cfg.eval_every)))
        record_eval(row)

    bar = progress_bar(total=total, initial=step, desc="recover", unit="step", progress=progress)
    run = {}
    mark = (clock.now(), step)                                       # where this session's pace is measured from
    try:
        while step < total and stop is None:
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            parts: dict[str, float] = {}
            for a in range(cfg.grad_accum):
                for k, v in micro_step(step * cfg.grad_accum + a).items():
                    parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for lin, mask in zip(sparse, masks):
                    lin.weight.mul_(mask)                            # weight decay and momentum never refill zeros
            step += 1
            for k, v in parts.items():                               # running (exponential) averages for the bar
                run[k] = v if k not in run else 0.95 * run[k] + 0.05 * v
            if cfg.steps is None:
                # Time budget: re-fit the step count to the pace so far (evaluations included), keeping the
                # final evaluation's time, so that the learning rate reaches 0 as the budget ends: neither cut
                # off mid-decay nor annealed early (planned from the first estimate alone, until the first
                # evaluation, 1-minute runs of the default encoder stopped at 49-54 s of their 60).
                pace = (clock.now() - mark[0]) / (step - mark[1])              # seconds per step
                total = step + max(0, int((budget - clock.now() - t_eval) / pace))     # = step: done
                bar.total = total
            bar.update()
            bar.set_postfix({k: f"{v:.4f}" for k, v in run.items()}, refresh=False)
            if step % cfg.eval_every == 0 or step == total:
                t0 = time.perf_counter()
                row = {"step": step, "elapsed": clock.now(), "lr": lr, **{f"train_{k}": v for k, v in run.items()},
                       **evaluate()}
                t_eval = time.perf_counter() - t0
                record_eval(row)
                bar.set_postfix({**{k: f"{v:.4f}" for k, v in run.items()}, "val": f"{row['val_total']:.4f}"})
                if cfg.patience and bad >= cfg.patience:
                    stop = "early-stop"
            if budget is not None and clock.now() >= budget and step < total and stop is None:
                stop = "time-budget"
            if step % cfg.ckpt_every == 0 or stop is not None or step == total:
                clock.stop()
                _save_checkpoint(ckpt_dir, {
                    "version": CKPT_VERSION, "identity": identity, "step": step, "total": total,
                    "elapsed": clock.elapsed, "student": student.state_dict(), "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                    "history": history, "best": best, "bad_evals": bad, "stop": stop})
                clock.start()
    finally:
        clock.stop()
        bar.close()
    if history[-1]["step"] != step:                                  # stopped by the clock between evaluations
        clock.start()
        record_eval({"step": step, "elapsed": clock.now(), "lr": lr_at(step - 1, total, cfg),
                     **{f"train_{k}": v for k, v in run.items()}, **evaluate()})
        clock.stop()
    with torch.no_grad():                                            # the result: the best evaluated weights
        params = dict(named)
        for n, v in best["state"].items():
            params[n].copy_(v)
    student.eval().requires_grad_(False)
    return {"steps": step, "total_steps": total, "stop": stop or "schedule", "train_time": clock.elapsed,
            "best_step": best["step"], "resumed_at": resumed_at, "history": history,
            "micro_batches": step * cfg.grad_accum, "epochs": step * cfg.grad_accum / data.n_per_epoch}
