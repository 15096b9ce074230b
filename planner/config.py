"""Every default of the planner lives here, checked in __post_init__.

Each field carries its help text (and, where the flag is not just the field's name, its flag) in the field's
metadata; the CLI generates its options from these fields (cli.py), so every setting has a flag, the CLI and the
Python API cannot disagree on a default, and an error message can name the flag a user types.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from .errors import PlannerError

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")
REFITS = ("stream", "module")       # apply's sequential refit (stages/apply.py)
MODES = ("prefill", "decode", "score")      # stages/regimes.py says what one timed call of each is


def opt(default, help: str, **meta):
    """A config field with its CLI help. meta: flag (the option name when it is not the field's), short ("-b"),
    choices, type (for fields whose default is None), multiple (repeatable), invert (a boolean set by a flag
    that means its opposite, e.g. --sparse-only for structured=False)."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **meta}, **kw)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise PlannerError(msg)


class _Config:
    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ProfileConfig(_Config):
    batch_size: int = opt(8, "sequences per timed call", short="-b")
    seq_len: int = opt(128, "prompt length (prefill) or KV-cache length (decode)", short="-s")
    mode: str = opt("prefill", "latency regime: prefill (a forward; causal LMs: generate()'s prompt pass), decode "
                    "(one new token per sequence against a KV cache) or score (causal LMs: all logits of the "
                    "sequence)", choices=MODES)
    device: str = opt("cpu", "where the model is timed", choices=DEVICES)
    dtype: str = opt("float32", "weights and activations", choices=DTYPES)
    threads: int | None = opt(None, "CPU threads (default: all this process may use)", type=int)
    ffn_step: int = opt(32, "FFN widths timed: multiples of this (kernel-friendly), plus 0 and the dense width")
    ffn_levels: int = opt(48, "at most this many FFN widths: a wider FFN is timed at a multiple of --ffn-step "
                          "(the 7B shape's 11008 at 256)")
    method: str = opt("model", "time each option inside the running model, or the module alone (encoders)",
                      choices=("model", "module"))
    decode_steps: int = opt(16, "decode: greedy steps of the generation loop that is one timed call (per-step times "
                            "are stored)")
    warmup: int = opt(1, "untimed calls before timing each model")
    # 1 (was 2): the default encoder's profile took 2.8 min instead of 6.0 on 2 cores, and the main job's plans
    # still measured within 3% of their predictions (the de-noised curves pool neighbouring widths; the closed
    # loop measures every plan): +0.7/+1.6/-2.9% and +2.6/+3.0/+1.8% at 1.5x/2x/3x in two runs, against
    # +0.4/-1.6/-1.6% at 2 pairs
    reps: int = opt(1, "dense/variant pairs per variant and round, in alternating order (--method module: calls)")
    rounds: int = opt(4, "interleaved rounds over all options (drift hits every option alike)")
    smooth: int = opt(4, "de-noise module time curves over +-N grid points (FFN; <= 2 for heads); 0: as measured")
    n_mixed: int = opt(8, "random mixed architectures timed to fit and check the latency model (0: none)")
    sparsity: tuple[float, ...] = opt(tuple, "also time every module on the sparse kernel at these sparsities, "
                                      "e.g. 0.5,0.9,0.95 or repeated (CPU: CSR; CUDA adds 2:4)", type=float,
                                      multiple=True, metavar="LEVELS")
    # 2 pairs x 2 rounds once put a 95% CSR FFN 25% off what it measured later: sparse kernels time noisier
    sparse_reps: int = opt(6, "dense/sparse ABBA pairs per sparse level and round")
    noise_bound: float = opt(0.02, "repeat timing a variant until its ratio to the dense model is known to +-this "
                             "(95% interval), within --extra-minutes")
    # 0.5 (was 1): the main job, 15.4 min on a slow day at 1, needs the margin; its plans are measured by the
    # closed loop and verify either way (docs/results.md gives the predictions' errors at each setting)
    extra_minutes: float = opt(0.5, "time budget for those repeats (0: the fixed rounds only)")

    def __post_init__(self):
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.seq_len >= 1, "--seq-len must be >= 1")
        _check(self.mode in MODES, f"--mode must be one of {', '.join(MODES)}")
        _check(self.method == "model" or self.mode == "prefill", "--mode decode is timed with --method model")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")
        _check(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}")
        _check(self.threads is None or self.threads >= 1, "--threads must be >= 1")
        _check(self.ffn_step >= 1, "--ffn-step must be >= 1")
        _check(self.ffn_levels >= 2, "--ffn-levels must be >= 2")
        _check(self.decode_steps >= 1, "--decode-steps must be >= 1")
        _check(self.method in ("model", "module"), "--method must be 'model' or 'module'")
        _check(self.reps >= 1 and self.sparse_reps >= 1 and self.rounds >= 1,
               "--reps, --sparse-reps and --rounds must be >= 1")
        _check(self.warmup >= 0, "--warmup must be >= 0")
        _check(0 < self.noise_bound < 1 and self.extra_minutes >= 0, "--noise-bound in (0, 1), --extra-minutes >= 0")
        _check(self.n_mixed >= 0, "--n-mixed must be >= 0")
        _check(self.smooth >= 0, "--smooth must be >= 0")
        _check(all(0.0 < x < 1.0 for x in self.sparsity), "--sparsity levels must be in (0, 1), e.g. 0.5,0.9")
        _check(not self.sparsity or self.method == "model", "--sparsity is timed inside the running model: use it "
                                                            "with --method model")


@dataclass(frozen=True)
class PlanConfig(_Config):
    targets: tuple[float, ...] = opt(lambda: (2.0,), "speedup target over the dense model; repeat for several",
                                     flag="speedup", short="-x", multiple=True, type=float)
    calib_path: str | None = opt(None, "calibration text, one passage per line (default: the shipped corpus)",
                                 flag="calib", type=str, path=True)
    n_calib: int = opt(2048, "calibration passages used (the first n after a fixed shuffle)")
    calib_max_len: int = opt(128, "tokens per calibration passage (causal LMs: per window)")
    calib_batch: int = opt(32, "calibration passages per forward")
    val_fraction: float = opt(0.25, "share of calibration passages held back to score the errors")
    damp: float = opt(0.01, "OBS dampening, relative to mean(diag H)")
    error_norm: str = opt("residual", "normalise each module's error by the residual stream it writes into, or "
                          "by its own output (ZipLM)", choices=("residual", "module"))
    sequential: bool = opt(True, "at apply: refit kept weights on inputs from the already-compressed layers")
    refit: str = opt("stream", "what the sequential refit matches: 'stream' refits every module's input linears "
                     "to the dense pre-activations and a shrunk module's output linear to the dense residual stream "
                     "after it; 'module' only the output linear, to the dense module's output",
                     choices=REFITS)
    sparse: bool = opt(True, "also offer the sparse levels the profile timed (profile --sparsity), per module")
    structured: bool = opt(True, "offer only the full width or a sparse level per module (the architecture is "
                           "kept)", flag="sparse-only", invert=True)
    search: int = opt(64, "end-to-end search: at most this many candidate plans per target, each deployed as "
                      "apply would and scored on held-back calibration text (0: the DP's plan); resumable")
    search_minutes: float | None = opt(0.5, "time budget of the search per target (minutes)", type=float)
    search_repairs: int = opt(2, "closed loop: times a searched plan that measured outside the tolerance is "
                                 "repaired to the corrected budget and timed again (0: the DP's plan is kept)")
    n_buckets: int = opt(10_000, "time buckets of the DP (its resolution)", flag="buckets")
    tolerance: float = opt(0.02, "closed loop: a plan is kept when its measured speedup is within this share of "
                           "its target")
    slow_guard: float = opt(0.5, "closed loop: a plan measured slower than its target is kept only within this "
                            "share of --tolerance (verify's band is the whole tolerance: the rest absorbs the drift "
                            "between the loop's timing and verify's)", type=float)
    loop_rounds: int = opt(4, "closed loop: rounds of timing the chosen architecture, correcting the latency "
                           "model and solving again (0: trust the profile, open loop)")
    device: str = opt("cpu", "where the OBS database and the search run", choices=DEVICES)
    offload: bool = opt(False, "keep the model in CPU memory and move one block at a time to --device (large "
                        "models)")
    allow_other_machine: bool = opt(False, "accept a profile measured on another machine")
    distributed: bool = opt(False, "under torchrun: split the OBS database's blocks across the processes (NCCL "
                            "on GPUs, one per process; gloo on CPUs); rank 0 solves and writes the plans")

    def __post_init__(self):
        _check(len(self.targets) >= 1, "give at least one --speedup target")
        _check(all(t > 1.0 for t in self.targets), "every --speedup target must be > 1 (e.g. 2 for 2x faster)")
        _check(self.n_calib >= 8, "--n-calib must be >= 8")
        _check(self.calib_max_len >= 2 and self.calib_batch >= 1, "--calib-max-len >= 2 and --calib-batch >= 1")
        _check(0.0 <= self.val_fraction < 0.9, "--val-fraction must be in [0, 0.9)")
        _check(self.damp > 0, "--damp must be > 0")
        _check(self.error_norm in ("residual", "module"), "--error-norm must be 'residual' or 'module'")
        _check(self.refit in REFITS, f"--refit must be one of {REFITS}")
        _check(self.n_buckets >= 100, "--buckets must be >= 100")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")
        _check(self.search >= 0, "--search must be >= 0")
        _check(self.structured or self.sparse, "--sparse-only needs the sparse levels: drop --no-sparse")
        _check(self.search_minutes is None or self.search_minutes > 0, "--search-minutes must be > 0")
        _check(0 < self.tolerance < 0.5, "--tolerance must be in (0, 0.5), e.g. 0.02")
        _check(0 <= self.slow_guard <= 1, "--slow-guard must be in [0, 1], e.g. 0.5")
        _check(self.loop_rounds >= 0, "--loop-rounds must be >= 0")
        _check(self.search_repairs >= 0, "--search-repairs must be >= 0")

    @property
    def database(self) -> "DatabaseConfig":
        return DatabaseConfig(self.damp, self.val_fraction, self.device, self.offload)

    def calibration_record(self) -> dict:
        """The settings a plan records about its calibration, so that `apply` refits on the same text."""
        from . import data  # the shipped files a plan without --calib was calibrated on
        return {"calib_path": self.calib_path, **({} if self.calib_path else
                                                  {"calib_default": list(data.DEFAULT_CALIBRATION)}),
                "n_calib": self.n_calib, "calib_max_len": self.calib_max_len,
                "calib_batch": self.calib_batch, "damp": self.damp, "val_fraction": self.val_fraction,
                "weights": "sequential" if self.sequential else "obs", "refit": self.refit, "sparse": self.sparse,
                **({} if self.structured else {"structured": False})}


@dataclass(frozen=True)
class DatabaseConfig(_Config):
    """What the OBS database build takes from the PlanConfig (`PlanConfig.database`)."""
    damp: float = PlanConfig.__dataclass_fields__["damp"].default
    val_fraction: float = PlanConfig.__dataclass_fields__["val_fraction"].default
    device: str = "cpu"
    offload: bool = False      # the model stays in CPU memory; each block visits `device` only while processed
    # greedy OBS pass, its damped inverse (float64 if a float32 Cholesky fails) and held-out scoring: float32 kept
    # the sets' loss within 3e-4 of float64 on a 2048 x 5632 FFN (benchmarks/bench_obs_precision.py)
    precision: str = "float32"
    # FFN neurons removed per greedy step while many remain (obs.group_obs per_step): 16 cut that FFN's pass 3x,
    # the kept sets' loss within 3e-4 of one at a time (the same benchmark)
    per_step: int = 16

    def to_dict(self):                  # what the database's identity holds
        return {"damp": self.damp, "val_fraction": self.val_fraction, "precision": self.precision,
                "per_step": self.per_step}


@dataclass(frozen=True)
class ApplyConfig(_Config):
    """Where `apply` fits the kept weights (the sequential refit runs a dense and a compressed copy of each block
    on the calibration text: on a GPU that is where the time goes)."""
    device: str = opt("cpu", "where the weights are refitted and the model is shrunk", choices=DEVICES)
    offload: bool = opt(False, "keep the model in CPU memory and move one block at a time to --device while it is "
                        "refitted (large models)")

    def __post_init__(self):
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")


@dataclass(frozen=True)
class VerifyConfig(_Config):
    batch_size: int = opt(8, "sequences per timed call", short="-b")
    seq_len: int = opt(128, "prompt length (prefill) or KV-cache length (decode)", short="-s")
    threads: int | None = opt(None, "CPU threads (default: the profile's, else all available)", type=int)
    device: str = opt("cpu", "where both models run", choices=DEVICES)
    reps: int = opt(15, "interleaved dense/compressed timing pairs (at least)")
    max_reps: int = opt(60, "more pairs, up to this many, until the speedup is known to +-halfwidth")
    halfwidth: float = opt(0.01, "wanted half-width of the measured speedup's 95% interval (relative)")
    warmup: int = opt(1, "untimed calls of each model before timing")
    text_path: str | None = opt(None, "held-out text, one passage per line (default: the shipped held-out corpus)",
                                flag="text", type=str, path=True)
    n_text: int = opt(512, "held-out passages scored")
    mode: str | None = opt(None, "latency regime (default: the profile's or the plan's)", choices=MODES, type=str)
    decode_steps: int | None = opt(None, "decode: greedy steps per timed generation loop (default: the profile's, "
                                   "else profile --decode-steps' default)", type=int)
    ppl_window: int = opt(128, "causal LMs: tokens per perplexity window")

    def __post_init__(self):
        _check(self.batch_size >= 1 and self.seq_len >= 1, "--batch-size and --seq-len must be >= 1")
        _check(self.mode in (None, *MODES), f"--mode must be one of {', '.join(MODES)}")
        _check(self.decode_steps is None or self.decode_steps >= 1, "--decode-steps must be >= 1")
        _check(self.ppl_window >= 2, "--ppl-window must be >= 2")
        _check(self.reps >= 3, "--reps must be >= 3")
        _check(self.max_reps >= self.reps and 0 < self.halfwidth < 1, "--max-reps >= --reps, --halfwidth in (0, 1)")
        _check(self.warmup >= 0, "--warmup must be >= 0")
        _check(self.n_text >= 2, "--n-text must be >= 2")
        _check(self.threads is None or self.threads >= 1, "--threads must be >= 1")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")


DEFAULT_RECOVER_MINUTES = 10.0


@dataclass(frozen=True)
class RecoverConfig(_Config):
    """Distillation of a compressed student from its dense teacher (DESIGN §5); see planner/stages/recover.py."""
    data_path: str | None = opt(None, "training text, one passage per line, optionally 'text<TAB>label' (default: "
                                "the shipped calibration and distillation corpora; never the held-out text)",
                                flag="data", type=str, path=True)
    minutes: float | None = opt(None, f"training-time budget; sets the step count (default "
                                f"{DEFAULT_RECOVER_MINUTES:g} unless --steps is given)", type=float)
    steps: int | None = opt(None, "a fixed number of optimizer steps instead of a time budget", type=int)
    batch_size: int = opt(16, "passages per micro-batch (small batches: more updates per minute)", short="-b")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_len: int = opt(128, "tokens per (augmented) training sequence")
    lr: float = opt(3e-4, "AdamW peak learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and norms)")
    warmup: float = opt(0.05, "share of the steps with linearly rising learning rate; then linear decay to 0")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: no clipping)")
    hidden_weight: float = opt(1.0, "token-level MSE of every block's output (relative to the teacher's energy)")
    logit_weight: float = opt(1.0, "KL of the head's logits (models with an LM or classification head)")
    embed_weight: float = opt(1.0, "bare encoders: cosine distance of the pooled sentence embeddings")
    task_weight: float = opt(0.0, "cross-entropy on labels given in the data ('text<TAB>label')")
    temperature: float = opt(2.0, "temperature of the logit KL")
    concat: float = opt(0.5, "share of training sequences made of two passages joined (encoders)")
    substitute: float = opt(0.1, "share of tokens replaced by random vocabulary pieces")
    plain_epochs: int = opt(5, "epochs of the passages as they are before the joined and substituted variants "
                            "start (encoders; a 10-minute run on 2 cores makes about 5 of the shipped text)")
    val_fraction: float = opt(0.1, "passages held back for evaluation and early stopping")
    eval_every: int = opt(200, "optimizer steps between evaluations")
    patience: int = opt(3, "evaluations without an improvement of --min-delta before stopping early (0: never)")
    min_delta: float = opt(0.005, "relative improvement of the held-back loss that counts as one")
    ckpt_every: int = opt(200, "optimizer steps between resumable checkpoints")
    freeze_embeddings: bool = opt(True, "keep the teacher's input embeddings (they are not pruned)")
    dropout: bool = opt(False, "train with the model's dropout on")
    seed: int = opt(0, "seed of the data order, augmentation and held-back split")
    device: str = opt("cpu", "where training runs", choices=DEVICES)
    autocast: str = opt("auto", "training forward/backward in bfloat16: auto = where it runs natively (GPU; CPUs "
                        "with AVX512-BF16/AMX); evaluation is float32", choices=("auto", "bf16", "off"))
    threads: int | None = opt(None, "CPU threads (default: all available)", type=int)

    def __post_init__(self):
        if self.minutes is None and self.steps is None:          # the budget's default applies without --steps
            object.__setattr__(self, "minutes", DEFAULT_RECOVER_MINUTES)
        _check(self.steps is None or self.steps >= 1, "--steps must be >= 1")
        _check(self.minutes is None or self.minutes > 0, "--minutes must be > 0")
        _check(self.batch_size >= 2, "--batch-size must be >= 2")
        _check(self.grad_accum >= 1, "--grad-accum must be >= 1")
        _check(self.max_len >= 8, "--max-len must be >= 8")
        _check(self.lr > 0, "--lr must be > 0")
        _check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _check(0 <= self.warmup < 1, "--warmup must be in [0, 1)")
        _check(self.max_grad_norm >= 0, "--max-grad-norm must be >= 0")
        w = (self.hidden_weight, self.logit_weight, self.embed_weight, self.task_weight)
        _check(all(x >= 0 for x in w) and any(x > 0 for x in w),
               "--hidden-weight, --logit-weight, --embed-weight and --task-weight must be >= 0, one of them > 0")
        _check(self.temperature > 0, "--temperature must be > 0")
        _check(0 <= self.concat <= 1 and 0 <= self.substitute < 1, "--concat in [0, 1], --substitute in [0, 1)")
        _check(self.plain_epochs >= 0, "--plain-epochs must be >= 0")
        _check(0 < self.val_fraction < 0.9, "--val-fraction must be in (0, 0.9)")
        _check(self.eval_every >= 1 and self.ckpt_every >= 1, "--eval-every and --ckpt-every must be >= 1")
        _check(self.patience >= 0 and 0 <= self.min_delta < 1, "--patience >= 0, --min-delta in [0, 1)")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}")
        _check(self.autocast in ("auto", "bf16", "off"), "--autocast must be auto, bf16 or off")
        _check(self.threads is None or self.threads >= 1, "--threads must be >= 1")


@dataclass(frozen=True)
class RunConfig(_Config):
    """The main job (`planner run`): one profile, one plan per target, the uniform baseline, verify, and a short
    recovery of every planned model (rows for the one-shot and the recovered model side by side)."""
    targets: tuple[float, ...] = (1.5, 2.0, 3.0)
    profile: ProfileConfig = ProfileConfig()
    plan: PlanConfig = PlanConfig()
    verify: VerifyConfig = VerifyConfig()
    baseline: bool = True
    recover: RecoverConfig = RecoverConfig()
    # the main job's recovery budget per target (minutes; 0: one-shot models only); longer runs: `planner recover`
    recover_minutes: float = 1.0

    def __post_init__(self):
        _check(len(self.targets) >= 1, "give at least one --speedup target")
        _check(self.recover_minutes >= 0, "--recover-minutes must be >= 0 (0: no recovery)")

    @property
    def recover_config(self) -> RecoverConfig | None:
        """The recovery each planned model gets (None: one-shot only), at the profile's threads and device."""
        if not self.recover_minutes:
            return None
        return self.recover.replace(minutes=self.recover_minutes, steps=None, threads=self.profile.threads,
                                    device=self.profile.device)

    @property
    def apply_config(self) -> ApplyConfig:
        """apply on the profile's device, offloading as the plan does."""
        return ApplyConfig(device=self.profile.device, offload=self.plan.offload)

    @property
    def plan_config(self) -> PlanConfig:
        """The plan settings with the job's targets and the profile's device."""
        return self.plan.replace(targets=tuple(self.targets), device=self.profile.device)

    @property
    def verify_config(self) -> VerifyConfig:
        """verify in the regime, shape, threads and device the profile was measured in."""
        p = self.profile
        return self.verify.replace(batch_size=p.batch_size, seq_len=p.seq_len, threads=p.threads, mode=p.mode,
                                   device=p.device)
