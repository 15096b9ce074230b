"""Portable checkpoints: load with planner.load and with plain transformers while planner is not importable."""
import torch

import planner
from planner.adapters.checkpoint import load_model, save_portable

from .conftest import inputs, make_tiny
from .portable import load_without_planner


def test_save_load_roundtrip_without_planner(tmp_path):
    src = make_tiny(tmp_path / "src")
    m, ad = load_model(src)
    L = ad.layers(m)
    ad.shrink_(L[0], "attn", torch.tensor([1, 3]), None, m.config)
    ad.shrink_(L[0], "ffn", torch.tensor([], dtype=torch.long), None, m.config)
    ad.shrink_(L[1], "attn", torch.tensor([], dtype=torch.long), None, m.config)
    ad.shrink_(L[1], "ffn", torch.arange(0, 128, 5), None, m.config)
    x = inputs(m.config.vocab_size)
    with torch.no_grad():
        ref = m(**x).last_hidden_state
    out = save_portable(m, ad, src, tmp_path / "out")
    assert (out / "modeling_planner_bert.py").exists() and (out / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".out.*"))                   # no temporary left behind

    # planner.load
    m2 = planner.load(out)
    with torch.no_grad():
        assert torch.equal(m2(**x).last_hidden_state, ref)

    # plain transformers in a fresh process with planner made unimportable
    got = load_without_planner({"out": out}, x, tmp_path / "fresh")["out"]
    assert got["cls"] == "PlannerBertModel"
    assert got["layers"] == [{"heads": 2, "ffn": 0}, {"heads": 0, "ffn": 26}]
    assert torch.equal(got["hidden"], ref)
