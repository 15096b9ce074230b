"""The OBS database: for every block and structure kind, the removal order and the error at each level.

Layout on disk (resumable layer by layer; every file written atomically):
    DIR/index.json            identity (model, calibration, settings) + per-layer entries as they finish
    DIR/layer_<i>.safetensors the calibration Hessians (float32, packed upper triangle: they are symmetric)
                              and removal orders of block i

Cost (Llama shapes, structured levels): one d x d and one d_ffn x d_ffn triangle per block, 8.8 GB for the 7B
shape (32 blocks, d 4096, d_ffn 11008), 0.8 GB for the 0.85 B one; sparse levels add one d x d triangle
per distinct input the module's other linears read (q/k/v share one, gate/up another).

Stored per (layer, kind): the greedy OBS removal order (one pass gives every level), and at each level on
the grid the *held-out* output error ‖(W − Ŵ)x‖² (mean per token) on calibration passages that the OBS
update did not see, plus two denominators: the module's own output energy ‖Wx‖² (ZipLM's normalisation)
and the energy of the residual stream the module writes into (centred LayerNorm input). Corrected weights
at any level are recovered exactly from the stored Hessian: OBS's result equals the least-squares optimum
on the kept columns (`obs.reconstruct`), so they need not be stored level by level.

With sparse levels (levels["sparse"], SparseGPT): per (layer, kind) also the held-out error of the module
with every linear sparsified at each level, measured at the consumer's output (the same quantity as above),
and the input Hessians of the module's other linears (`<kind>.H_slot<j>`, one per distinct input: linears fed
the same tensor share it, index entry `slot_alias`); the sparse weights are recomputed from them at apply, as
the structured ones are.

Precision: Hessians accumulate in float32 with a float32 product per batch; the greedy OBS pass, its damped
inverse and the held-out scoring run in DatabaseConfig.precision (float32; tests/test_obs.py and
benchmarks/bench_obs_precision.py measure it against float64).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import io
from ..algorithms import obs
from ..algorithms.sparsegpt import sparsegpt
from ..config import DatabaseConfig, PlanConfig
from ..errors import PlannerError
from ..progress import bar as progress_bar
from ..types import KINDS, LatencyProfile
from . import distributed
from .calibration import (
    BlockInputs,
    block_call,
    capture_block_inputs,
    outside_blocks_on,
    real_tokens,
    run_block,
    visiting,
)

SCHEMA_VERSION = 2                 # 2: packed Hessians, shared slot Hessians


class Database:
    """Read access to a built database."""

    def __init__(self, path):
        self.path = Path(path)
        self.index = io.read_json(self.path / "index.json", "OBS database index")
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        io.check_schema(self.index, "ObsDatabase", SCHEMA_VERSION, self.path)

    @property
    def n_layers(self) -> int:
        return self.index["n_layers"]

    def entry(self, layer: int, kind: str) -> dict:
        return self.index["layers"][str(layer)][kind]

    def errors(self, layer: int, kind: str, norm: str = "residual") -> dict[int, float]:
        """kept width -> normalised held-out error."""
        e = self.entry(layer, kind)
        den = e["residual_energy"] if norm == "residual" else e["module_energy"]
        den = max(den, 1e-30)
        return {int(w): float(v) / den for w, v in zip(e["widths"], e["val_error"])}

    def sparse_errors(self, layer: int, kind: str, norm: str = "residual") -> dict[float, float]:
        """sparsity level -> normalised held-out error of the module with its linears sparsified (SparseGPT);
        {} if the database has no sparse levels."""
        e = self.entry(layer, kind)
        sp = e.get("sparse")
        if not sp:
            return {}
        den = max(e["residual_energy"] if norm == "residual" else e["module_energy"], 1e-30)
        return {float(lv): float(v) / den for lv, v in zip(sp["levels"], sp["val_error"])}

    def hessian(self, layer: int, kind: str) -> torch.Tensor:
        """(d_in, d_in) float64: the calibration Hessian of block `layer`'s `kind` consumer input."""
        return unpack_sym(self.tensors(layer)[f"{kind}.H"]).double()

    def slot_hessians(self, layer: int, kind: str, n_slots: int) -> list[torch.Tensor]:
        """(d_in, d_in) float64 input Hessians of the module's linears (linear_slots order) for SparseGPT."""
        t = self.tensors(layer)
        alias = {int(j): int(j0) for j, j0 in self.entry(layer, kind).get("slot_alias", {}).items()}
        last = n_slots - 1                                           # the consumer is the module's last linear
        return [self.hessian(layer, kind) if j == last else
                unpack_sym(t[f"{kind}.H_slot{alias.get(j, j)}"]).double() for j in range(n_slots)]

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Block `layer`'s Hessians and orders, read once and kept (the search stitches many plans)."""
        if layer in self._cache:
            return self._cache[layer]
        p = self.path / f"layer_{layer}.safetensors"
        try:
            self._cache[layer] = load_file(str(p))
            return self._cache[layer]
        except Exception as e:
            raise PlannerError(f"OBS database file {p} is missing or corrupted ({type(e).__name__}): "
                               f"delete {self.path} and rerun `planner plan`") from None

    def kept_groups(self, layer: int, kind: str, n_kept: int) -> torch.Tensor:
        order = self.tensors(layer)[f"{kind}.order"].long()   # (n_groups,) first removed first
        n = len(order)
        return order[n - n_kept:].sort().values if n_kept else order[:0]


def pack_sym(H: torch.Tensor) -> torch.Tensor:
    """(n(n+1)/2,) the upper triangle of a symmetric (n, n) matrix, row by row (half the bytes on disk)."""
    n = H.shape[0]
    return H[torch.ones(n, n, dtype=torch.bool, device=H.device).triu()]


def unpack_sym(p: torch.Tensor) -> torch.Tensor:
    """The symmetric (n, n) matrix whose upper triangle `p` holds (`pack_sym`); a 2-D tensor passes through."""
    if p.ndim == 2:
        return p
    n = int(round(((8 * p.numel() + 1) ** 0.5 - 1) / 2))
    if n * (n + 1) // 2 != p.numel():
        raise PlannerError(f"a packed Hessian of {p.numel()} entries is not a triangle: the database is damaged; "
                           f"delete it and rerun `planner plan`")
    H = torch.zeros(n, n, dtype=p.dtype, device=p.device)
    H[torch.ones(n, n, dtype=torch.bool, device=p.device).triu()] = p
    return H + H.triu(1).T


def split_batches(batches: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Every k-th batch goes to validation (batches are length-sorted, so both halves span all lengths)."""
    if val_fraction <= 0 or len(batches) < 2:
        return batches, batches
    k = min(max(2, round(1 / val_fraction)), len(batches))   # at least one validation batch
    val = [b for i, b in enumerate(batches) if i % k == k - 1]
    train = [b for i, b in enumerate(batches) if i % k != k - 1]
    return train, val


class _Stats:
    """Hessians of the consumers' inputs and the residual energy, for one block on one data split.

    keep_inputs: also keep each consumer's real-token inputs (tokens, d_in) in float32, for the ErrorMeter
    (the held-out split, when it has fewer tokens than the consumer has inputs).
    Linears of a module fed the same tensor (q/k/v, gate/up) share one slot Hessian: `alias[(kind, j)] = j0`."""

    def __init__(self, layer, adapter, device, slots: bool = False, keep_inputs: bool = False):
        self.adapter, self.device = adapter, device
        self.acc, self.res, self.n_res, self.mask = {}, {}, {}, None
        self.inputs = {} if keep_inputs else None
        self.slot_acc = {}                 # (kind, j) -> Hessian of the j-th linear's input (sparse options)
        self.alias, self._fed = {}, {}     # slot sharing, found on the first batch; _fed: (kind, input) -> j
        self.handles = []
        for kind in KINDS:
            lin = adapter.consumer(layer, kind)
            if lin is None:
                continue
            for j, (parent, name) in enumerate(adapter.linear_slots(layer, kind) if slots else []):
                slot = getattr(parent, name)
                if slot is lin:
                    continue                                         # the consumer's Hessian is acc[kind]
                self.slot_acc[(kind, j)] = _accumulator(slot.in_features, device)
                self.handles.append(slot.register_forward_pre_hook(self._slot_hook(kind, j)))
            self.acc[kind] = _accumulator(lin.in_features, device)
            if keep_inputs:
                self.inputs[kind] = []
            self.res[kind], self.n_res[kind] = 0.0, 0
            self.handles.append(lin.register_forward_pre_hook(self._consumer_hook(kind)))
            mod, where = adapter.residual_point(layer, kind)
            hook = self._residual_hook(kind)
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, hook=hook: hook(a[0])) if where == "input"
                                else mod.register_forward_hook(
                                    lambda m, a, y, hook=hook: hook(y[0] if isinstance(y, (tuple, list)) else y)))

    def _consumer_hook(self, kind):
        def hook(mod, args):
            x = real_tokens(args[0], self.mask).to(self.device)       # (tokens, d_in)
            self.acc[kind].add_batch(x)
            if self.inputs is not None:
                self.inputs[kind].append(x.float())
        return hook

    def _slot_hook(self, kind, j):
        def hook(mod, args):
            if (kind, j) in self.alias:
                return
            x = args[0]
            if self._fed is not None:                                # first batch: who reads which tensor
                j0 = self._fed.setdefault((kind, x.data_ptr(), tuple(x.shape)), j)
                if j0 != j:
                    self.alias[(kind, j)] = j0
                    del self.slot_acc[(kind, j)]
                    return
            self.slot_acc[(kind, j)].add_batch(real_tokens(x, self.mask).to(self.device))
        return hook

    def slot_hessians(self, layer, kind) -> list[torch.Tensor]:
        """Input Hessians of every linear of `kind`, in linear_slots order (shared ones are the same tensor)."""
        lin = self.adapter.consumer(layer, kind)
        got = {}
        for j, (p, n) in enumerate(self.adapter.linear_slots(layer, kind)):
            if getattr(p, n) is lin:
                got[j] = self.acc[kind].hessian()
            elif (kind, j) not in self.alias:
                got[j] = self.slot_acc[(kind, j)].hessian()
        return [got[self.alias.get((kind, j), j)] for j in range(len(self.adapter.linear_slots(layer, kind)))]

    def _residual_hook(self, kind):
        def hook(x):
            z = real_tokens(x, self.mask)                            # (tokens, d) the residual stream
            z = z - z.mean(-1, keepdim=True)                         # LayerNorm removes the mean (RMSNorm
                                                                     # does not; a denominator either way)
            self.res[kind] += float((z.double() ** 2).sum())
            self.n_res[kind] += z.shape[0]
        return hook

    def run(self, block, inputs: BlockInputs) -> list[torch.Tensor]:
        outs = []
        p = next(block.parameters(), None)
        dev = p.device if p is not None else inputs.hidden[0].device
        with torch.no_grad():
            for x, a, kw, m in zip(inputs.hidden, inputs.args, inputs.kwargs, inputs.masks):
                self.mask = m.to(dev)                                # the hooks see the block's device
                outs.append(block_call(block, x, a, kw).to(m.device))
                self._fed = None                                     # sharing is known after one batch
        return outs

    def close(self):
        for h in self.handles:
            h.remove()


def _accumulator(d_in: int, device) -> obs.HessianAccumulator:
    # float32 storage and products: half the memory and time of float64, and the precision the OBS pass works in
    return obs.HessianAccumulator(d_in, device=device, dtype=torch.float32, compute_dtype=torch.float32)


def sparse_weights(block, adapter, kind: str, level: float, H_slots: list[torch.Tensor], damp: float):
    """SparseGPT weights (each (out, in) float64, zeros included) of the module's linears at `level`."""
    return [sparsegpt(getattr(p, n).weight, H, level, damp=damp)
            for (p, n), H in zip(adapter.linear_slots(block, kind), H_slots)]


@torch.no_grad()
def _sparse_errors(block, adapter, kind, levels, H_slots, val: BlockInputs, damp) -> list[float]:
    """Held-out error of the module with its linears sparsified at each level: mean over real tokens of
    ||y - y_sparse||^2 at the consumer's output, the same quantity as the structured levels' error (there
    ||(W - W_hat) x||^2 of the consumer), so the DP can weigh both kinds of option in one currency."""
    def consumer_outputs(b):
        got = []
        h = adapter.consumer(b, kind).register_forward_hook(lambda m, a, y: got.append(y))
        try:
            for x, a, kw, m in zip(val.hidden, val.args, val.kwargs, val.masks):
                block_call(b, x, a, kw)                              # the hook appends (B, T, d)
                got[-1] = real_tokens(got[-1], m).double()           # (tokens, d) real tokens only
        finally:
            h.remove()
        return got

    ref = consumer_outputs(block)
    n = sum(r.shape[0] for r in ref)
    errs = []
    for lv in levels:
        b2 = copy.deepcopy(block)
        for (p, name), W in zip(adapter.linear_slots(b2, kind), sparse_weights(block, adapter, kind, lv, H_slots, damp)):
            getattr(p, name).weight.copy_(W.to(getattr(p, name).weight.dtype))
        errs.append(float(sum(((a - b) ** 2).sum() for a, b in zip(consumer_outputs(b2), ref)) / max(n, 1)))
    return errs


def build(model, adapter, batches: list[dict], out_dir, levels: dict[str, list[int]], cfg: DatabaseConfig,
          identity: dict, progress: bool = True, group=None) -> Database:
    """Build (or resume) the database for `model` on calibration `batches`.

    `levels[kind]` are the kept widths to score (heads for attn, neurons for ffn); widths above a block's
    current width are skipped and its current width is always included. `identity` (model fingerprint,
    calibration hash) decides whether an existing database can be reused or resumed. `group`: this process's
    place in a torch.distributed job (stages/distributed.py): each rank builds its range of blocks.
    """
    out = Path(out_dir)
    blocks = adapter.layers(model)
    want = {"kind": "ObsDatabase", "schema_version": SCHEMA_VERSION, "identity": identity,
            "config": cfg.to_dict(), "levels": levels, "n_layers": len(blocks)}
    many = group is not None and group.world > 1
    index = _open_index(out, want) if not many or group.first else None
    if many:
        index = distributed.broadcast(index, group.device)          # rank 0 decided: resume, reuse or start over
    done = {int(k) for k in index["layers"]}
    if len(done) == len(blocks):
        return Database(out)

    train_b, val_b = split_batches(batches, cfg.val_fraction)
    dev, fkw = torch.device(group.device if many else cfg.device), adapter.forward_kwargs()
    if not cfg.offload:
        dev = next(model.parameters()).device
    # offloading: the layers before the first block visit the device for the capture, so the activations are
    # made and kept there and only one block at a time crosses over
    with outside_blocks_on(model, blocks, dev) if cfg.offload else nullcontext():
        train = capture_block_inputs(model, blocks, train_b, dev, forward_kwargs=fkw)
        val = capture_block_inputs(model, blocks, val_b, dev, forward_kwargs=fkw) if val_b is not train_b else train
    if train.n_tokens == 0:
        raise PlannerError("calibration data has no tokens: give a text file with at least a few passages")
    home = next(model.parameters()).device
    mine = group.blocks(len(blocks)) if many else range(len(blocks))
    if many:
        train, val = _pass_on(model, blocks, mine, train, val, cfg, group, dev, home)

    def record(i, entry):
        if many:                                                     # rank 0 merges these into the index
            io.write_json(out / f"layer_{i}.entry.json", {"rank": group.rank, "entry": entry})
        else:
            index["layers"][str(i)] = entry
            io.write_json(out / "index.json", index)                 # the resume point
    desc = f"OBS database (rank {group.rank}, blocks {mine.start}-{mine.stop - 1})" if many else "OBS database"
    bar = progress_bar(total=len(mine), desc=desc, progress=progress, unit="block")
    for i in mine:
        with visiting(blocks[i], dev, home) if cfg.offload else nullcontext():
            train, val = _block_step(model, adapter, blocks[i], i, i in done, train, val, levels, cfg, record, out)
        bar.update()
    bar.close()
    if many:
        distributed.barrier()                                        # every rank's layer files are written
        if group.first:
            _open_index(out, want, fresh=False)                      # merges the ranks' entries
        distributed.barrier()
    return Database(out)


def _open_index(out: Path, want: dict, fresh: bool = True) -> dict:
    """The database's index: the one on disk if it was built for the same identity and settings (resume or
    reuse), with any per-layer entries a distributed run left (layer_<i>.entry.json) merged in; else a new one,
    and the old layer files removed (`fresh`). Written back to disk."""
    out.mkdir(parents=True, exist_ok=True)
    index = None
    if (out / "index.json").exists():
        try:
            old = io.read_json(out / "index.json")
        except PlannerError:
            old = None
        if old and all(old.get(k) == v for k, v in want.items()):
            index = old                                              # resume / reuse
    if index is None:
        index = {**want, "layers": {}}
        for p in [*out.glob("layer_*.safetensors"), *out.glob("layer_*.entry.json")]:
            p.unlink()
    for p in sorted(out.glob("layer_*.entry.json")):
        i = p.name.split("_")[1].split(".")[0]
        if (out / f"layer_{i}.safetensors").exists():
            got = io.read_json(p)
            index["layers"][i] = got["entry"]
            index.setdefault("ranks", {})[i] = got["rank"]            # which process built the block
    index["layers"] = {k: index["layers"][k] for k in sorted(index["layers"], key=int)}
    io.write_json(out / "index.json", index)
    for p in out.glob("layer_*.entry.json"):
        p.unlink()
    return index


def _pass_on(model, blocks, mine: range, train: BlockInputs, val: BlockInputs, cfg, group, dev, home):
    """Distributed: the hidden states entering this rank's first block (from the rank before), and the ones
    leaving its last block sent to the rank after, pushed through its blocks once, forward only."""
    same = val is train
    if group.rank > 0:
        train = train.with_hidden(distributed.recv_hidden(group.rank - 1, group.device, dev))
        val = train if same else val.with_hidden(distributed.recv_hidden(group.rank - 1, group.device, dev))
    if group.rank < group.world - 1:
        t, v = train, val
        for i in mine:
            with visiting(blocks[i], dev, home) if cfg.offload else nullcontext():
                t = t.with_hidden(run_block(blocks[i], t))
                v = t if same else v.with_hidden(run_block(blocks[i], v))
        distributed.send_hidden(t.hidden, group.rank + 1, group.device)
        if not same:
            distributed.send_hidden(v.hidden, group.rank + 1, group.device)
    return train, val


def _block_step(model, adapter, block, i, done, train, val, levels, cfg, record, out):
    """Block i's database written (or, `done`, only its outputs computed); the next block's (train, val) inputs."""
    if done:                                                         # resume: only push activations through
        new_val = run_block(block, val) if val is not train else None
        train = train.with_hidden(run_block(block, train))
        val = val.with_hidden(new_val) if new_val is not None else train
    else:
        tensors, entry, out_train, out_val = block_database(model, adapter, block, train, val, levels, cfg)
        with io.atomic_path(out / f"layer_{i}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        record(i, entry)
        train = train.with_hidden(out_train)
        val = val.with_hidden(out_val) if val is not train else train
    return train, val


def block_database(model, adapter, block, train: BlockInputs, val: BlockInputs, levels: dict, cfg: DatabaseConfig):
    """One block's database: (tensors to store, index entry, block outputs on train, on val).
    `val is train` when no passages are held back (the errors are then in-sample). Runs where the block is."""
    p = next(block.parameters(), None)
    dev = p.device if p is not None else torch.device(cfg.device)
    dt = getattr(torch, cfg.precision)
    sparse_levels = [float(x) for x in levels.get("sparse", [])]
    st_train = _Stats(block, adapter, dev, slots=bool(sparse_levels))
    out_train = st_train.run(block, train)
    st_train.close()
    if val is train:
        st_val, out_val = st_train, out_train
    else:
        width = min((lin.in_features for k in KINDS if (lin := adapter.consumer(block, k)) is not None), default=0)
        st_val = _Stats(block, adapter, dev, slots=bool(sparse_levels), keep_inputs=val.n_tokens <= width)
        out_val = st_val.run(block, val)
        st_val.close()
    tensors, entry = {}, {}
    for kind in KINDS:
        lin = adapter.consumer(block, kind)
        if lin is None:                                              # already removed: one option, width 0
            entry[kind] = {"widths": [0], "val_error": [0.0], "train_loss": [0.0], "module_energy": 1.0,
                           "residual_energy": 1.0, "group_size": adapter.group_size(model, kind), "n_groups": 0}
            continue
        gs = adapter.group_size(model, kind)
        W = lin.weight.detach().to(dev)                              # (d_out, d_in)
        H_tr = st_train.acc[kind].hessian()                          # (d_in, d_in) float32
        n_tr, n_va = st_train.acc[kind].n, st_val.acc[kind].n
        X_va = torch.cat(st_val.inputs[kind]) if st_val.inputs is not None else None   # (n_va, d_in) or None
        meter = obs.ErrorMeter(W, X=X_va, H=None if X_va is not None else st_val.acc[kind].hessian(), dtype=dt)
        del X_va
        n_groups = W.shape[1] // gs
        cur = n_groups if kind == "attn" else W.shape[1]
        widths = sorted({w for w in levels[kind] if w <= cur} | {cur})
        kept_levels = [w if kind == "attn" else w // gs for w in widths]
        errs = {}                                                    # kept groups -> held-out error
        res = obs.group_obs(W, H_tr, group_size=gs, damp=cfg.damp, snapshot_levels=kept_levels, device=dev,
                            dtype=dt, per_step=cfg.per_step,
                            on_kept=lambda nk, cols, W_S_T, m=meter: errs.__setitem__(nk, m.error_kept(cols, W_S_T)))
        if val is not train:                                         # the stored Hessian: every token seen
            H_tr.mul_(n_tr / (n_tr + n_va)).add_(st_val.acc[kind].hessian(), alpha=n_va / (n_tr + n_va))
        tensors[f"{kind}.H"] = pack_sym(H_tr).float().cpu().contiguous()
        tensors[f"{kind}.order"] = res.order.to(torch.int32).cpu().contiguous()
        entry[kind] = {"widths": widths, "val_error": [errs[nk] for nk in kept_levels],
                       "train_loss": [float(res.loss[n_groups - nk]) for nk in kept_levels],
                       "module_energy": meter.energy(),
                       "residual_energy": st_val.res[kind] / max(st_val.n_res[kind], 1),
                       "group_size": gs, "n_groups": n_groups, "tokens_train": n_tr, "tokens_val": n_va}
        del meter, H_tr
        if sparse_levels:
            H_slots = [H.double() for H in st_train.slot_hessians(block, kind)]
            entry[kind]["sparse"] = {"levels": sparse_levels, "val_error": _sparse_errors(
                block, adapter, kind, sparse_levels, H_slots, val, cfg.damp)}
            alias = {j: j0 for (k, j), j0 in st_train.alias.items() if k == kind}
            if alias:
                entry[kind]["slot_alias"] = {str(j): j0 for j, j0 in sorted(alias.items())}
            for j, Hs in enumerate(H_slots[:-1]):                    # the last linear is the consumer: kind.H
                if j in alias:
                    continue
                if val is not train:
                    Hs = (Hs * n_tr + st_val.slot_acc[(kind, j)].hessian().double() * n_va) / (n_tr + n_va)
                tensors[f"{kind}.H_slot{j}"] = pack_sym(Hs).float().cpu().contiguous()
    return tensors, entry, out_train, out_val


def levels_for(prof: LatencyProfile, shape, cfg: PlanConfig) -> dict:
    """What to score: every attention unit count, the FFN widths the profile timed, and (CPU, asked for) the
    CSR sparsity levels it timed."""
    levels = {"attn": list(range(shape.attn_units + 1)), "ffn": prof.times("ffn").widths}
    sparse = sorted({float(lv) for s in prof.sparse.values() for lv, k in zip(s["levels"], s["kernels"]) if k == "csr"})
    if cfg.sparse and sparse and cfg.device == "cpu":
        levels["sparse"] = sparse          # only when asked for, so a structured-only database keeps its identity
    return levels


def build_for_plan(ck, model, prof: LatencyProfile, cfg: PlanConfig, batches: list[dict], calib_hash: str, db_dir,
                   progress: bool = True, group=None) -> Database:
    """The database a plan of checkpoint `ck` (loaded as `model`) needs for profile `prof`, built or resumed
    (`group`: across the ranks of a torch.distributed job)."""
    identity = {"model": ck.fingerprint, "calibration": calib_hash}
    return build(model, ck.adapter, batches, db_dir, levels_for(prof, ck.shape, cfg), cfg.database, identity,
                 progress, group)
