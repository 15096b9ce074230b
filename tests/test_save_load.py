"""Portable checkpoints: load with planner.load and with plain transformers while planner is not importable."""
import subprocess
import sys

import torch

import planner
from planner.models import load_model, save_portable

from .conftest import inputs, make_tiny

_LOAD_WITHOUT_PLANNER = r"""
import sys, torch
sys.modules["planner"] = None                      # any `import planner` now fails
from transformers import AutoModel
m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    y = m(**x).last_hidden_state
torch.save({"y": y, "cls": type(m).__name__, "layers": m.config.planner_layers}, sys.argv[3])
"""


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
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_PLANNER)
    r = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       cwd=tmp_path, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                          "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "y.pt")
    assert got["cls"] == "PlannerBertModel"
    assert got["layers"] == [{"heads": 2, "ffn": 0}, {"heads": 0, "ffn": 26}]
    assert torch.equal(got["y"], ref)
