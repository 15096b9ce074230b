"""The public API: each function opens its checkpoints and files and hands them to one stage or job.

profile → plan (database + DP, optional search) → apply → verify, recover and compress (gradual mode), run (the
whole job), report and load. The CLI calls only these. Model directories become `Checkpoint`s here, once per
call, and stages pass those along instead of paths.
"""
from __future__ import annotations

from pathlib import Path

from . import hardware, io
from .adapters.checkpoint import Checkpoint
from .config import ApplyConfig, PlanConfig, ProfileConfig, RecoverConfig, RunConfig, VerifyConfig
from .jobs import compress as compress_job
from .jobs import run as run_job
from .reporting import html
from .stages import apply as apply_stage
from .stages import plan as plan_stage
from .stages import profile as profile_stage
from .stages import recover as recover_stage
from .stages import verify as verify_stage
from .stages.calibration import calibration_batches as _calibration_batches
from .stages.database import build_for_plan
from .types import LatencyProfile, Plan, RecoverReport, VerifyReport

profile_summary = profile_stage.summary
list_profiles = profile_stage.list_profiles
plan_name = plan_stage.plan_name


def _plan(p) -> Plan:
    return p if isinstance(p, Plan) else Plan.load(p)


def profile(model_path, cfg: ProfileConfig = ProfileConfig(), out=None, root="profiles", progress=True):
    """Measure a latency profile on this machine; write it to `out` (default under `root`). Returns (profile, path)."""
    if out:
        io.check_out_file(out)
    p = profile_stage.profile(Checkpoint.open(model_path), cfg, progress)
    path = Path(out) if out else profile_stage.default_profile_path(p, root)
    p.save(path)
    return p, path


def plan(model_path, profile_path, cfg: PlanConfig, out_dir, progress=True, db_dir=None) -> list[Plan]:
    """Build (or reuse) the OBS database (under out_dir/db, or db_dir) and write one Plan per target:
    out_dir/plan-<t>x.json."""
    return plan_stage.plan(Checkpoint.open(model_path), LatencyProfile.load(profile_path), profile_path, cfg,
                           out_dir, progress, db_dir)


def build_database(model_path, prof: LatencyProfile, cfg: PlanConfig, db_dir, progress=True):
    """The OBS database `plan` builds (or resumes) for this model, profile and calibration text."""
    ck = Checkpoint.open(model_path)
    hardware.check_device(cfg.device)
    batches, calib_hash = _calibration_batches(ck, cfg.calib_path, cfg.n_calib, cfg.calib_max_len, cfg.calib_batch)
    return build_for_plan(ck, ck.load("cpu" if cfg.offload else cfg.device), prof, cfg, batches, calib_hash, db_dir,
                          progress)


def calibration_batches(model_path, calib_path, n, max_len, batch_size):
    """(batches, hash) of the calibration text as `plan` makes them for this model."""
    return _calibration_batches(Checkpoint.open(model_path), calib_path, n, max_len, batch_size)


def apply(model_path, plan_path_or_plan, out_dir, calib_path=None, weights: str | None = None, select: str = "obs",
          progress=True, check_fingerprint=True, cfg: ApplyConfig = ApplyConfig()):
    """Compress `model_path` to the plan and write a portable HF directory (refitting on cfg.device, offloading
    blocks with cfg.offload). Returns (out_dir, model)."""
    return apply_stage.apply(Checkpoint.open(model_path), _plan(plan_path_or_plan), out_dir, calib_path, weights,
                             select, progress, check_fingerprint, cfg)


def load(path, device="cpu"):
    """Load a (compressed or dense) checkpoint written by planner or Hugging Face."""
    return Checkpoint.open(path).load(device)


def verify(dense_path, compressed_path, cfg: VerifyConfig = VerifyConfig(), profile_path=None, out=None,
           dense_model=None, progress=True) -> VerifyReport:
    """Measure the compressed model against the dense one in the regime of its profile (or cfg.mode):
    interleaved speedup, the profile's prediction for its architecture, and quality on held-out text."""
    prof = LatencyProfile.load(profile_path) if profile_path else None
    return verify_stage.verify(Checkpoint.open(dense_path), Checkpoint.open(compressed_path), cfg, prof, out,
                               dense_model, progress)


def recover(compressed_path, teacher_path, cfg: RecoverConfig = RecoverConfig(), out=None, progress=True,
            callback=None) -> RecoverReport:
    """Distil the compressed model at `compressed_path` from the dense `teacher_path`; write the recovered model
    to `out` (a portable HF directory like `apply` writes, with `recover.json`). Resumable; a finished run is
    not redone. Training here slows later timings in this process by a few percent: to verify afterwards in the
    same process, recover through `planner.stages.recover.Apart` (a child process) as the jobs do."""
    return recover_stage.recover(Checkpoint.open(compressed_path), Checkpoint.open(teacher_path), cfg, out,
                                 progress, callback)


def apply_recover(model_path, plan_path_or_plan, out, recover_cfg: RecoverConfig = RecoverConfig(),
                  calib_path=None, weights=None, progress=True, apply_cfg: ApplyConfig = ApplyConfig()) -> RecoverReport:
    """`apply` then `recover` with `model_path` as the teacher (resumable like `recover`)."""
    return recover_stage.apply_recover(Checkpoint.open(model_path), _plan(plan_path_or_plan), out, recover_cfg,
                                       calib_path, weights, progress, apply_cfg)


def compress(model_path, profile_path, out_dir, plan_cfg: PlanConfig = PlanConfig(),
             recover_cfg: RecoverConfig | None = RecoverConfig(), verify_cfg: VerifyConfig | None = None,
             progress=True):
    """Gradual compression: one member per target, each planned, applied and recovered from the previous one
    (recover_cfg=None: no distillation). Returns the family table."""
    return compress_job.compress(model_path, profile_path, out_dir, plan_cfg, recover_cfg, verify_cfg, progress)


def run(model_path=None, out_dir="runs/minilm", cfg: RunConfig = RunConfig(), quiet: bool = False):
    """The main job: profile, plan every target, apply (with the uniform baseline), verify, results table and
    report. model_path None: the embedded all-MiniLM-L6-v2. Resumes from what is already in out_dir."""
    return run_job.run(model_path or run_job.default_model(), out_dir, cfg, quiet)


def report(run_dir, out_dir=None, progress=True) -> Path:
    """Render a run's profile, plans and verify reports as an HTML page with PNG plots; returns index.html."""
    if out_dir:
        io.check_out_dir(out_dir, replaceable=lambda d: (d / "index.html").exists())
    return html.write(run_dir, out_dir, progress=progress)
