"""GPT-2 and OPT adapters: prepare_ keeps outputs, shrunk equals masked, removed attention keeps the KV cache
consistent, portable checkpoints load and generate without the planner, the database, apply and profiler run."""
import copy
import math

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

import planner
from planner.adapters import adapter_for, get_adapter
from planner.adapters.checkpoint import load_model, save_portable
from planner.adapters.remote.planner_compat import cache_kwargs, output_cache
from planner.config import PlanConfig, ProfileConfig, VerifyConfig
from planner.errors import UnsupportedModel
from planner.stages import profile as profiler
from planner.stages.apply import apply_
from planner.stages.database import DatabaseConfig, build
from planner.types import Plan

from .conftest import _vocab, mask_removed_, save_perturbed, steady_profile
from .portable import load_without_planner

V, D, L, H, F = 300, 64, 3, 4, 96            # vocab, hidden, layers, heads, FFN
HD = D // H
CASES = ("gpt2", "opt", "opt-post")           # opt-post: post-LN with project_in/out, as opt-350m


def _config(case, vocab=V):
    if case == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=D, n_layer=L, n_head=H, n_inner=F, n_positions=256,
                                       bos_token_id=None, eos_token_id=None)
    return transformers.OPTConfig(vocab_size=vocab, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, ffn_dim=F,
                                  max_position_embeddings=256, do_layer_norm_before=case == "opt",
                                  word_embed_proj_dim=D if case == "opt" else 32, pad_token_id=1, bos_token_id=None,
                                  eos_token_id=None)


def make_decoder(path, case, seed=0, vocab=V):
    cfg = _config(case, vocab)
    cls = transformers.GPT2LMHeadModel if case == "gpt2" else transformers.OPTForCausalLM
    return save_perturbed(cls, cfg, path, seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine each op then waits for it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def decoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {case: make_decoder(root / case, case) for case in CASES}


@pytest.fixture(scope="session")
def loaded(decoder_dirs):
    """case -> a fresh copy of (the model as load_model gives it, its adapter): from_pretrained once per case."""
    models = {case: load_model(d) for case, d in decoder_dirs.items()}
    return lambda case: (copy.deepcopy(models[case][0]), models[case][1])


def _ids(b=2, t=12, seed=0):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kw).logits


def _empty():
    return torch.tensor([], dtype=torch.long)


@pytest.mark.parametrize("case", CASES)
def test_prepare_keeps_outputs(decoder_dirs, case):
    raw = transformers.AutoModelForCausalLM.from_pretrained(str(decoder_dirs[case])).eval()
    ids = _ids()
    ref = _logits(raw, ids)
    ad = get_adapter(raw.config.model_type)
    seen = []                                                    # every FFN consumer input, as the planner hooks see it
    ad.prepare_(raw)
    for layer in ad.layers(raw):
        ad.consumer(layer, "ffn").register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    torch.testing.assert_close(_logits(raw, ids), ref, atol=1e-6, rtol=1e-6)
    assert not any(isinstance(m, Conv1D) for m in raw.modules())
    # (B, T, ffn), or (B*T, ffn) where transformers flattens the tokens (OPT): either lines up with the (B, T) mask
    assert all(s[-1] == F and s[:-1].numel() == 2 * 12 for s in seen) and len(seen) == L
    ad.prepare_(raw)                                             # idempotent (load_model of a saved plan does it again)
    torch.testing.assert_close(_logits(raw, ids), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_keep_everything_is_identical(loaded, case):
    m, ad = loaded(case)
    ids = _ids()
    ref = _logits(m, ids)
    for layer in ad.layers(m):
        ad.shrink_(layer, "attn", torch.arange(H), None, m.config)
        ad.shrink_(layer, "ffn", torch.arange(F), None, m.config)
    assert torch.equal(_logits(m, ids), ref)
    assert ad.spec(m)[0].to_dict() == {"heads": H, "ffn": F}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("heads,ffn", [([0, 2], [1, 5, 7, 90]), ([], list(range(0, F, 3))), ([1, 2, 3], []), ([], [])])
def test_shrunk_equals_masked(loaded, case, heads, ffn):
    m, ad = loaded(case)
    masked = copy.deepcopy(m)
    for layer, mlayer in zip(ad.layers(m), ad.layers(masked)):
        ad.shrink_(layer, "attn", torch.tensor(heads, dtype=torch.long), None, m.config)
        ad.shrink_(layer, "ffn", torch.tensor(ffn, dtype=torch.long), None, m.config)
        mask_removed_(mlayer, ad, "attn", heads, HD)
        mask_removed_(mlayer, ad, "ffn", ffn, 1)
    assert [s.to_dict() for s in ad.spec(m)] == [{"heads": len(heads), "ffn": len(ffn)}] * L
    for kind, kept in (("attn", heads), ("ffn", ffn)):              # a removed module has no consumer, no slots
        removed = not kept
        assert (ad.consumer(ad.layers(m)[0], kind) is None) == removed
        assert (ad.linear_slots(ad.layers(m)[0], kind) == []) == removed
    ids, mask = _prompt()
    torch.testing.assert_close(_logits(m, ids, attention_mask=mask), _logits(masked, ids, attention_mask=mask),
                               atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in masked.parameters())


@pytest.mark.parametrize("case", CASES)
def test_consumer_weight_and_producer_rows(loaded, case):
    m, ad = loaded(case)
    layer = ad.layers(m)[0]
    producers = [getattr(p, n).weight.clone() for p, n in ad.linear_slots(layer, "attn")[:-1]]
    w_attn, w_ffn = torch.randn(D, 2 * HD), torch.randn(D, 3)
    ad.shrink_(layer, "attn", torch.tensor([3, 1]), w_attn, m.config)   # unsorted: the adapter sorts
    ad.shrink_(layer, "ffn", torch.tensor([4, 9, 2]), w_ffn, m.config)
    assert torch.equal(ad.consumer(layer, "attn").weight, w_attn)
    assert torch.equal(ad.consumer(layer, "ffn").weight, w_ffn)
    rows = torch.cat([torch.arange(HD, 2 * HD), torch.arange(3 * HD, 4 * HD)])   # heads 1 and 3
    if case == "gpt2":                                           # fused c_attn: the same heads of q, k and v
        rows = torch.cat([rows, rows + D, rows + 2 * D])
    for (p, n), w in zip(ad.linear_slots(layer, "attn")[:-1], producers):
        assert torch.equal(getattr(p, n).weight, w[rows])
    fc, _ = ad.linear_slots(layer, "ffn")
    assert getattr(*fc).out_features == 3
    assert ad.spec(m)[0].to_dict() == {"heads": 2, "ffn": 3}


def _shrink_mixed_(m, ad):
    """Layer 0: attention removed; layer 1: 2 heads, FFN removed; layer 2: 3 heads, 40 neurons."""
    Ls = ad.layers(m)
    ad.shrink_(Ls[0], "attn", _empty(), None, m.config)
    ad.shrink_(Ls[0], "ffn", torch.arange(0, F, 2), None, m.config)
    ad.shrink_(Ls[1], "attn", torch.tensor([0, 3]), None, m.config)
    ad.shrink_(Ls[1], "ffn", _empty(), None, m.config)
    ad.shrink_(Ls[2], "attn", torch.tensor([0, 1, 2]), None, m.config)
    ad.shrink_(Ls[2], "ffn", torch.arange(40), None, m.config)


MIXED_SPEC = [{"heads": 0, "ffn": 48}, {"heads": 2, "ffn": 0}, {"heads": 3, "ffn": 40}]


def _prompt():
    """(2, 6) ids and mask; the second row is left-padded, so a wrong cache length would misplace the mask."""
    ids, mask = _ids(2, 6, seed=2), torch.ones(2, 6, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 1, 0
    return ids, mask


def _greedy_without_cache(m, ids, mask, n):
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)    # the positions generate() derives from the mask
        nxt = _logits(m, ids, attention_mask=mask, position_ids=pos)[:, -1].argmax(-1, keepdim=True)   # (B, 1)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("case", CASES)
def test_generate_with_removed_attention_matches_uncached_loop(loaded, case):
    m, ad = loaded(case)
    _shrink_mixed_(m, ad)
    ids, mask = _prompt()
    with torch.no_grad():
        cache = output_cache(m(input_ids=ids, attention_mask=mask, use_cache=True))
    # every layer's slot holds the 6 prompt tokens, the removed layer 0 (where get_seq_length looks) included
    assert [cache.get_seq_length(i) for i in range(L)] == [6] * L
    out = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    ref = _greedy_without_cache(m, ids, mask, 8)
    assert out.shape == (2, 14) and torch.equal(out, ref)


def test_save_load_roundtrip_without_planner(decoder_dirs, loaded, tmp_path):
    ids, mask = _prompt()
    want = {}
    for case in CASES:
        m, ad = loaded(case)
        _shrink_mixed_(m, ad)
        g = torch.Generator().manual_seed(0)                     # layer 2's attention runs on the CSR kernel
        ad.sparsify_(ad.layers(m)[2], "attn", 0.5, [getattr(p, n).weight * (torch.rand(getattr(p, n).weight.shape,
                     generator=g) > 0.5) for p, n in ad.linear_slots(ad.layers(m)[2], "attn")])
        out = save_portable(m, ad, decoder_dirs[case], tmp_path / case)
        assert (out / ad.remote_file).exists() and (out / "planner_common.py").exists()
        gen = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
        want[str(out)] = {"logits": _logits(m, ids, attention_mask=mask), "gen": gen}
        m2 = planner.load(out)                                   # the planner's copy of the remote code
        assert type(m2).__name__ == ("PlannerGPT2LMHeadModel" if case == "gpt2" else "PlannerOPTForCausalLM")
        assert torch.equal(_logits(m2, ids, attention_mask=mask), want[str(out)]["logits"])
    got = load_without_planner({d: d for d in want}, {"input_ids": ids, "attention_mask": mask}, tmp_path / "fresh", pad=1)
    for d, w in want.items():
        assert got[d]["cls"] in ("PlannerGPT2LMHeadModel", "PlannerOPTForCausalLM")
        assert got[d]["layers"] == [*MIXED_SPEC[:2], {**MIXED_SPEC[2], "attn_sparsity": 0.5}]
        assert torch.equal(got[d]["logits"], w["logits"])
        assert torch.equal(got[d]["gen"], w["gen"])


@pytest.mark.parametrize("case", CASES)
def test_database_and_sequential_apply(loaded, case, tmp_path):
    m, ad = loaded(case)
    batches = [{"input_ids": _ids(2, 16, seed=s), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
               for s in range(4)]
    db = build(m, ad, batches, tmp_path / "db", {"attn": list(range(H + 1)), "ffn": [0, 32, 64, F]},
               DatabaseConfig(damp=0.01, val_fraction=0.25), identity={}, progress=False)
    for i in range(L):
        for kind, full in (("attn", H), ("ffn", F)):
            e = db.errors(i, kind)
            assert set(e) >= {0, full} and all(math.isfinite(v) for v in e.values())
            assert e[full] == 0 and e[0] > 0                     # keeping everything is exact; removal is not
    plan = Plan(method="test", target_speedup=1.0, predicted_time=0.0, predicted_speedup=1.0, base_time=0.0,
                layers=[{"heads": 0, "ffn": 64}, {"heads": 2, "ffn": 0}, {"heads": 3, "ffn": 32}], total_error=0.0,
                profile={}, model={})
    ids = _ids(seed=5)
    dense = _logits(m, ids)
    apply_(m, ad, plan, select="obs", weights="sequential", db=db, batches=batches, progress=False)
    assert [s.to_dict() for s in ad.spec(m)] == [{"heads": l["heads"], "ffn": l["ffn"]} for l in plan.layers]
    logits = _logits(m, ids)
    assert logits.shape == dense.shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("case", CASES)
def test_profiler_variants_run_with_cache(decoder_dirs, case):
    model, ad = profiler.dense_model_from_config(decoder_dirs[case])
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    specs = [MIXED_SPEC, [{"heads": 0, "ffn": 0}] * L,
             [{"heads": H, "ffn": F, "sparse": {"ffn": 0.5}, "kernel": "csr"}] * L]
    ids = _ids(2, 10, seed=3)
    for spec in specs:
        v = profiler._variant(model, ad, spec)
        assert [s.heads for s in ad.spec(v)] == [s["heads"] for s in spec]
        with torch.no_grad():
            out = v(input_ids=ids, use_cache=True, logits_to_keep=1)        # the prefill regime's call
            assert out.logits.shape == (2, 1, V) and output_cache(out).get_seq_length() == 10
            step = v(input_ids=ids[:, -1:], use_cache=True, **cache_kwargs(v, output_cache(out))).logits  # decode
            ref = v(input_ids=torch.cat([ids, ids[:, -1:]], 1), use_cache=False).logits[:, -1:]
        torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)
    assert ad.spec(profiler._variant(model, ad, specs[2]))[0].ffn_sparsity == 0.5


@pytest.mark.parametrize("case", CASES)
def test_distill_outputs_and_embedding(loaded, case):
    m, ad = loaded(case)
    ids, mask = _prompt()
    out = ad.distill_outputs(m, ids, mask)
    width = D if case != "opt-post" else 32                      # the last entry is after project_out
    assert [h.shape[-1] for h in out["hidden"]] == [D] * (L - 1) + [width]
    assert out["head"] == "token" and out["logits"].shape == (2, 6, V) and out["embedding"] is None
    with torch.no_grad():
        last = ad.base(m)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert torch.equal(out["hidden"][-1], last)
    e = ad.embed(m, ids, mask)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    assert ad.head_kind(ad.base(m)) is None
    emb = {id(p) for p in ad.embedding_parameters(m)}
    assert id(m.get_input_embeddings().weight) in emb and id(m.lm_head.weight) in emb   # tied head
    assert ad.causal_lm and ad.forward_kwargs() == {"use_cache": False}
    assert ad.shape(m).key == f"{ad.family}-L{L}-H{D}-A{H}x{HD}-F{F}-V{V}"


@pytest.mark.parametrize("case", ["gpt2", "opt-post"])
def test_bare_model_roundtrip(tmp_path, case):
    base_cls = transformers.GPT2Model if case == "gpt2" else transformers.OPTModel
    torch.manual_seed(0)
    base_cls(_config(case)).save_pretrained(str(tmp_path / "src"))
    m, ad = load_model(tmp_path / "src")
    assert ad.head_kind(m) is None and ad.distill_outputs(m, *_prompt())["logits"] is None
    _shrink_mixed_(m, ad)
    ids, mask = _prompt()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
    out = save_portable(m, ad, tmp_path / "src", tmp_path / "out")
    m2 = planner.load(out)
    assert type(m2).__name__ == "Planner" + base_cls.__name__
    assert m2.config.auto_map["AutoModel"].endswith(base_cls.__name__)
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids, attention_mask=mask).last_hidden_state, ref)


def test_refused_configs():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=H, add_cross_attention=True)
    with pytest.raises(UnsupportedModel, match="cross_attention"):
        get_adapter("gpt2").prepare_(transformers.GPT2LMHeadModel(cfg))
    opt = transformers.OPTForSequenceClassification(_config("opt"))
    ad = get_adapter("opt")
    ad.prepare_(opt)
    with pytest.raises(ValueError, match="no portable class"):
        ad.save_config_(opt)


@pytest.mark.parametrize("case,mode", [("gpt2", "decode"), ("opt-post", "prefill")])
def test_profile_plan_apply_verify(tmp_path, calib_file, heldout_file, case, mode):
    d = tmp_path / case
    d.mkdir()
    vocab = list(dict.fromkeys(_vocab()))                        # the test WordPiece pieces, one id each
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(d))
    make_decoder(d, case, vocab=len(vocab))
    prof, ppath = planner.profile(d, ProfileConfig(batch_size=2, seq_len=16, mode=mode, rounds=1, threads=1,
                                                   n_mixed=3), out=tmp_path / "p.json", progress=False)
    assert prof.mode == mode and prof.shape["family"] == adapter_for(planner.load(d)).family
    assert prof.times("attn").widths == list(range(H + 1)) and prof.floor > 0 and prof.max_speedup() < float("inf")
    # a busy machine once timed this tiny OPT's all-removed model slower than the dense one (reach 0.86x, CI run 6)
    prof, ppath = steady_profile(prof, tmp_path / "steady.json")
    target = round(1 + min(0.3, (prof.max_speedup() - 1) / 2), 3)
    # open loop: the budget holds on the profile (the loop's own tests are test_loop.py)
    [plan] = planner.plan(d, ppath, PlanConfig(search=0, loop_rounds=0, targets=(target,), calib_path=str(calib_file), n_calib=64,
                                               calib_max_len=32), tmp_path / "plans", progress=False)
    assert plan.predicted_speedup >= target * 0.999
    out, model = planner.apply(d, plan, tmp_path / "small", progress=False)
    assert [s.to_dict() for s in adapter_for(model).spec(model)] == [{"heads": l["heads"], "ffn": l["ffn"]}
                                                                    for l in plan.layers]
    rep = planner.verify(d, out, VerifyConfig(batch_size=2, seq_len=16, reps=3, threads=1, n_text=24,
                                              text_path=str(heldout_file), ppl_window=32),
                         profile_path=ppath, progress=False)
    q = rep.quality
    assert q["ppl_dense"] > 1 and q["ppl"] > 1 and 0 <= q["top1_agree"] <= 1 and q["n_tokens"] > 100
    assert ("tokens_per_s" in q) == (mode == "decode")
