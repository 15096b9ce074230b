"""Sparse kernels as profile options: the sparse layer computes what the masked dense layer does, variants
swap exactly the module's linears, and the profile records the timed levels honestly."""
import dataclasses

import pytest
import torch
from click.testing import CliRunner

import planner
from planner.algorithms.sparse import CsrLinear, csr_like, density, random_mask, sparse_like
from planner.cli import main
from planner.config import ProfileConfig
from planner.stages import profile as profiler
from planner.types import LatencyProfile

from .test_types import _profile


def test_csr_linear_equals_masked_dense():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    mask = random_mask(lin.weight.shape, 0.8, g)
    assert int(mask.sum()) == round(0.2 * 48 * 40)
    sp = csr_like(lin.eval(), 0.8, lin.weight * mask)
    assert not sp.training
    x = torch.randn(3, 7, 48, generator=g)                       # (B, T, in)
    ref = torch.nn.functional.linear(x, lin.weight * mask, lin.bias)
    torch.testing.assert_close(sp(x), ref, rtol=1e-5, atol=1e-5)
    assert density(sp) == pytest.approx(0.2, abs=1e-3) and sp.sparsity == 0.8
    with torch.no_grad():                                        # a changed weight rebuilds the CSR copy
        sp.weight.mul_(2)
    torch.testing.assert_close(sp(x), torch.nn.functional.linear(x, 2 * lin.weight * mask, lin.bias),
                               rtol=1e-5, atol=1e-5)
    sp.train()                                                   # training: dense path, gradients flow
    sp(x).sum().backward()
    assert sp.weight.grad is not None
    with pytest.raises(ValueError, match="kernel"):
        sparse_like(lin, 0.5, "bsr")


def test_sparse_variant_swaps_only_that_modules_linears(tiny_bert):
    model, adapter = planner.adapters.checkpoint.load_model(tiny_bert)
    spec = [{"heads": 4, "ffn": 128, "sparse": {"ffn": 0.75}, "kernel": "csr"}] * 2
    v = profiler._variant(model, adapter, spec)
    for layer in adapter.layers(v):
        ffn = [getattr(p, n) for p, n in adapter.linear_slots(layer, "ffn")]
        attn = [getattr(p, n) for p, n in adapter.linear_slots(layer, "attn")]
        assert all(isinstance(m, CsrLinear) and density(m) == pytest.approx(0.25, abs=1e-3) for m in ffn)
        assert not any(m.training for m in ffn)                   # timed on the CSR path, not the dense one
        assert all(type(m) is torch.nn.Linear for m in attn)
    # the variant computes what the dense model with those zeros computes
    ref = profiler._variant(model, adapter, [{"heads": 4, "ffn": 128}] * 2)
    for lv, lr in zip(adapter.layers(v), adapter.layers(ref)):
        for (pv, n), (pr, _) in zip(adapter.linear_slots(lv, "ffn"), adapter.linear_slots(lr, "ffn")):
            with torch.no_grad():
                getattr(pr, n).weight.copy_(getattr(pv, n).weight)
    x = {"input_ids": torch.randint(5, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(v(**x).last_hidden_state, ref(**x).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_profile_times_sparse_levels(tiny_bert, tmp_path):
    cfg = ProfileConfig(batch_size=2, seq_len=16, rounds=2, threads=1, n_mixed=0, sparsity=(0.9, 0.5))
    prof, path = planner.profile(tiny_bert, cfg, out=tmp_path / "p.json", progress=False)
    for kind in ("attn", "ffn"):
        s = prof.sparse[kind]
        assert s["levels"] == [0.5, 0.9] and s["kernels"] == ["csr", "csr"]
        assert all(t >= 0 for t in s["median"]) and len(s["spread"]) == 2
    assert LatencyProfile.load(path) == prof                       # survives the JSON round trip
    cross = prof.sparse_crossover("ffn")
    assert cross is None or cross in (0.5, 0.9)


def test_sparse_crossover_and_scaling():
    p = _profile(sparse={"ffn": {"levels": [0.5, 0.9, 0.95], "kernels": ["csr"] * 3,
                                 "median": [3.0, 1.5, 1.0], "spread": [0.1] * 3}})
    assert p.sparse_crossover("ffn") == 0.9                       # dense FFN module takes 2.0
    assert p.sparse_crossover("attn") is None
    slow = dataclasses.replace(p, sparse={"ffn": {**p.sparse["ffn"], "median": [9.0, 8.0, 7.0]}})
    assert slow.sparse_crossover("ffn") is None
    scaled = p.scaled(0.5)                                        # a correction scales sparse times alike
    assert scaled.sparse["ffn"]["median"] == [1.5, 0.75, 0.5]


def test_cli_sparsity_errors(tiny_bert, tmp_path):
    for bad, msg in (("0.5,x", "comma-separated"), ("1.5", "(0, 1)")):
        r = CliRunner().invoke(main, ["profile", str(tiny_bert), "--sparsity", bad, "--out", str(tmp_path / "p.json")])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and msg in r.output, r.output
    from planner.cli import _levels
    assert _levels(("0.5", "0.9,0.95", "0.9")) == (0.5, 0.9, 0.95)      # repeated like --speedup, and lists
    r = CliRunner().invoke(main, ["profile", str(tiny_bert), "--sparsity", "0.5", "--method", "module",
                                  "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and "--method model" in r.output
    assert not (tmp_path / "p.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="2:4 semi-structured sparsity needs an Ampere or newer GPU")
def test_two_four_linear_on_gpu():
    lin = torch.nn.Linear(128, 64).half().cuda()
    sp = sparse_like(lin, 0.5, "2:4")
    x = torch.randn(32, 128, dtype=torch.half, device="cuda")
    w = lin.weight.detach().clone()
    w.view(64, -1, 4)[:, :, 2:] = 0
    torch.testing.assert_close(sp(x), torch.nn.functional.linear(x, w, lin.bias), rtol=1e-2, atol=1e-2)


def test_latency_plot_shows_sparse_levels():
    from planner.reporting import plots
    p = _profile(sparse={"ffn": {"levels": [0.5, 0.9], "kernels": ["csr"] * 2, "median": [3.0, 1.5],
                                 "spread": [0.1] * 2}})
    fig = plots.latency_curves(p)
    assert len(fig.axes) == 3
    line = [c for c in fig.axes[2].containers if c.get_label() == "ffn on csr"][0][0]   # errorbar's data line
    assert list(line.get_xdata()) == [0.5, 0.9] and list(line.get_ydata()) == [3000.0, 1500.0]


def test_sparse_layers_save_and_load_without_planner(tiny_bert, tmp_path):
    import transformers

    from planner.adapters.checkpoint import load_model, save_portable
    model, adapter = load_model(tiny_bert)
    layer = adapter.layers(model)[1]
    g = torch.Generator().manual_seed(1)
    ws = [getattr(p, n).weight * random_mask(getattr(p, n).weight.shape, 0.9, g)
          for p, n in adapter.linear_slots(layer, "ffn")]
    adapter.sparsify_(layer, "ffn", 0.9, ws)
    assert adapter.spec(model)[1].to_dict() == {"heads": 4, "ffn": 128, "ffn_sparsity": 0.9}
    assert adapter.spec(model)[0].to_dict() == {"heads": 4, "ffn": 128}           # untouched layers unchanged
    save_portable(model, adapter, tiny_bert, tmp_path / "m")
    m2 = transformers.AutoModel.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    slots = [getattr(p, n) for p, n in adapter.linear_slots(m2.encoder.layer[1], "ffn")]
    assert all(type(s).__name__ == "PlannerCsrLinear" and s.sparsity == 0.9 for s in slots)
    assert type(m2.encoder.layer[0].output.dense) is torch.nn.Linear
    x = {"input_ids": torch.randint(5, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(m2(**x).last_hidden_state, model(**x).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert all(s._csr is not None for s in slots)                                  # ran on the CSR kernel
