"""Apply a plan: choose the kept structures, fit their weights, physically shrink the modules.

Weights of the kept columns come from one of:
- "sequential" (default): least squares on inputs that come from the already-compressed earlier blocks, which
  corrects the drift that earlier pruning causes and per-layer OBS on dense inputs cannot see. What it matches
  (`refit`):
  - "stream" (default): every producer linear of every module (q/k/v, the FFN's input linears) is refitted to
    give the dense block's pre-activations on the compressed path's inputs, min ‖W X − W' X̂‖²; a shrunk module's
    consumer is refitted to give the dense residual stream after it, min ‖(W X + r) − (Ŵ_S X̂_S + r̂)‖² with r,
    r̂ the residual it adds to, so the kept columns also undo the drift the residual carries in.
  - "module": only a shrunk module's consumer, to the dense module's own output, min ‖W X − Ŵ_S X̂_S‖²
    (`obs.reconstruct_cross`), as plans made before the "stream" refit were applied.
- "obs": the OBS result on dense calibration inputs, recovered exactly from the database's Hessian.
- "none": the kept columns unchanged (the magnitude baseline).
Kept structures come from the database's OBS removal order, or by weight magnitude for the baseline.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import data, hardware, io
from ..adapters.base import unit_indices
from ..adapters.checkpoint import Checkpoint, is_planner_model, save_portable
from ..algorithms import obs
from ..config import ApplyConfig, PlanConfig
from ..errors import PlannerError
from ..progress import bar as progress_bar
from ..types import KINDS, Plan
from .calibration import (
    BlockInputs,
    block_call,
    calibration_batches,
    capture_block_inputs,
    outside_blocks_on,
    real_tokens,
    run_block,
    visiting,
)
from .database import Database, sparse_weights


def _target(plan_layer: dict, kind: str) -> int:
    return int(plan_layer["heads"] if kind == "attn" else plan_layer["ffn"])


def kept_groups(model, adapter, layer_idx: int, kind: str, n_keep: int, select: str, db: Database | None):
    """Sorted kept group indices: from the OBS order in the database, or by consumer-column magnitude."""
    if select == "obs":
        if db is None:
            raise PlannerError("applying an OBS plan needs its database; it was not found")
        return db.kept_groups(layer_idx, kind, n_keep)
    lin = adapter.consumer(adapter.layers(model)[layer_idx], kind)
    order = obs.magnitude_order(lin.weight.detach(), adapter.group_size(model, kind))
    n = len(order)
    return order[n - n_keep:].sort().values if n_keep else order[:0]


def _check_plan(model, adapter, plan: Plan):
    spec = adapter.spec(model)
    if len(plan.layers) != len(spec):
        raise PlannerError(f"plan has {len(plan.layers)} layers, the model {len(spec)}: wrong model for this plan")
    for l, (s, p) in enumerate(zip(spec, plan.layers)):
        if p["heads"] > s.heads or p["ffn"] > s.ffn:
            raise PlannerError(f"plan keeps more than layer {l} has ({p['heads']}/{p['ffn']} > {s.heads}/{s.ffn}): "
                               f"wrong model for this plan")


@torch.no_grad()
def apply_(model, adapter, plan: Plan, select: str = "obs", weights: str = "sequential", db: Database | None = None,
           batches: list[dict] | None = None, damp: float = 0.01, progress: bool = True, device=None,
           offload: bool = False, refit: str = "stream", tape_bytes: int | None = None):
    """Shrink `model` in place to `plan`. Returns the model.
    refit: what the sequential refit matches, "stream" or "module" (module docstring).
    device: where the fits run (default: the model's). Without `offload` the model moves there; with it the model
    stays where it is (host memory) and each block visits `device` only while it is fitted (plus the layers
    before the first block while the calibration inputs are captured).
    tape_bytes: the most the dense block's recorded tensors may take per block (default TAPE_BYTES; 0: never
    record, re-run the dense block for each fit)."""
    tape_bytes = TAPE_BYTES if tape_bytes is None else tape_bytes
    _check_plan(model, adapter, plan)
    blocks = adapter.layers(model)
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    if not offload and dev != home:
        model.to(dev)
        home = dev
    if weights != "sequential":
        for i in progress_bar(range(len(blocks)), desc="apply", progress=progress, unit="block"):
            with visiting(blocks[i], dev, home) if offload else nullcontext():
                for kind in KINDS:
                    def fit(lin, cols, i=i, kind=kind):
                        if weights != "obs":
                            return None
                        H = db.hessian(i, kind).to(lin.weight.device)   # (d_in, d_in)
                        return obs.reconstruct(lin.weight.detach().double(), H, cols, damp)
                    _shrink(model, adapter, i, kind, _target(plan.layers[i], kind), select, db, fit)
                    _sparsify(adapter, blocks[i], i, kind, plan.layers[i], db, damp)
        return model
    if not batches:
        raise PlannerError("sequential apply needs calibration text")
    # Memory: beyond the model, one dense block copy and the calibration activations twice (dense and compressed
    # paths, each n_tokens x d), all on `dev`: a dense copy of the whole model is never made, so large models fit;
    # offloading, the device holds the activations and the one block being fitted (with its dense copy).
    with outside_blocks_on(model, blocks, dev) if offload else nullcontext():
        d_in = capture_block_inputs(model, blocks, batches, dev, adapter.forward_kwargs())   # still dense here
    c_in = BlockInputs(list(d_in.hidden), d_in.args, d_in.kwargs, d_in.masks)
    for i in progress_bar(range(len(blocks)), desc="apply (sequential)", progress=progress, unit="block"):
        with visiting(blocks[i], dev, home) if offload else nullcontext(blocks[i]) as cblock:
            dblock = copy.deepcopy(cblock)                 # block i before it is shrunk: the dense reference, on dev
            # the dense block's tensors every fit below reads, from one run of it (None: too large to keep; each
            # fit then runs the dense block again, up to the point it needs)
            tape, d_out = _dense_tape(dblock, d_in, _dense_points(adapter, dblock, refit), tape_bytes)
            for kind in KINDS:
                stream = refit == "stream" and adapter.consumer(cblock, kind) is not None
                if stream:
                    _refit_producers(adapter, dblock, cblock, kind, d_in, c_in, damp, tape)

                def fit(lin, cols, kind=kind, stream=stream):
                    res = (adapter.residual_point(dblock, kind), adapter.residual_point(cblock, kind)) if stream \
                        else None
                    H_SS, WC_S, mean_diag = _cross_stats(adapter.consumer(dblock, kind), lin, dblock, cblock, d_in,
                                                         c_in, cols, res, tape)
                    return obs.reconstruct_cross_kept(lin.weight.detach(), H_SS, WC_S, obs.damping(mean_diag, damp),
                                                      cols)
                _shrink(model, adapter, i, kind, _target(plan.layers[i], kind), select, db, fit)
                _sparsify(adapter, cblock, i, kind, plan.layers[i], db, damp)
            d_in = d_in.with_hidden(d_out if d_out is not None else run_block(dblock, d_in))
            c_in = c_in.with_hidden(run_block(cblock, c_in))
            dblock = tape = d_out = None                   # freed before the next block's copy is made
    return model


# The dense tape's limit per block. MiniLM at 2048 passages keeps ~0.9 GB (q/k/v, both consumers' outputs, both
# residual points, the FFN's 1536-wide pre-activations; padded tokens) and saves four of the dense block's five
# runs: apply 1.41x faster on 2 cores, the same weights bit for bit (benchmarks/bench_apply.py). Above the limit
# (large models, many passages) each fit re-runs the dense block instead.
TAPE_BYTES = 4 << 30


def _producers(adapter, block, kind: str) -> list:
    """Module `kind`'s producer linears in `block`: every linear slot but the consumer (of any type; the stream
    refit fits and records only the plain nn.Linear ones, not sparse kernels)."""
    return [getattr(*slot) for slot in adapter.linear_slots(block, kind)[:-1]]


def _dense_points(adapter, dblock, refit: str) -> list[tuple]:
    """(module, where) points of the dense block the sequential fits read: each present module's consumer output
    and, for the stream refit, its producers' outputs and the residual point after it."""
    pts = []
    for kind in KINDS:
        lin = adapter.consumer(dblock, kind)
        if lin is None:
            continue
        pts.append((lin, "output"))
        if refit == "stream":
            pts += [(m, "output") for m in _producers(adapter, dblock, kind) if type(m) is torch.nn.Linear]
            pts.append(adapter.residual_point(dblock, kind))
    return pts


def _dense_tape(dblock, d_in: BlockInputs, points: list[tuple], limit: int):
    """(tape, outputs): tape[b][(id(module), where)] the tensor at each point on batch b (as the module gave it,
    padded tokens included) and the block's outputs, from one run of the dense block; (None, None) when the tape
    would exceed `limit` bytes (known after the first batch: its bytes per padded token times all batches' tokens;
    batches are sorted by length, so the first batch's share is not the tape's)."""
    if limit <= 0:
        return None, None
    tape: list[dict] = []
    cur: dict = {}
    hs = [_hook_point(m, w, lambda t, k=(id(m), w): cur.__setitem__(k, t)) for m, w in points]
    outs = []
    try:
        for b, (x, a, kw, mask) in enumerate(zip(d_in.hidden, d_in.args, d_in.kwargs, d_in.masks)):
            outs.append(block_call(dblock, x, a, kw).to(mask.device))
            tape.append(cur)
            cur = {}
            if b == 0:          # every recorded tensor is (tokens, width): bytes per padded token x all of them
                per_token = sum(t.numel() * t.element_size() for t in tape[0].values()) / mask.numel()
                if per_token * sum(m.numel() for m in d_in.masks) > limit:
                    return None, None
    finally:
        for h in hs:
            h.remove()
    return tape, outs


def _sparsify(adapter, block, i, kind, plan_layer: dict, db: Database | None, damp: float):
    """If the plan chose a sparse option for block i's `kind`, give its linears the SparseGPT weights (from
    the database's Hessians, dense calibration inputs) and the portable CSR layer."""
    level = float(plan_layer.get(f"{kind}_sparsity", 0.0))
    if not level:
        return
    if db is None:
        raise PlannerError("applying a sparse option needs the plan's OBS database; it was not found")
    n = len(adapter.linear_slots(block, kind))
    ws = sparse_weights(block, adapter, kind, level, db.slot_hessians(i, kind, n), damp)
    adapter.sparsify_(block, kind, level, [w.to(getattr(p, name).weight.dtype) for (p, name), w in
                                           zip(adapter.linear_slots(block, kind), ws)])


def _shrink(model, adapter, i, kind, n_keep, select, db, fit):
    """Shrink block i's `kind` to n_keep groups; fit(consumer linear, kept columns) gives the kept columns' new
    weights, (d_out, len(cols)) float64, or None to keep them as they are. Removing everything needs no fit."""
    block = adapter.layers(model)[i]
    lin = adapter.consumer(block, kind)
    gs = adapter.group_size(model, kind)
    if lin is None or n_keep * gs == lin.in_features:
        return
    kept = kept_groups(model, adapter, i, kind, n_keep, select, db)
    W_S = fit(lin, unit_indices(kept, gs)) if n_keep else None
    adapter.shrink_(block, kind, kept, None if W_S is None else W_S.to(lin.weight.dtype), model.config)


class _Captured(Exception):
    """Raised by a hook once the consumer's input is in hand: the rest of the block need not run."""


def _hook_point(mod, where: str, fn):
    """Call fn(tensor) with `mod`'s first forward input (where == "input") or its output (a tensor, or a tuple
    whose [0] it is); returns the hook handle."""
    if where == "input":
        return mod.register_forward_pre_hook(lambda m, a: fn(a[0]))
    return mod.register_forward_hook(lambda m, a, y: fn(y[0] if isinstance(y, (tuple, list)) else y))


def _both_blocks(dblock, cblock, d_in: BlockInputs, c_in: BlockInputs, dense: list, dense_stop, tape=None):
    """For each calibration batch, hand each dense point's tensor to its function (dense: [((module, where), fn)]
    on dblock) and run the compressed block on the compressed path's input, until a hook raises _Captured (or to
    its end); yields the batch's token mask. The dense tensors come from `tape` (_dense_tape) where given, else
    from running the dense block on the dense path's input up to `dense_stop` (module, where)."""
    hs = []
    if tape is None:
        hs = [_hook_point(m, w, fn) for (m, w), fn in dense]
        hs.append(_hook_point(*dense_stop, _stop))
    try:
        for b, (xd, xc, a, kw, mask) in enumerate(zip(d_in.hidden, c_in.hidden, d_in.args, d_in.kwargs, d_in.masks)):
            if tape is None:
                try:
                    block_call(dblock, xd, a, kw)
                except _Captured:
                    pass
            else:
                for (m, w), fn in dense:
                    fn(tape[b][(id(m), w)])
            try:
                block_call(cblock, xc, a, kw)
            except _Captured:
                pass
            yield mask
    finally:
        for h in hs:
            h.remove()


def _stop(t):
    raise _Captured


def _refit_producers(adapter, dblock, cblock, kind: str, d_in: BlockInputs, c_in: BlockInputs, damp: float,
                     tape=None):
    """Refit every row of module `kind`'s producer linears in cblock (all linear_slots but the consumer; before
    shrinking, so kept and dropped rows alike: each row's fit is independent of the others) so that, on the
    compressed path's inputs x̂, they give the dense block's outputs W x on the dense path's (before the
    nonlinearity): W' = (C + lam W)(H + lam I)^-1 with H = 2/n Σ x̂ x̂ᵀ (d_in, d_in), C = 2/n Σ W x x̂ᵀ
    (d_out, d_in); the damping pulls W' towards W. Producers that read the same tensor (q/k/v, gate/up) share one H.
    The compressed block runs only up to its consumer; the dense outputs come from `tape` (or a run of the dense
    block up to its consumer). Linears of other types (sparse kernels) are left as they are."""
    pairs = [(dl, cl) for dl, cl in zip(_producers(adapter, dblock, kind), _producers(adapter, cblock, kind))
             if type(dl) is torch.nn.Linear and type(cl) is torch.nn.Linear]
    if not pairs:
        return
    dev = pairs[0][1].weight.device
    got: dict = {}
    share: dict = {}            # (data_ptr, shape) of a producer's input -> the H it accumulates into
    H: list[torch.Tensor] = []
    C = [torch.zeros(cl.out_features, cl.in_features, dtype=torch.float64, device=dev) for _, cl in pairs]
    which = [0] * len(pairs)    # producer j's input -> H[which[j]]

    hs = [adapter.consumer(cblock, kind).register_forward_pre_hook(lambda m, a: _stop(a))]
    hs += [cl.register_forward_pre_hook(lambda m, a, j=j: got.__setitem__(("x", j), a[0]))
           for j, (_, cl) in enumerate(pairs)]
    dense = [((dl, "output"), lambda t, j=j: got.__setitem__(("y", j), t)) for j, (dl, _) in enumerate(pairs)]
    n = 0
    try:
        for b, mask in enumerate(_both_blocks(dblock, cblock, d_in, c_in, dense,
                                              (adapter.consumer(dblock, kind), "input"), tape)):
            xs = {}
            for j, (dl, cl) in enumerate(pairs):
                x = got[("x", j)]
                if b == 0:                                  # who reads which tensor, from the first batch
                    key = (x.data_ptr(), tuple(x.shape))
                    if key not in share:
                        share[key] = len(H)
                        H.append(torch.zeros(cl.in_features, cl.in_features, dtype=torch.float64, device=dev))
                    which[j] = share[key]
                if which[j] not in xs:
                    xs[which[j]] = real_tokens(x, mask).to(dev, torch.float32)     # (tokens, d_in)
                    H[which[j]] += (xs[which[j]].T @ xs[which[j]]).double()
                y = real_tokens(got[("y", j)], mask).to(dev, torch.float32)       # (tokens, d_out) = W x + b
                if dl.bias is not None:
                    y = y - dl.bias.detach().to(dev, torch.float32)
                C[j] += (y.T @ xs[which[j]]).double()
            n += next(iter(xs.values())).shape[0]
            got.clear()
    finally:
        for h in hs:
            h.remove()
    for j, (_, cl) in enumerate(pairs):
        Hj = H[which[j]] * (2 / n)
        lam = obs.damping(float(torch.diagonal(Hj).mean()), damp)
        W = obs.reconstruct_cross_kept(cl.weight.detach(), Hj, C[j] * (2 / n), lam,
                                       torch.arange(cl.in_features, device=dev))
        cl.weight.copy_(W.to(cl.weight.dtype))


def _cross_stats(dense_lin, comp_lin, dblock, cblock, d_in: BlockInputs, c_in: BlockInputs, cols: torch.Tensor,
                 residual=None, tape=None):
    """The statistics `obs.reconstruct_cross_kept` needs, over real tokens: H_SS = 2/n Σ x̂_S x̂_Sᵀ (s, s),
    WC_S = 2/n Σ y x̂_Sᵀ (d_out, s) and the damping's mean diagonal of H_hat, with y the dense consumer's output
    and x̂ the compressed consumer's input (full width before shrinking), paired token by token; S = `cols`, the
    kept columns. Products per batch in float32 (half the time of float64), summed in float64. Each block runs
    only up to its consumer.
    residual: ((module, where) in dblock, (module, where) in cblock), the residual-stream points after the
    consumer (adapter.residual_point), or None. Given, y is the dense stream there minus the compressed path's
    residual, s − (ŝ − ŷ) = W x + r − r̂, and the blocks run up to that point.
    tape: the dense block's tensors (_dense_tape); without it the dense block runs too."""
    d, dev = comp_lin.in_features, comp_lin.weight.device
    S = cols.to(dev)
    s = S.numel()
    H_SS = torch.zeros(s, s, dtype=torch.float64, device=dev)
    WC_S = torch.zeros(dense_lin.out_features, s, dtype=torch.float64, device=dev)
    diag = torch.zeros(d, dtype=torch.float64, device=dev)
    n = 0
    got = {}

    def keep(key, stop: bool):
        def fn(t):
            got[key] = t
            if stop:
                raise _Captured
        return fn
    hs = [comp_lin.register_forward_pre_hook(lambda m, a, f=keep("xh", residual is None): f(a[0]))]
    dense = [((dense_lin, "output"), keep("y", False))]
    dense_stop = (dense_lin, "output")
    if residual is not None:
        hs.append(comp_lin.register_forward_hook(lambda m, a, y, f=keep("yh", False): f(y)))
        hs.append(_hook_point(*residual[1], keep("sh", True)))
        dense.append((residual[0], keep("s", False)))
        dense_stop = residual[0]
    try:
        for mask in _both_blocks(dblock, cblock, d_in, c_in, dense, dense_stop, tape):
            y = real_tokens(got["y"], mask).to(dev, torch.float32)    # (tokens, d_out) = W x + b
            if residual is not None:                                  # W x + b + r − r̂, r̂ = ŝ − ŷ
                s_d, s_c, y_c = (real_tokens(got[k], mask).to(dev, torch.float32) for k in ("s", "sh", "yh"))
                y = s_d - (s_c - y_c)
            if dense_lin.bias is not None:
                y = y - dense_lin.bias.detach().to(dev, torch.float32)
            xh = real_tokens(got["xh"], mask).to(dev, torch.float32)  # (tokens, d_in)
            xs = xh.index_select(1, S)                                # (tokens, s)
            H_SS += (xs.T @ xs).double()
            WC_S += (y.T @ xs).double()
            diag += (xh.double() ** 2).sum(0)
            n += y.shape[0]
    finally:
        for h in hs:
            h.remove()
    return H_SS * (2 / n), WC_S * (2 / n), float(diag.mean()) * 2 / n


def apply(ck: Checkpoint, p: Plan, out_dir, calib_path=None, weights: str | None = None, select: str = "obs",
          progress: bool = True, check_fingerprint: bool = True, cfg: ApplyConfig = ApplyConfig()):
    """Compress checkpoint `ck` to plan `p` and write a portable HF directory. Returns (out_dir, model), the model
    on cfg.device (offloading: in host memory).
    weights: "sequential" / "obs" / "none" (default: as planned); select: "obs" (the database's removal order)
    or "magnitude" (the baseline)."""
    hardware.check_device(cfg.device)
    io.check_out_dir(out_dir, replaceable=is_planner_model, protect=(ck.path,))
    if check_fingerprint and p.model.get("fingerprint") and p.model["fingerprint"] != ck.fingerprint:
        raise PlannerError(f"the plan was made for another checkpoint ({p.model.get('path')}); plan this model first")
    o, d = p.options, PlanConfig()
    weights = weights or o.get("weights", "sequential" if d.sequential else "obs")
    db = None
    if select == "obs":
        db_path = Path(p.database.get("path", ""))
        if not (db_path / "index.json").exists():
            raise PlannerError(f"the plan's OBS database {db_path} is missing: rerun `planner plan`")
        db = Database(db_path)
    batches = None
    if weights == "sequential":                 # refit on the plan's own calibration text and settings
        batches, _ = calibration_batches(ck, calib_path or o.get("calib_path"), o.get("n_calib", d.n_calib),
                                         o.get("calib_max_len", d.calib_max_len), o.get("calib_batch", d.calib_batch),
                                         default=o.get("calib_default", (data.CALIBRATION,)))   # older plans: one file
    model = ck.load("cpu" if cfg.offload else cfg.device)
    apply_(model, ck.adapter, p, select=select, weights=weights, db=db, batches=batches,
           damp=o.get("damp", d.damp), progress=progress, device=cfg.device, offload=cfg.offload,
           refit=o.get("refit", "module"))          # plans made before the "stream" refit record none
    record = {"method": p.method, "target_speedup": p.target_speedup, "predicted_speedup": p.predicted_speedup,
              "weights": weights, "refit": o.get("refit", "module") if weights == "sequential" else None,
              "select": select, "profile": {k: p.profile.get(k) for k in
              ("batch_size", "seq_len", "dtype", "mode", "decode_steps")} | {"hardware": p.profile.get("hardware", {}).get("key")},
              "source": p.model, "origin": ck.origin or ck.fingerprint,   # the dense ancestor (gradual: not the source)
              "calibration": {"path": o.get("calib_path"), "n": o.get("n_calib", d.n_calib),
                              "default": o.get("calib_default", [data.CALIBRATION])}, **_loop_record(p)}
    save_portable(model, ck.adapter, ck.path, out_dir, {"planner": record})
    return Path(out_dir), model


def _loop_record(p: Plan) -> dict:
    """What the saved model records of its plan's closed loop: the correction its prediction used and the speedup
    its architecture measured (random weights), so verify can compare like with like."""
    loop = p.options.get("closed_loop") or {}
    if "measured" not in loop:
        return {}
    return {"correction": loop["correction"],
            "loop": {k: loop.get(k) for k in ("measured", "interval", "status", "converged")}}
