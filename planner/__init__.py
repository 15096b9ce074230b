"""planner: speedup-constrained structured compression (SPDY / ZipLM) for Hugging Face models.

    profile(model) -> (LatencyProfile, path)  time every prunable module at every width on this machine
    plan(model, profile, cfg, out) -> Plans   OBS database + DP, one plan per speedup target
    apply(model, plan, out)                   stitch corrected weights, shrink, save a portable HF directory
    verify(dense, compressed)                 measured vs predicted speedup, quality on held-out text
    recover(compressed, teacher, cfg, out)    distil a compressed model from its dense teacher (resumable)
    compress(model, profile, out, cfg)        gradual mode: a recovered model per target, each from the last
    run(model, out, cfg)                      the whole job with the uniform baseline and a results table
    report(run_dir)                           HTML page with plots of a run's profile, plans and verify reports
    load(dir)                                 load a compressed checkpoint

The package is layered (tests/test_layering.py keeps it so): algorithms (pure numbers and tensors) <- adapters
(model families) <- stages (profile, database, plan, apply, verify, recover) <- reporting <- jobs (run,
compress) <- api <- cli. Configs, results, errors and IO are shared by all of them.
"""
from .api import apply, apply_recover, build_database, compress, load, plan, profile, recover, report, run, verify
from .config import ApplyConfig, PlanConfig, ProfileConfig, RecoverConfig, RunConfig, VerifyConfig
from .errors import PlannerError
from .reporting import plots
from .types import LatencyProfile, Plan, RecoverReport, VerifyReport
from .versions import warn_if_outside as _warn_if_outside

__all__ = ["profile", "plan", "apply", "verify", "recover", "apply_recover", "compress", "run", "report", "load",
           "build_database", "ProfileConfig", "PlanConfig", "ApplyConfig", "VerifyConfig", "RecoverConfig", "RunConfig",
           "LatencyProfile", "Plan", "VerifyReport", "RecoverReport", "PlannerError", "plots"]
__version__ = "0.1.0"

_warn_if_outside()          # one line when torch or transformers is outside the declared (tested) range
