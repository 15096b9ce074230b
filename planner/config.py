"""Every default of the planner lives here, checked in __post_init__; the CLI only fills these in."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import PlannerError

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise PlannerError(msg)


@dataclass(frozen=True)
class ProfileConfig:
    batch_size: int = 8
    seq_len: int = 128
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None      # CPU threads; None = all cores this process may use
    ffn_step: int = 32              # FFN width grid: multiples of this (kernel-friendly), plus 0 and the dense width
    method: str = "model"           # "model": time modules inside the running model; "module": alone
    warmup: int = 1
    reps: int = 2                   # dense/variant ABBA pairs per variant and round (module method: calls)
    rounds: int = 4                 # interleaved rounds over all options (drift hits every option alike)
    smooth: int = 4                 # de-noise module curves over ±this many grid points (FFN; ≤2 for heads); 0: off
    n_mixed: int = 8                # random mixed architectures timed to fit and check the additive model

    def __post_init__(self):
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.seq_len >= 1, "--seq-len must be >= 1")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")
        _check(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}")
        _check(self.threads is None or self.threads >= 1, "--threads must be >= 1")
        _check(self.ffn_step >= 1, "--ffn-step must be >= 1")
        _check(self.method in ("model", "module"), "--method must be 'model' or 'module'")
        _check(self.reps >= 1 and self.warmup >= 0 and self.rounds >= 1, "reps/rounds must be >= 1")
        _check(self.n_mixed >= 0, "--n-mixed must be >= 0")
        _check(self.smooth >= 0, "--smooth must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PlanConfig:
    targets: tuple[float, ...] = (2.0,)
    calib_path: str | None = None   # one passage per line; None = the corpus shipped with the package
    n_calib: int = 1024             # passages used (the first n after a fixed shuffle)
    calib_max_len: int = 128        # tokens per passage
    calib_batch: int = 32
    val_fraction: float = 0.25      # share of calibration passages held back to score the errors
    damp: float = 0.01              # OBS dampening, relative to mean(diag H)
    error_norm: str = "residual"    # "residual": relative to the residual stream the module writes into;
                                    # "module": ZipLM's ‖ΔWx‖²/‖Wx‖²
    sequential: bool = True         # at apply: re-fit kept weights on inputs from the already-compressed layers
    n_buckets: int = 10_000
    device: str = "cpu"
    allow_other_machine: bool = False

    def __post_init__(self):
        _check(len(self.targets) >= 1, "give at least one --speedup target")
        _check(all(t > 1.0 for t in self.targets), "every --speedup target must be > 1 (e.g. 2 for 2x faster)")
        _check(self.n_calib >= 8, "--n-calib must be >= 8")
        _check(0.0 <= self.val_fraction < 0.9, "--val-fraction must be in [0, 0.9)")
        _check(self.damp > 0, "--damp must be > 0")
        _check(self.error_norm in ("residual", "module"), "--error-norm must be 'residual' or 'module'")
        _check(self.n_buckets >= 100, "--buckets must be >= 100")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VerifyConfig:
    batch_size: int = 8
    seq_len: int = 128
    threads: int | None = None
    device: str = "cpu"
    reps: int = 15                  # interleaved dense/compressed pairs
    warmup: int = 1
    text_path: str | None = None    # held-out text; None = the held-out corpus shipped with the package
    n_text: int = 512
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        _check(self.batch_size >= 1 and self.seq_len >= 1, "--batch-size and --seq-len must be >= 1")
        _check(self.reps >= 3, "--reps must be >= 3")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")
