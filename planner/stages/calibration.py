"""The calibration loop, written once: capture the first block's inputs, then run block by block.

Running block by block (SparseGPT's pattern) lets the database and the sequential re-fit see each
block's inputs without keeping more than one block's activations, and lets a compressed and a dense
copy of the model be driven side by side on the same tokens.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .. import data, io


def calibration_batches(ck, calib_path, n: int, max_len: int, batch_size: int,
                        default: tuple[str, ...] = data.DEFAULT_CALIBRATION) -> tuple[list[dict], str]:
    """(batches, hash): n passages of the calibration text (`calib_path`, else the shipped files `default`) as
    padded batches (encoders) or, for causal LMs, cut into token windows of max_len (no padding), and a hash
    identifying them. `ck`: the Checkpoint whose tokenizer and vocabulary they are made for."""
    texts = data.sample(data.read_lines(calib_path, tuple(default), "calibration file"), n)
    tok, vocab = ck.tokenizer, ck.config.get("vocab_size")
    if ck.causal_lm:
        return (data.window_batches(tok, texts, max_len, batch_size, vocab),
                io.sha256_text(*texts, str(max_len), str(batch_size), "windows"))
    return (data.batches(tok, texts, batch_size, max_len, vocab),
            io.sha256_text(*texts, str(max_len), str(batch_size)))


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """Everything a block needs to run on each calibration batch."""
    hidden: list[torch.Tensor]      # per batch (B, T, d)
    args: list[tuple]               # positional arguments after hidden_states (e.g. the attention mask)
    kwargs: list[dict]              # keyword arguments the model passed to the block
    masks: list[torch.Tensor]       # per batch (B, T) bool: real tokens (padding is excluded from statistics)

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return BlockInputs(hidden, self.args, self.kwargs, self.masks)

    @property
    def n_tokens(self) -> int:
        return int(sum(m.sum() for m in self.masks))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[dict], device="cpu",
                         forward_kwargs: dict | None = None) -> BlockInputs:
    """Run the model up to its first block on every batch and keep that block's inputs.
    `forward_kwargs`: the adapter's extra arguments (decoders: use_cache=False, so that running a block
    repeatedly on the captured inputs never appends to a KV cache)."""
    hidden, args, kwargs, masks = [], [], [], []

    def hook(module, a, kw):
        hidden.append(a[0] if a else kw.pop("hidden_states"))
        args.append(tuple(a[1:]))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            masks.append(b["attention_mask"].bool().to(device))
            try:
                model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                      **(forward_kwargs or {}))
            except _Stop:
                pass
    finally:
        h.remove()
    return BlockInputs(hidden, args, kwargs, masks)


def real_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of `x` at real tokens, (tokens, d). x: (B, T, d), or (B*T, d) where a layer flattens the tokens
    (transformers' OPT runs its FFN on (B*T, d)); mask: (B, T) bool, True = real token."""
    if x.shape[:-1].numel() != mask.numel():
        raise ValueError(f"activation {tuple(x.shape)} does not line up with the token mask {tuple(mask.shape)}")
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1).to(x.device)]


def to_device(obj, device):
    """`obj` with every tensor inside it (nested tuples, lists, dicts) on `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def block_call(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The block's output (B, T, d) on one captured batch. The block runs on its own device: with offloading
    only the block being processed is on the accelerator, the captured activations stay where they are and
    the output comes back to x's device."""
    p = next(block.parameters(), None)                   # a block whose modules were all removed may have none
    dev = p.device if p is not None else x.device
    if x.device != dev:
        x, args, kwargs = x.to(dev), to_device(args, dev), to_device(kwargs, dev)
    y = block(x, *args, **kwargs)
    y = y[0] if isinstance(y, (tuple, list)) else y
    return y.to(x.device) if y.device != x.device else y


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every batch: (B, T, d) each, on the inputs' device."""
    return [block_call(block, x, a, kw).to(m.device) for x, a, kw, m in
            zip(inputs.hidden, inputs.args, inputs.kwargs, inputs.masks)]


@contextmanager
def capture_inputs(modules: dict[str, nn.Module]):
    """Within the block, record each named module's first forward input (one tensor per call)."""
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    handles = []
    for name, mod in modules.items():
        if mod is None:
            continue
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].detach())))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def visiting(block, dev: torch.device, home: torch.device):
    """`block` on `dev` for the duration, then back `home` (offloading: the model lives in host memory and only
    the block being fitted is on the accelerator). home == dev: a no-op move."""
    block.to(dev)
    try:
        yield block
    finally:
        block.to(home)


@contextmanager
def outside_blocks_on(model, blocks, dev: torch.device):
    """Every parameter and buffer of `model` outside its blocks (embeddings, rotary tables, final norm, head) on
    `dev` for the duration: what the forward up to the first block runs, so the captured block inputs are made
    and kept on `dev`. Parameters move in place (param.data), so a tied LM head moves with its embedding and stays
    tied; each goes back to where it was."""
    inside = {id(t) for t in (*blocks.parameters(), *blocks.buffers())}
    params, buffers, seen = [], [], set()
    for mod in model.modules():
        for name, t in (*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)):
            if t is None or id(t) in inside or id(t) in seen or t.device == dev:
                continue
            seen.add(id(t))
            if isinstance(t, torch.nn.Parameter):
                params.append((t, t.device))
                t.data = t.data.to(dev)
            else:
                buffers.append((mod, name, t))
                setattr(mod, name, t.to(dev))
    try:
        yield
    finally:
        for p, where in params:
            p.data = p.data.to(where)
        for mod, name, t in buffers:
            setattr(mod, name, t)
