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


def _perturbed_pair(tmp_path, layers=2, seed=1):
    """A tiny BERT's first block (dense), a perturbed copy of it ("compressed"), the dense path's captured inputs
    and a compressed path's that differ from them."""
    import copy
    m, ad = load_model(make_tiny(tmp_path / "m", layers=layers))
    g = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(5, m.config.vocab_size, (3, 12), generator=g),
                "attention_mask": torch.tensor([[1] * 12, [1] * 9 + [0] * 3, [1] * 5 + [0] * 7])} for _ in range(2)]
    inp = capture_block_inputs(m, ad.layers(m), batches)
    dblock = ad.layers(m)[0]
    cblock = copy.deepcopy(dblock)
    with torch.no_grad():
        for p in cblock.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    c_in = inp.with_hidden([h + 0.1 * torch.randn(h.shape, generator=g) for h in inp.hidden])
    return m, ad, dblock, cblock, inp, c_in


def _record(block, inp, modules: dict):
    """Run `block` on every captured batch; {name: (real tokens, d)} of each module's input ("in:...") or output
    ("out:...")."""
    from planner.stages.calibration import real_tokens
    seen = {k: [] for k in modules}
    hs = []
    for k, mod in modules.items():
        if k.startswith("in:"):
            hs.append(mod.register_forward_pre_hook(lambda m_, a, k=k: seen[k].append(a[0])))
        else:
            hs.append(mod.register_forward_hook(lambda m_, a, y, k=k: seen[k].append(y)))
    with torch.no_grad():
        for x, a, kw, mask in zip(inp.hidden, inp.args, inp.kwargs, inp.masks):
            block_call(block, x, a, kw)
    for h in hs:
        h.remove()
    return {k: torch.cat([real_tokens(t, mk) for t, mk in zip(v, inp.masks)]).double() for k, v in seen.items()}


def test_cross_stats_with_the_residual_target(tmp_path):
    """refit="stream": the consumer's target is the dense residual stream minus the compressed path's residual,
    s − (ŝ − ŷ), with s, ŝ the LayerNorm's input and ŷ the compressed consumer's output (brute force)."""
    from planner.stages.apply import _cross_stats
    m, ad, dblock, cblock, inp, c_in = _perturbed_pair(tmp_path)
    for kind in ("attn", "ffn"):
        dl, cl = ad.consumer(dblock, kind), ad.consumer(cblock, kind)
        dn, cn = ad.residual_norm_input(dblock, kind), ad.residual_norm_input(cblock, kind)
        d = _record(dblock, inp, {"out:y": dl, "in:s": dn})
        c = _record(cblock, c_in, {"in:x": cl, "out:y": cl, "in:s": cn})
        n = c["in:x"].shape[0]
        S = torch.arange(1, cl.in_features, 2)
        res = (ad.residual_point(dblock, kind), ad.residual_point(cblock, kind))
        H_SS, WC_S, _ = _cross_stats(dl, cl, dblock, cblock, inp, c_in, S, res)
        target = d["in:s"] - (c["in:s"] - c["out:y"]) - dl.bias.double()          # (tokens, d_out)
        Xs = c["in:x"][:, S]
        torch.testing.assert_close(H_SS, 2 / n * Xs.T @ Xs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(WC_S, 2 / n * target.T @ Xs, rtol=1e-4, atol=1e-5)
        plain = _cross_stats(dl, cl, dblock, cblock, inp, c_in, S)[1]
        assert (WC_S - plain).abs().max() > 1e-3            # the residual's drift is really in the target


def test_refit_producers_is_least_squares_towards_the_dense_outputs(tmp_path):
    """Each producer linear (q, k, v; the FFN's input linear) gets W' = (C + lam W)(H + lam I)^-1 with the
    compressed path's inputs and the dense block's outputs (brute force); on the dense path itself the dense
    weights come back."""
    import copy

    from planner.algorithms import obs
    from planner.stages.apply import _refit_producers
    m, ad, dblock, cblock, inp, c_in = _perturbed_pair(tmp_path)
    damp = 0.01
    for kind in ("attn", "ffn"):
        prods = [(getattr(*a), getattr(*b)) for a, b in zip(ad.linear_slots(dblock, kind)[:-1],
                                                             ad.linear_slots(cblock, kind)[:-1])]
        assert prods
        d = _record(dblock, inp, {f"out:{j}": dl for j, (dl, _) in enumerate(prods)})
        c = _record(cblock, c_in, {f"in:{j}": cl for j, (_, cl) in enumerate(prods)})
        want = []
        for j, (dl, cl) in enumerate(prods):
            X, Y = c[f"in:{j}"], d[f"out:{j}"] - dl.bias.double()
            n = X.shape[0]
            H, C = 2 / n * X.T @ X, 2 / n * Y.T @ X
            lam = damp * float(torch.diagonal(H).mean())
            want.append((C + lam * cl.weight.double()) @ torch.linalg.inv(H + lam * torch.eye(H.shape[0],
                                                                                               dtype=H.dtype)))
        with torch.no_grad():
            _refit_producers(ad, dblock, cblock, kind, inp, c_in, damp)
        for (_, cl), w in zip(prods, want):
            torch.testing.assert_close(cl.weight.double(), w, rtol=1e-3, atol=1e-4)
        same = copy.deepcopy(dblock)
        with torch.no_grad():
            _refit_producers(ad, dblock, same, kind, inp, inp, damp)
        for (dl, _), (p, name) in zip(prods, ad.linear_slots(same, kind)[:-1]):
            torch.testing.assert_close(getattr(p, name).weight, dl.weight, rtol=1e-3, atol=1e-4)
    assert obs.damping(1.0, damp) == damp


def test_stream_refit_brings_the_residual_stream_closer(tmp_path):
    """On the calibration text it fits, the "stream" refit leaves every block's output nearer the dense model's
    than the "module" refit does: it targets that stream, the other only each module's own output."""
    import copy

    from planner.stages.apply import apply_
    from planner.types import Plan
    m, ad = load_model(make_tiny(tmp_path / "m", layers=3))
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(5, m.config.vocab_size, (8, 16), generator=g),
                "attention_mask": torch.ones(8, 16, dtype=torch.long)} for _ in range(3)]
    spec = ad.spec(m)
    layers = [{"heads": max(1, s.heads // 2), "ffn": s.ffn // 4} for s in spec]
    plan = Plan(method="planner", target_speedup=2.0, predicted_time=0.0, predicted_speedup=2.0, layers=layers,
                base_time=1.0,
                total_error=0.0, profile={}, model={})
    def last_hidden(model):
        with torch.no_grad():
            return [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                    for b in batches]                                   # (B, T, d) each
    ref = last_hidden(m)
    err = {}
    for refit in ("module", "stream"):
        c = apply_(copy.deepcopy(m), ad, plan, select="magnitude", weights="sequential", batches=batches,
                   progress=False, refit=refit)
        err[refit] = sum(float((o - r).pow(2).sum()) for o, r in zip(last_hidden(c), ref))
    assert err["stream"] < 0.9 * err["module"], err


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("refit", ["module", "stream"])
def test_dense_tape_gives_the_weights_of_rerunning_the_dense_block(tmp_path, model_type, refit):
    """The sequential apply records the dense block's tensors in one run per block (the tape) instead of running
    it again for every fit: the fitted weights are the same as with the tape off (tape_bytes=0), and a limit below
    the tape's size falls back to re-running."""
    import copy

    from planner.stages.apply import _dense_points, _dense_tape, apply_
    from planner.stages.calibration import BlockInputs
    from planner.types import Plan

    from .test_decoder_pipeline import make_tiny_llama
    m, ad = load_model(make_tiny(tmp_path / "m") if model_type == "bert" else make_tiny_llama(tmp_path / "m"))
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 7:] = 0                                                     # padding in the batches, as in real ones
    batches = [{"input_ids": torch.randint(5, m.config.vocab_size, (4, 12), generator=g), "attention_mask": mask}
               for _ in range(3)]
    layers = [{"heads": max(1, s.heads // 2), "ffn": s.ffn // 4} for s in ad.spec(m)]
    plan = Plan(method="planner", target_speedup=2.0, predicted_time=0.0, predicted_speedup=2.0, layers=layers,
                base_time=1.0, total_error=0.0, profile={}, model={})
    out = {}
    for limit in (None, 0):
        c = apply_(copy.deepcopy(m), ad, plan, select="magnitude", weights="sequential", batches=batches,
                   progress=False, refit=refit, tape_bytes=limit)
        out[limit] = c.state_dict()
    assert out[None].keys() == out[0].keys()
    for k in out[0]:
        torch.testing.assert_close(out[None][k], out[0][k], rtol=0, atol=0)
    block = ad.layers(m)[0]
    pts = _dense_points(ad, block, refit)
    # module: the two consumers' outputs; stream: also the producers' outputs (q, k, v / gate, up) and residuals
    assert len(pts) == 2 if refit == "module" else len(pts) >= 2 + 2 + 2 * 2
    if model_type == "bert":
        inp = BlockInputs([torch.randn(4, 12, m.config.hidden_size)] * 2, [()] * 2, [{}] * 2, [mask.bool()] * 2)
        tape, outs = _dense_tape(block, inp, pts, 1 << 30)
        assert len(tape) == 2 and len(outs) == 2 and all(len(t) == len({(id(a), w) for a, w in pts}) for t in tape)
        torch.testing.assert_close(outs[0], block_call(block, inp.hidden[0], (), {}))
        assert _dense_tape(block, inp, pts, 1000) == (None, None)      # over the limit: nothing kept
        # batches sorted by length: a short first batch must not stand for the long ones
        short, long_ = torch.randn(4, 2, m.config.hidden_size), torch.randn(4, 12, m.config.hidden_size)
        ragged = BlockInputs([short, long_], [()] * 2, [{}] * 2, [torch.ones(4, 2, dtype=torch.bool), mask.bool()])
        first = sum(t.numel() * t.element_size() for t in _dense_tape(block, ragged, pts, 1 << 30)[0][0].values())
        assert _dense_tape(block, ragged, pts, 3 * first)[0] is None             # 2 x first would pass, 7 x is real
        assert _dense_tape(block, ragged, pts, 7 * first)[0] is not None
