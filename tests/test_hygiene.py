"""What importing and calling planner leaves behind: nothing global. The registry refuses a second adapter for a
model type; thread counts and transformers' logging settings are restored after each call."""
import os
import subprocess
import sys

import pytest
import torch
import transformers

import planner
from planner.adapters import get_adapter, register, unregister
from planner.adapters.checkpoint import quiet_transformers
from planner.config import ProfileConfig, VerifyConfig


def test_importing_planner_changes_no_global_state():
    code = ("import os, transformers; before = transformers.utils.logging.get_verbosity(); import planner; "
            "assert 'HF_HUB_OFFLINE' not in os.environ, 'planner set HF_HUB_OFFLINE'; "
            "assert transformers.utils.logging.get_verbosity() == before, 'planner changed the logging level'; "
            "assert transformers.utils.logging.is_progress_bar_enabled()")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-1500:]


def test_quiet_transformers_restores_the_users_settings():
    log = transformers.utils.logging
    log.set_verbosity_info()
    try:
        with quiet_transformers():
            assert log.get_verbosity() == log.ERROR and not log.is_progress_bar_enabled()
        assert log.get_verbosity() == log.INFO and log.is_progress_bar_enabled()
    finally:
        log.set_verbosity_warning()


def test_a_model_type_gets_one_adapter():
    bert = get_adapter("bert")
    with pytest.raises(ValueError, match="already has an adapter"):
        register(type("Other", (type(bert),), {})())
    assert get_adapter("bert") is bert
    register(bert)                                               # the same adapter again is harmless
    unregister("electra")
    try:
        with pytest.raises(planner.errors.UnsupportedModel, match="unsupported model_type 'electra'"):
            get_adapter("electra")
    finally:
        _REG = planner.adapters._REGISTRY
        _REG["electra"] = bert


def test_thread_count_is_restored_after_each_call(tiny_bert, tmp_path, heldout_file):
    torch.set_num_threads(1)
    planner.profile(tiny_bert, ProfileConfig(batch_size=2, seq_len=8, rounds=1, n_mixed=0, threads=2),
                    out=tmp_path / "p.json", progress=False)
    assert torch.get_num_threads() == 1
    planner.verify(tiny_bert, tiny_bert, VerifyConfig(batch_size=2, seq_len=8, reps=3, threads=2, n_text=8,
                                                      text_path=str(heldout_file)), progress=False)
    assert torch.get_num_threads() == 1


def test_the_allocator_is_fixed_on_first_timing_not_on_import():
    """Importing planner leaves malloc alone; the first timed call fixes glibc's thresholds (steady_allocator) and
    every report says so; PLANNER_ALLOCATOR=default opts out."""
    code = ("import planner, planner.hardware as h, planner.timing as t; assert h.allocator() == 'default'; "
            "t.time_calls(lambda: None, 1); print(h.allocator()); "
            "assert h.steady_allocator() == h.allocator(); print(h.describe()['allocator'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PLANNER_ALLOCATOR"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-1500:]
    first, described = r.stdout.split("\n")[:2]
    if sys.platform.startswith("linux"):
        assert first.startswith("glibc, mmap and trim thresholds fixed") and described == first
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "PLANNER_ALLOCATOR": "default"})
    assert r.returncode == 0 and r.stdout.split("\n")[0] == "default", r.stderr[-1500:]
