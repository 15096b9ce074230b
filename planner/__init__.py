"""planner: speedup-constrained structured compression (SPDY / ZipLM) for Hugging Face models.

    profile(model) -> LatencyProfile        time every prunable module at every width on this machine
    plan(model, profile, cfg, out) -> Plans OBS database + DP, one plan per speedup target
    apply(model, plan, out)                 stitch corrected weights, shrink, save a portable HF directory
    verify(dense, compressed)               measured vs predicted speedup, quality on held-out text
    load(dir)                               load a compressed checkpoint
    report(run_dir)                         HTML page with plots of a run's profile, plans and verify reports
    recover(compressed, teacher, cfg, out)  distil a compressed model from its dense teacher (resumable)
    compress(model, profile, out, cfg)      gradual mode: a recovered model per target, each from the last
"""
from .api import apply, build_database, load, plan, profile, report, verify
from .config import PlanConfig, ProfileConfig, VerifyConfig
from .errors import PlannerError
from .types import LatencyProfile, Plan, VerifyReport

__all__ = ["profile", "plan", "apply", "verify", "load", "report", "build_database", "ProfileConfig", "PlanConfig",
           "VerifyConfig", "LatencyProfile", "Plan", "VerifyReport", "PlannerError"]
from .api import apply_recover, compress, recover  # noqa: E402
from .config import RecoverConfig  # noqa: E402
from .types import RecoverReport  # noqa: E402

__all__ += ["recover", "apply_recover", "compress", "RecoverConfig", "RecoverReport"]
__version__ = "0.1.0"

from .versions import warn_if_outside as _warn_if_outside  # noqa: E402

_warn_if_outside()          # one line when torch or transformers is outside the declared (tested) range
