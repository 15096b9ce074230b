"""Results as frozen dataclasses with a schema version and a JSON round trip.

Each type writes {"kind": ..., "schema_version": ..., ...} with sorted keys, and reads back only the
version it knows, so a stale or foreign file fails with a message instead of a KeyError.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import io
from .errors import PlannerError

KINDS = ("attn", "ffn")  # the prunable structure kinds of a transformer block, in forward order


class _JSON:
    KIND: str = ""
    SCHEMA_VERSION: int = 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kind"] = self.KIND
        d["schema_version"] = self.SCHEMA_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict, path: Any = None):
        io.check_schema(d, cls.KIND, cls.SCHEMA_VERSION, path)
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise PlannerError(f"{cls.KIND}{' in ' + str(path) if path else ''} is missing fields ({e}); "
                               f"it may be corrupted: regenerate it") from None

    def save(self, path) -> Path:
        return io.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        return cls.from_dict(io.read_json(path, cls.KIND), path)


@dataclass(frozen=True)
class ArchShape:
    """What latency depends on besides the machine: the block geometry (not the weights)."""
    family: str          # adapter family, e.g. "bert"
    hidden: int
    n_layers: int
    n_heads: int
    head_dim: int
    ffn: int
    vocab: int
    kv_heads: int = 0    # grouped-query attention: key/value heads (0: as many as query heads)

    @property
    def attn_units(self) -> int:
        """Prunable attention units per block: one KV group (its query heads and their key/value head); for
        multi-head attention a unit is one head. Plans and profiles count kept attention in these units."""
        return self.kv_heads or self.n_heads

    @property
    def key(self) -> str:
        gqa = f"g{self.kv_heads}" if self.kv_heads and self.kv_heads != self.n_heads else ""
        return (f"{self.family}-L{self.n_layers}-H{self.hidden}-A{self.n_heads}x{self.head_dim}{gqa}-F{self.ffn}"
                f"-V{self.vocab}")


@dataclass(frozen=True)
class ModuleTimes:
    """Latency of one prunable module kind at each kept width (heads for attn, neurons for ffn)."""
    widths: list[int]      # ascending; includes 0 (module removed) and the dense width
    median: list[float]    # seconds, as measured
    spread: list[float]    # seconds, (p90 - p10) / 2 of the repetitions
    model: list[float] | None = None   # seconds, de-noised and non-decreasing (latency.smooth_curve): predictions

    @property
    def monotone(self) -> list[float]:
        """The solver's view: the de-noised curve, or for a profile without one the running minimum from the
        widest down (keeping more never has to cost more)."""
        if self.model is not None:
            return [float(x) for x in self.model]
        m = np.minimum.accumulate(np.asarray(self.median)[::-1])[::-1]
        return [float(x) for x in m]

    def time_at(self, width: int, monotone: bool = True) -> float:
        if width not in self.widths:
            raise PlannerError(f"width {width} is not on the profile's grid {self.widths[:4]}...")
        src = self.monotone if monotone else self.median
        return src[self.widths.index(width)]


@dataclass(frozen=True)
class LatencyProfile(_JSON):
    KIND = "LatencyProfile"
    hardware: dict          # device, name, key, threads, torch, transformers, python
    shape: dict             # ArchShape as dict + "key"
    batch_size: int
    seq_len: int
    dtype: str
    mode: str               # "prefill" (encoders and prompt processing)
    method: str             # "model": modules timed inside the running model; "module": timed alone
    base: dict              # {"median": s, "spread": s, "reps": n}: the dense model
    constant: float         # seconds of everything not prunable: base - sum of dense module times
    modules: dict           # kind -> ModuleTimes as dict
    created: str
    notes: list = field(default_factory=list)
    # affine correction fitted on timed mixed architectures, already folded into modules/constant:
    # {"offset", "scale", "applied", "n_mixed", "max_rel_error_additive", "max_rel_error", "loo_max_rel_error",
    #  "variants": [{"layers", "measured", "additive", "predicted"}]}
    fit: dict = field(default_factory=dict)
    # seconds of the model with every prunable module removed, as timed (0: not timed). The additive model's
    # constant can come out 0 (it is noise-level on CPU), which alone would make any speedup look reachable.
    floor: float = 0.0
    # module times with every linear of the module on a sparse kernel, at full width (profile --sparsity):
    # kind -> {"levels": [sparsity], "kernels": ["csr" | "2:4"], "median": [s], "spread": [s]}
    sparse: dict = field(default_factory=dict)
    # decode: the timed call was a generation loop of this many greedy steps (times are per step); 0: one step
    decode_steps: int = 0

    def times(self, kind: str) -> ModuleTimes:
        return ModuleTimes(**self.modules[kind])

    def sparse_time(self, kind: str, level: float, kernel: str = "csr") -> float | None:
        """Seconds of `kind` at full width with its linears at sparsity `level` on `kernel` (None: not timed):
        the monotone fit where the profile has one (profiles before it: the raw medians)."""
        s = self.sparse.get(kind)
        if not s:
            return None
        for lv, k, t in zip(s["levels"], s["kernels"], s.get("model") or s["median"]):
            if abs(lv - level) < 1e-9 and k == kernel:
                return float(t)
        return None

    def sparse_crossover(self, kind: str) -> float | None:
        """The lowest timed sparsity at which `kind` on a sparse kernel is faster than dense (None: never)."""
        s = self.sparse.get(kind)
        if not s:
            return None
        dense = self.times(kind).monotone[-1]
        faster = [lv for lv, t in zip(s["levels"], s.get("model") or s["median"]) if t < dense]
        return min(faster) if faster else None

    @property
    def arch(self) -> ArchShape:
        return ArchShape(**{k: v for k, v in self.shape.items() if k != "key"})

    def predict(self, layers: list[dict]) -> float:
        """Predicted seconds of a model whose layer i keeps layers[i]['heads'] heads and ['ffn'] neurons: the
        constant plus its module times, never less than the timed all-removed model (`floor`, as max_speedup
        bounds the reach; the constant can come out 0, and a plan keeping nothing then "took" 0 s)."""
        t = self.constant
        for spec in layers:
            for kind, key in (("attn", "heads"), ("ffn", "ffn")):
                lv = spec.get(f"{kind}_sparsity", 0.0)
                st = self.sparse_time(kind, lv) if lv else None
                if lv and st is None:
                    raise PlannerError(f"the profile has no {kind} timing at sparsity {lv:g}: profile with "
                                       f"--sparsity {lv:g}")
                t += st if lv else self.times(kind).time_at(spec[key])
        return max(t, self.floor)

    def min_module_time(self, structured: bool = True) -> float:
        """Seconds of every block's modules at their fastest option: any timed width (structured) or only the full
        width and the sparse levels (--sparse-only)."""
        total = 0.0
        for kind in ("attn", "ffn"):
            mt = self.times(kind).monotone
            opts = list(mt) if structured else [mt[-1]]
            s = self.sparse.get(kind)
            if s:
                opts += list(s.get("model") or s["median"])
            total += min(opts)
        return self.arch.n_layers * total

    def max_speedup(self, min_modules: float | None = None) -> float:
        """The largest speedup a plan can reach on this profile: the dense time over the fastest model, which is
        the constant plus the least module time (`min_modules`; default every module at its fastest timed
        option), and never faster than the timed all-removed model (`floor`)."""
        if min_modules is None:
            min_modules = self.min_module_time()
        fastest = max(self.constant + min_modules, self.floor)
        return self.base["median"] / fastest if fastest > 0 else float("inf")

    def scaled(self, s: float) -> "LatencyProfile":
        """Every module time (structured and sparse) multiplied by s; the constant unchanged."""
        def mul(m):
            return {**m, **{f: [t * s for t in m[f]] for f in ("median", "spread", "model") if m.get(f)}}
        return dataclasses.replace(self, modules={k: mul(m) for k, m in self.modules.items()},
                                   sparse={k: mul(m) for k, m in self.sparse.items()})

    def corrected(self, offset: float, scale: float) -> "LatencyProfile":
        """The profile whose predictions are offset + scale × this one's (the affine correction folded into the
        module times and the constant, so the solver still sees a separable sum)."""
        return dataclasses.replace(self.scaled(scale), constant=offset + scale * self.constant)

    @property
    def conditions(self) -> str:
        h = self.hardware
        return (f"{h['name']} ({h['device']}, {h['threads']} threads), batch {self.batch_size} x seq {self.seq_len}, "
                f"{self.dtype}, {self.mode}, torch {h['torch']}")


@dataclass(frozen=True)
class Plan(_JSON):
    KIND = "Plan"
    method: str                 # "planner" or a baseline name
    target_speedup: float
    predicted_time: float       # seconds
    predicted_speedup: float
    base_time: float
    layers: list                # per layer: {"heads", "ffn", "attn_time", "ffn_time", "attn_error", "ffn_error"}
    total_error: float
    profile: dict               # identity and conditions of the profile it was solved against
    model: dict                 # {"path", "fingerprint"}
    database: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)   # settings that shaped the plan (error metric, calibration...)

    @property
    def kept(self) -> list[dict]:
        """Per layer {"heads", "ffn"} plus "attn_sparsity"/"ffn_sparsity" where a sparse option was chosen."""
        return [{"heads": int(l["heads"]), "ffn": int(l["ffn"]),
                 **{k: float(l[k]) for k in ("attn_sparsity", "ffn_sparsity") if l.get(k)}} for l in self.layers]


@dataclass(frozen=True)
class VerifyReport(_JSON):
    KIND = "VerifyReport"
    dense: str
    compressed: str
    conditions: dict            # machine, threads, batch, seq, reps, versions
    dense_time: float           # seconds, median of interleaved repetitions
    compressed_time: float
    measured_speedup: float
    predicted_speedup: float | None
    prediction_ratio: float | None  # predicted / measured
    quality: dict               # metric -> value (held-out text)
    sizes: dict                 # parameter counts
    created: str
    plan: dict = field(default_factory=dict)   # the compressed model's planner record: method, target_speedup...
    interval: list = field(default_factory=list)   # [lo, hi]: 95% interval of the measured speedup (median ratio)


@dataclass(frozen=True)
class RecoverReport(_JSON):
    """One distillation run: what was trained from what, how long, and the held-back evaluations."""
    KIND = "RecoverReport"
    student: str                # the compressed model it started from
    teacher: str                # the dense model it was distilled from
    out: str                    # the recovered model directory
    identity: dict              # fingerprints of student, teacher, data and the settings: a rerun with the same
                                # identity is not redone
    config: dict                # RecoverConfig as dict
    conditions: dict            # machine, threads, versions
    steps: int                  # optimizer steps done
    total_steps: int            # steps the schedule was made for
    stop: str                   # "schedule", "early-stop" or "time-budget"
    best_step: int              # step whose weights were kept (the best held-back evaluation)
    train_time: float           # seconds of training and evaluation (not loading, saving, checkpoints)
    wall_time: float            # seconds of the whole call, this session (a resumed run counts its last part)
    epochs: float               # passes over the training passages
    data: dict                  # path, hash, n_train, n_val passages
    before: dict                # held-back evaluation of the one-shot student (step 0)
    after: dict                 # held-back evaluation of the kept weights
    history: list               # every evaluation: step, elapsed, lr, running train losses, val losses/metrics
    spec: list                  # per-layer kept heads / FFN width (the same before and after)
    created: str
