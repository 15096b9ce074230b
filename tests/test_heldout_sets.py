"""Held-out text from outside the project: shipped, disjoint from what planner calibrates and trains on, and
every set scored by verify with the worst set as the headline; a far-off calibration text is warned about."""
import re

import pytest

import planner
from planner import data
from planner.config import VerifyConfig
from planner.stages import verify as verify_stage


def _runs(text, n=5):
    w = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def test_outside_sets_are_shipped_and_disjoint_from_the_training_text():
    sets = data.heldout_sets()
    assert set(sets) == {"heldout", "docs", "packages"}
    ours = set()
    for name in (data.CALIBRATION, data.DISTILL):
        ours |= _runs(data.shipped(name).read_text())
    for name in ("docs", "packages"):
        lines = data.read_lines(sets[name])
        assert len(lines) >= 500 and len(set(lines)) == len(lines)
        assert all(6 <= len(l.split()) <= 40 for l in lines)
        assert not [l for l in lines if _runs(l) & ours], f"{name} shares 5-word runs with the training text"
    assert (data.shipped("SOURCES.md")).exists() and len(data.shipped("heldout_packages.credits").read_text()) > 100


def test_the_default_calibration_spans_two_registers_and_no_heldout_text():
    """The default calibration text is the project's prose and its dependencies' docstrings (calibration_tech.txt);
    no held-out set shares a 5-word run with either, nor a sentence with the technical half."""
    prose = data.read_lines(None, data.CALIBRATION)
    tech = data.read_lines(None, data.CALIBRATION_TECH)
    assert data.read_lines(None) == prose + tech and len(tech) >= 500 and len(set(tech)) == len(tech)
    assert all(6 <= len(l.split()) <= 40 for l in tech)
    cal = _runs("\n".join(tech))          # (the prose against the outside sets: the test above)
    for name, path in data.heldout_sets().items():
        lines = data.read_lines(path)
        assert not set(lines) & set(tech)
        assert not [l for l in lines if _runs(l) & cal], f"{name} shares 5-word runs with calibration_tech.txt"
    credits = data.shipped("calibration_tech.credits").read_text()
    assert "numpy" in credits and "torch" in credits


def test_verify_scores_every_set_and_headlines_the_worst(tiny_bert, tmp_path):
    rep = planner.verify(tiny_bert, tiny_bert, VerifyConfig(batch_size=2, seq_len=8, reps=3, max_reps=3, n_text=24),
                         progress=False)
    sets = rep.quality["sets"]
    assert set(sets) == {"heldout", "docs", "packages"}
    for m in ("spearman", "nn_agree", "cosine"):
        assert rep.quality[m] == pytest.approx(min(s[m] for s in sets.values()))
        assert rep.quality["worst"][m] in sets
    assert rep.quality["n_text"] == 3 * 24


def test_a_far_off_calibration_text_is_warned_about(tiny_bert, tmp_path, monkeypatch):
    ck = planner.adapters.checkpoint.Checkpoint.open(tiny_bert)
    prose = {"calibration": {"path": None, "n": 64, "default": [data.CALIBRATION]}}   # the prose half only
    monkeypatch.setattr(type(ck), "record", property(lambda self: prose))
    near = {"heldout": data.sample(data.read_lines(None, data.HELDOUT), 24, seed=1)}
    far = {"numbers": ["1 2 3 4 5 6 7 8 9 10 11 12 13", "14 15 16 17 18 19 20 21 22 23 24 25"] * 12}
    with pytest.warns(planner.errors.PlannerWarning, match="'numbers': only") as got:
        verify_stage._warn_far_from_calibration(ck, {**near, **far})
    assert len(got) == 1


def test_the_dense_embeddings_are_computed_once_per_dense_model(tiny_bert, monkeypatch):
    """The job verifies many models against one dense model: its embeddings of a set are computed once and
    reused (the same numbers), while every compressed model is embedded afresh."""
    ck = planner.adapters.checkpoint.Checkpoint.open(tiny_bert)
    dense, comp = ck.load("cpu"), ck.load("cpu")
    calls = []
    real = verify_stage.embeddings
    monkeypatch.setattr(verify_stage, "embeddings", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    texts = data.sample(data.read_lines(None, data.HELDOUT), 16, seed=1)
    cfg = VerifyConfig(n_text=16)
    q1 = verify_stage.quality(dense, comp, ck.adapter, ck, texts, cfg, progress=False)
    q2 = verify_stage.quality(dense, comp, ck.adapter, ck, texts, cfg, progress=False)
    assert [m is dense for m in calls] == [True, False, False] and q1 == q2
    verify_stage.quality(dense, comp, ck.adapter, ck, texts[:8], cfg, progress=False)     # other text: embedded
    assert [m is dense for m in calls][3:] == [True, False]
