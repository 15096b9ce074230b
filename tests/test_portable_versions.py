"""Saved compressed checkpoints of every family load without planner and generate with the KV cache, on this
transformers and on another release (the user's next upgrade, or the oldest declared one), with equal tokens.

The other release lives in another virtual environment: set PLANNER_OTHER_PYTHON to its interpreter (.ci/run
does, both ways: the newest release's pass loads with the oldest, the oldest release's pass with the newest).
"""
import os

import pytest
import torch

import planner
from planner.adapters.checkpoint import load_model, save_portable

from . import test_gpt2_opt_adapters as go
from . import test_llama_adapter as ll
from .conftest import make_tiny
from .portable import load_without_planner

FAMILIES = ("bert", "gpt2", "opt", "opt-post", "llama", "mistral", "qwen2")
OTHER = os.environ.get("PLANNER_OTHER_PYTHON")


def _compressed(family, root):
    """(saved compressed directory, the planner model it was saved from): a removed attention (where generation
    reads the cache length), a removed FFN and narrower modules."""
    src = root / f"{family}-dense"
    if family == "bert":
        make_tiny(src)
    elif family in go.CASES:
        go.make_decoder(src, family)
    else:
        ll.make_decoder(src, family)
    m, ad = load_model(src)
    if family == "bert":
        L = ad.layers(m)
        ad.shrink_(L[0], "attn", torch.tensor([], dtype=torch.long), None, m.config)
        ad.shrink_(L[0], "ffn", torch.arange(0, 128, 3), None, m.config)
        ad.shrink_(L[1], "attn", torch.tensor([1, 2]), None, m.config)
        ad.shrink_(L[1], "ffn", torch.tensor([], dtype=torch.long), None, m.config)
    elif family in go.CASES:
        go._shrink_mixed_(m, ad)
    else:
        ll._prune_for_saving_(m, ad)
    return save_portable(m, ad, src, root / family), m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("portable")
    torch.manual_seed(0)
    out = {f: _compressed(f, root) for f in FAMILIES}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 0, 0                       # left padding: positions and masks come from the cache
    return root, out, {"input_ids": ids, "attention_mask": mask}


def _close(a, b, x, what):
    """Equal at the real tokens (padded positions attend to nothing; releases fill them differently)."""
    real = x["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _check_here(got, models, x):
    """What the planner model computes, the saved directory computes without planner; generate() with the
    cache equals greedy decoding without it."""
    for f, (_, m) in models.items():
        r = got[f]
        assert r["cls"].startswith("Planner") and r["layers"] == m.config.planner_layers, f
        with torch.no_grad():
            if "gen" in r:
                _close(r["logits"], m(**x, use_cache=False).logits, x, f)
                assert r["gen"].shape == (2, 14) and torch.equal(r["gen"], r["loop"]), f
            else:
                _close(r["hidden"], m(**x).last_hidden_state, x, f)


def test_saved_directories_load_and_generate_without_planner(saved):
    root, models, x = saved
    got = load_without_planner({f: d for f, (d, _) in models.items()}, x, root / "here")
    _check_here(got, models, x)


def test_saved_directories_generate_the_same_tokens_on_another_transformers(saved):
    if not OTHER:
        if os.environ.get("PLANNER_REQUIRE_OTHER_TRANSFORMERS"):
            pytest.fail("PLANNER_OTHER_PYTHON is not set: .ci/run makes a second environment with the oldest "
                        "declared transformers and points this test at it")
        pytest.skip("set PLANNER_OTHER_PYTHON to a Python with another transformers release (.ci/run does)")
    root, models, x = saved
    dirs = {f: d for f, (d, _) in models.items()}
    here = load_without_planner(dirs, x, root / "here2")
    there = load_without_planner(dirs, x, root / "there", python=OTHER)
    assert there["transformers"] != here["transformers"], "PLANNER_OTHER_PYTHON runs the same transformers"
    _check_here(there, models, x)                       # correct there too, generate() with the cache included
    for f in FAMILIES:
        if "gen" in here[f]:
            assert torch.equal(here[f]["gen"], there[f]["gen"]), (f, here["transformers"], there["transformers"])
            _close(here[f]["logits"], there[f]["logits"], x, f)
        else:
            _close(here[f]["hidden"], there[f]["hidden"], x, f)
    assert planner.versions.outside_range({"transformers": there["transformers"]},
                                          planner.versions.declared_ranges()) == []
