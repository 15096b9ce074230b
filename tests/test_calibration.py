"""The calibration loop: device moves, offloaded database builds, and token windows for causal LMs."""
import json

import pytest
import torch

from planner import data
from planner.adapters.checkpoint import load_model
from planner.errors import PlannerError
from planner.stages.calibration import block_call, capture_block_inputs, real_tokens, to_device
from planner.stages.database import DatabaseConfig, build

from .conftest import make_tiny


def test_real_tokens_line_up_with_the_mask_in_either_layout():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)            # (B, T, d)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    want = torch.stack([x[0, 0], x[0, 1], x[1, 0]])                           # the real tokens, in order
    assert torch.equal(real_tokens(x, mask), want)
    assert torch.equal(real_tokens(x.reshape(6, 4), mask), want)              # a layer that flattens (B*T, d)
    with pytest.raises(ValueError, match="line up"):
        real_tokens(x[:, :2], mask)


def test_to_device_moves_nested_tensors_and_keeps_the_rest():
    x = {"a": (torch.ones(2), None, [torch.zeros(1), 3]), "b": "text"}
    y = to_device(x, "meta")
    assert y["a"][0].device.type == "meta" and y["a"][2][0].device.type == "meta"
    assert y["a"][1] is None and y["a"][2][1] == 3 and y["b"] == "text"
    assert isinstance(y["a"], tuple) and isinstance(y["a"][2], list)


def test_offloaded_build_equals_the_plain_one(tmp_path):
    model_dir = make_tiny(tmp_path / "m", layers=2)
    m, ad = load_model(model_dir)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, m.config.vocab_size, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(4)]
    levels = {"attn": [0, 1, 2, 4], "ffn": [0, 32, 64, 128]}
    a = build(m, ad, batches, tmp_path / "a", levels, DatabaseConfig(0.01, 0.25), {"m": 1}, progress=False)
    b = build(m, ad, batches, tmp_path / "b", levels, DatabaseConfig(0.01, 0.25, "cpu", offload=True), {"m": 1},
              progress=False)
    assert json.dumps(a.index["layers"], sort_keys=True) == json.dumps(b.index["layers"], sort_keys=True)
    for i in range(2):
        for k, t in a.tensors(i).items():
            assert torch.equal(t, b.tensors(i)[k])


def test_block_call_returns_the_block_output(tmp_path):
    m, ad = load_model(make_tiny(tmp_path / "m", layers=2))
    ids = torch.randint(5, m.config.vocab_size, (2, 10))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    inp = capture_block_inputs(m, ad.layers(m), batches)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[1]
        got = block_call(ad.layers(m)[0], inp.hidden[0], inp.args[0], inp.kwargs[0])
    torch.testing.assert_close(got, ref)


class _Tok:
    """Whitespace 'tokenizer': one id per word, EOS = 1."""
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + len(w) for w in text.split()]}


def test_token_windows_join_texts_with_eos_and_drop_the_tail():
    w = data.token_windows(_Tok(), ["a bb ccc", "dddd e"], 3)          # ids 3 4 5 1 6 3 1 -> two windows of 3
    assert w.tolist() == [[3, 4, 5], [1, 6, 3]]
    batches = data.window_batches(_Tok(), ["a bb ccc", "dddd e"] * 3, 4, 2)
    assert [b["input_ids"].shape for b in batches] == [(2, 4), (2, 4), (1, 4)]
    assert all(bool(b["attention_mask"].all()) for b in batches)
    with pytest.raises(Exception, match="fewer than one window"):
        data.token_windows(_Tok(), ["a"], 8)


def test_packed_hessians_round_trip():
    from planner.stages.database import pack_sym, unpack_sym
    X = torch.randn(40, 7, dtype=torch.float64)
    H = X.T @ X
    p = pack_sym(H)
    assert p.shape == (7 * 8 // 2,)
    assert torch.equal(unpack_sym(p), H.triu() + H.triu(1).T) and torch.allclose(unpack_sym(p), H)
    with pytest.raises(PlannerError, match="not a triangle"):
        unpack_sym(torch.zeros(11))


def test_cross_stats_are_the_kept_part_of_the_full_ones(tmp_path):
    import copy

    from planner.stages.apply import _cross_stats
    m, ad = load_model(make_tiny(tmp_path / "m", layers=2))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(5, m.config.vocab_size, (3, 12), generator=g),
                "attention_mask": torch.ones(3, 12, dtype=torch.long)} for _ in range(2)]
    inp = capture_block_inputs(m, ad.layers(m), batches)
    dblock = ad.layers(m)[0]
    cblock = copy.deepcopy(dblock)
    with torch.no_grad():
        for p in cblock.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))        # a "compressed" block that differs
    c_in = inp.with_hidden([h + 0.1 for h in inp.hidden])
    for kind in ("attn", "ffn"):
        dl, cl = ad.consumer(dblock, kind), ad.consumer(cblock, kind)
        xs, xhs = [], []
        h1 = dl.register_forward_pre_hook(lambda mod, a: xs.append(a[0]))
        h2 = cl.register_forward_pre_hook(lambda mod, a: xhs.append(a[0]))
        with torch.no_grad():
            for x, xc, a, kw in zip(inp.hidden, c_in.hidden, inp.args, inp.kwargs):
                block_call(dblock, x, a, kw)
                block_call(cblock, xc, a, kw)
        h1.remove()
        h2.remove()
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        Xh = torch.cat([x.reshape(-1, x.shape[-1]) for x in xhs]).double()
        n = X.shape[0]
        S = torch.arange(0, cl.in_features, 3)
        H_SS, WC_S, mean_diag = _cross_stats(dl, cl, dblock, cblock, inp, c_in, S)
        torch.testing.assert_close(H_SS, (2 / n * Xh.T @ Xh)[S][:, S], rtol=1e-5, atol=1e-6)
        assert dl.bias is not None                                     # BERT: the bias must not leak into W C
        torch.testing.assert_close(WC_S, dl.weight.double() @ (2 / n * X.T @ Xh)[:, S], rtol=1e-4, atol=1e-5)
        assert mean_diag == pytest.approx(float(torch.diagonal(2 / n * Xh.T @ Xh).mean()), rel=1e-6)
