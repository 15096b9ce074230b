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
    seq_len: int = 128              # prompt length (prefill) or KV-cache length (decode)
    mode: str = "prefill"           # "prefill" or "decode" (causal LMs: one new token per sequence); regimes.py
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
    sparsity: tuple[float, ...] = ()  # sparse-kernel levels to time per module (CSR; CUDA adds 2:4); () = none
    sparse_reps: int = 6            # ABBA pairs per sparse variant and round: sparse kernels time noisier
                                    # (2 pairs x 2 rounds put a 95% CSR FFN 25% off what it measured later)

    def __post_init__(self):
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.seq_len >= 1, "--seq-len must be >= 1")
        _check(self.mode in ("prefill", "decode"), "--mode must be 'prefill' or 'decode'")
        _check(self.method == "model" or self.mode == "prefill", "--mode decode is timed with --method model")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")
        _check(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}")
        _check(self.threads is None or self.threads >= 1, "--threads must be >= 1")
        _check(self.ffn_step >= 1, "--ffn-step must be >= 1")
        _check(self.method in ("model", "module"), "--method must be 'model' or 'module'")
        _check(self.reps >= 1 and self.sparse_reps >= 1 and self.warmup >= 0 and self.rounds >= 1,
               "reps/rounds must be >= 1")
        _check(self.n_mixed >= 0, "--n-mixed must be >= 0")
        _check(self.smooth >= 0, "--smooth must be >= 0")
        _check(all(0.0 < x < 1.0 for x in self.sparsity), "--sparsity levels must be in (0, 1), e.g. 0.5,0.9")

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
    sparse: bool = True             # also offer the DP the sparse levels the profile timed (SparseGPT weights)
    structured: bool = True         # offer kept widths; False (--sparse-only): full width or a sparse level
    search: int = 0                 # SPDY search: candidates per target scored by stitched calibration loss (0: off)
    search_minutes: float | None = None   # stop generating candidates after this long (per target)
    n_buckets: int = 10_000
    device: str = "cpu"
    offload: bool = False           # keep the model in CPU memory, move one block at a time to `device`
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
        _check(self.search >= 0, "--search must be >= 0")
        _check(self.structured or self.sparse, "--sparse-only needs the sparse levels: drop --no-sparse")
        _check(self.search_minutes is None or self.search_minutes > 0, "--search-minutes must be > 0")

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
    mode: str | None = None         # "prefill" / "decode"; None = the regime of the profile or of the plan
    decode_steps: int = 16          # decode: greedy steps per timed generation loop
    ppl_window: int = 128           # causal LMs: tokens per perplexity window
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        _check(self.batch_size >= 1 and self.seq_len >= 1, "--batch-size and --seq-len must be >= 1")
        _check(self.mode in (None, "prefill", "decode"), "--mode must be 'prefill' or 'decode'")
        _check(self.decode_steps >= 1 and self.ppl_window >= 2, "--decode-steps >= 1 and --ppl-window >= 2")
        _check(self.reps >= 3, "--reps must be >= 3")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")


@dataclass(frozen=True)
class RecoverConfig:
    """Distillation of a compressed student from its dense teacher (DESIGN §5); see planner/recover.py."""
    data_path: str | None = None    # training text, one passage per line (optionally "text<TAB>label");
                                    # None = the shipped calibration and distillation corpora. Never the
                                    # held-out text.
    minutes: float | None = 10.0    # training-time budget (loop + evaluations, not loading); sets the step count
    steps: int | None = None        # fixed number of optimizer steps instead of a time budget
    batch_size: int = 16            # passages per micro-batch (small batches: more updates per minute)
    grad_accum: int = 1             # micro-batches per optimizer step
    max_len: int = 128              # tokens per (augmented) training sequence
    lr: float = 1e-3                # AdamW peak learning rate
    weight_decay: float = 0.01
    warmup: float = 0.05            # share of the steps with linearly rising lr; then linear decay to 0
    max_grad_norm: float = 1.0      # 0: no clipping
    hidden_weight: float = 1.0      # token-level MSE of every block's output (relative to the teacher's energy)
    logit_weight: float = 1.0       # KL of the head's logits (models with an LM / classification head)
    embed_weight: float = 1.0       # bare encoders: cosine distance of the pooled sentence embeddings
    task_weight: float = 0.0        # cross-entropy on labels given in the data ("text<TAB>label")
    temperature: float = 2.0        # of the logit KL
    concat: float = 0.5             # share of training sequences made of two passages joined
    substitute: float = 0.1         # share of tokens replaced by random vocabulary pieces
    val_fraction: float = 0.1       # passages held back for evaluation and early stopping
    eval_every: int = 200           # optimizer steps between evaluations
    patience: int = 0               # evaluations without improvement before stopping early; 0: never
    ckpt_every: int = 200           # optimizer steps between resumable checkpoints
    freeze_embeddings: bool = True  # the embedding layer is not pruned: keep the teacher's
    dropout: bool = False           # train with the model's dropout on
    seed: int = 0
    device: str = "cpu"
    autocast: str = "auto"          # training forward/backward in bfloat16: "bf16", "off", or "auto" = bf16 where
                                    # it runs natively (GPU; CPUs with AVX512-BF16/AMX); evaluation is float32
    threads: int | None = None

    def __post_init__(self):
        _check(self.steps is None or self.steps >= 1, "--steps must be >= 1")
        _check(self.minutes is None or self.minutes > 0, "--minutes must be > 0")
        _check(self.steps is not None or self.minutes is not None, "give --steps or --minutes")
        _check(self.batch_size >= 2, "--batch-size must be >= 2")
        _check(self.grad_accum >= 1, "--grad-accum must be >= 1")
        _check(self.max_len >= 8, "--max-len must be >= 8")
        _check(self.lr > 0, "--lr must be > 0")
        _check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _check(0 <= self.warmup < 1, "--warmup must be in [0, 1)")
        _check(self.max_grad_norm >= 0, "--max-grad-norm must be >= 0")
        w = (self.hidden_weight, self.logit_weight, self.embed_weight, self.task_weight)
        _check(all(x >= 0 for x in w) and any(x > 0 for x in w), "loss weights must be >= 0, one of them > 0")
        _check(self.temperature > 0, "--temperature must be > 0")
        _check(0 <= self.concat <= 1 and 0 <= self.substitute < 1, "--concat in [0, 1], --substitute in [0, 1)")
        _check(0 < self.val_fraction < 0.9, "--val-fraction must be in (0, 0.9)")
        _check(self.eval_every >= 1 and self.ckpt_every >= 1, "--eval-every and --ckpt-every must be >= 1")
        _check(self.patience >= 0, "--patience must be >= 0")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")
        _check(self.autocast in ("auto", "bf16", "off"), "--autocast must be auto, bf16 or off")
        _check(self.threads is None or self.threads >= 1, "--threads must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)
