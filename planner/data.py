"""Text for calibration and evaluation: one passage per line; tokenised into padded batches."""
from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

import torch

from .errors import PlannerError

CALIBRATION = "calibration.txt"   # shipped, original text written for this project
CALIBRATION_TECH = "calibration_tech.txt"   # shipped, sentences of planner's dependencies' docstrings (API docs;
                                            # benchmarks/make_heldout_sets.py), no 5-word run shared with held-out text
# the default calibration text: both, so that it spans more than one register. Calibrated on the project's prose
# alone, the default encoder's 2x plan kept 0.69 Spearman on the worst outside set; on both, 0.78 (docs/results.md)
DEFAULT_CALIBRATION = (CALIBRATION, CALIBRATION_TECH)
HELDOUT = "heldout.txt"           # shipped, disjoint from the calibration text
# every shipped held-out set, by name: the project's own (written with the calibration text, same style) and two
# from sources the project did not write (benchmarks/make_heldout_sets.py; planner/data/SOURCES.md)
HELDOUT_SETS = {"heldout": HELDOUT, "docs": "heldout_docs.txt", "packages": "heldout_packages.txt"}
DISTILL = "distill.txt"           # shipped, more original passages for recovery (disjoint from HELDOUT, no shared
                                  # 5-word run)
DISTILL_TECH = "distill_tech.txt"  # shipped, more docstring sentences for recovery (disjoint from CALIBRATION_TECH)
# recovery's default training text: the default calibration text and both distillation files
DEFAULT_TRAINING = (*DEFAULT_CALIBRATION, DISTILL, DISTILL_TECH)


def shipped(name: str) -> Path:
    return Path(str(resources.files("planner") / "data" / name))


def read_lines(path: str | Path | None, default: str | tuple[str, ...] = DEFAULT_CALIBRATION,
               what: str = "text file") -> list[str]:
    """Non-empty stripped lines of `path` (or of the shipped corpus `default`: one file or several, in order)."""
    if not path and isinstance(default, tuple):
        return [line for name in default for line in read_lines(None, name, what)]
    p = Path(path) if path else shipped(default)
    if not p.exists():
        raise PlannerError(f"{what} not found: {p}")
    if p.is_dir():
        raise PlannerError(f"{what} {p} is a directory: pass a text file with one passage per line")
    try:
        lines = [l.strip() for l in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise PlannerError(f"{what} {p} is not UTF-8 text") from None
    lines = [l for l in lines if l]
    if not lines:
        raise PlannerError(f"{what} {p} is empty: give at least a few passages, one per line")
    return lines


def heldout_sets(text_path=None) -> dict[str, Path]:
    """{name: file} of the held-out text to score on: the user's file (named by its stem), or every shipped set."""
    if text_path:
        return {Path(text_path).stem: Path(text_path)}
    return {name: shipped(f) for name, f in HELDOUT_SETS.items() if shipped(f).exists()}


def sample(lines: list[str], n: int, seed: int = 0) -> list[str]:
    """The first n lines after a fixed shuffle (all of them if fewer)."""
    idx = list(range(len(lines)))
    random.Random(seed).shuffle(idx)
    return [lines[i] for i in idx[:n]]


def check_ids(ids, vocab: int | None) -> None:
    """Refuse token ids the model has no embedding for: the tokenizer and the model do not belong together
    (torch would stop with 'index out of range' deep inside the embedding)."""
    if vocab is None or ids is None or len(ids) == 0:
        return
    top = int(max(ids)) if not torch.is_tensor(ids) else int(ids.max())
    if top >= vocab:
        raise PlannerError(f"the tokenizer gives token id {top}, but the model has {vocab} embeddings (vocab_size): "
                           f"its tokenizer files do not belong to this model; put the model's own tokenizer next to it")


def separator(tokenizer) -> int:
    """The token between joined passages of a causal LM's token stream: EOS, else SEP, else BOS."""
    for name in ("eos_token_id", "sep_token_id", "bos_token_id"):
        t = getattr(tokenizer, name, None)
        if t is not None:
            return t
    raise PlannerError("the tokenizer has no EOS (nor SEP or BOS) token to mark where one passage ends and the next "
                       "begins: set \"eos_token\" in the model's tokenizer_config.json")


def batches(tokenizer, texts: list[str], batch_size: int, max_len: int, vocab: int | None = None) -> list[dict]:
    """Padded batches {input_ids, attention_mask} (B, T), sorted by length so padding stays small. With `vocab`,
    ids the model cannot embed are refused (check_ids)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for s in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[s:s + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        check_ids(enc["input_ids"], vocab)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "index": torch.tensor(order[s:s + batch_size])})
    return out


def latency_inputs(vocab: int, batch_size: int, seq_len: int, device="cpu", seed: int = 0) -> dict:
    """Fixed random token ids with a full mask: latency depends on shapes, not on which tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device)}


def token_windows(tokenizer, texts: list[str], window: int, vocab: int | None = None) -> torch.Tensor:
    """(N, window) token ids: the texts tokenised without special tokens, joined by the separator (EOS) and
    cut into consecutive windows; the incomplete tail is dropped. What causal LMs calibrate and are scored on:
    no padding, every position predicts the next token. With `vocab`, ids the model cannot embed are refused."""
    sep = [separator(tokenizer)]
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
    check_ids(ids, vocab)
    n = len(ids) // window
    if n == 0:
        raise PlannerError(f"the text has {len(ids)} tokens, fewer than one window of {window}: give more text")
    return torch.tensor(ids[:n * window], dtype=torch.long).view(n, window)


def window_batches(tokenizer, texts: list[str], window: int, batch_size: int, vocab: int | None = None) -> list[dict]:
    """Batches {input_ids, attention_mask, index} of token windows (see token_windows): the causal-LM
    counterpart of `batches`."""
    w = token_windows(tokenizer, texts, window, vocab)               # (N, window)
    return [{"input_ids": w[s:s + batch_size], "attention_mask": torch.ones_like(w[s:s + batch_size]),
             "index": torch.arange(s, min(s + batch_size, len(w)))} for s in range(0, len(w), batch_size)]


def token_coverage(tokenizer, reference: list[str], texts: list[str]) -> float:
    """Share of the tokens of `texts` (counted with repeats) whose token occurs anywhere in `reference`: a cheap
    measure of how far a held-out text is from the calibration text (the model's compression was fitted there)."""
    ref = {t for r in reference for t in tokenizer(r, add_special_tokens=False)["input_ids"]}
    ids = [t for x in texts for t in tokenizer(x, add_special_tokens=False)["input_ids"]]
    return sum(t in ref for t in ids) / max(len(ids), 1)
