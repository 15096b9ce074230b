"""Llama-family adapter (llama, mistral, qwen2): GQA units, gated FFN, removed modules and the KV cache.

Tiny random decoders, one per model type, chosen to cover the variants the adapter must keep exact:
llama with biases everywhere (attention_bias, mlp_bias) and 2 query heads per KV head; mistral with an explicit
head_dim that differs from hidden / heads, 4 query heads per KV head and a short sliding window (its cache layers
are DynamicSlidingWindowLayer); qwen2 with q/k/v biases only and a tied LM head.
"""
import copy

import pytest
import torch
import transformers
from torch import nn

import planner
from planner.adapters import get_adapter
from planner.adapters.checkpoint import load_model, n_params, save_portable
from planner.adapters.remote import modeling_planner_llama as remote
from planner.adapters.remote.planner_compat import cache_kwargs, output_cache
from planner.stages import database
from planner.stages.apply import apply_
from planner.stages.profile import _variant, dense_model_from_config
from planner.types import Plan

from .conftest import mask_removed_, save_perturbed
from .portable import load_without_planner

VOCAB, HIDDEN, HEADS, FFN, LAYERS = 300, 64, 8, 96, 3
CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
}
TYPES = list(CONFIGS)


def make_decoder(path, model_type, arch="ForCausalLM", seed=0):
    cfg_cls, extra = CONFIGS[model_type]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=256, pad_token_id=0, **extra)
    cls = getattr(transformers, cfg_cls.__name__.removesuffix("Config") + arch)
    return save_perturbed(cls, cfg, path, seed)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {t: make_decoder(root / t, t) for t in TYPES}


def tokens(b=2, t=10, seed=0, pad=3):
    """Random ids and a mask whose second row is right-padded by `pad` (as calibration batches are)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model, x):
    return model(**x, use_cache=False).logits


def units(model):
    """(kv heads, query heads per KV head, head_dim)."""
    c = model.config
    return c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, remote.planner_head_dim(c)


# --------------------------------------------------------------------------------------------- structure

@pytest.mark.parametrize("model_type", TYPES)
def test_shape_and_groups(decoders, model_type):
    m, ad = load_model(decoders[model_type])
    assert get_adapter(model_type) is ad                        # registered for all three model types
    kv, g, hd = units(m)
    s = ad.shape(m)
    assert (s.family, s.n_heads, s.kv_heads, s.attn_units, s.head_dim, s.ffn) == ("llama", HEADS, kv, kv, hd, FFN)
    assert ad.group_size(m, "attn") == g * hd and ad.group_size(m, "ffn") == 1
    assert ad.causal_lm and ad.forward_kwargs() == {"use_cache": False}
    layer = ad.layers(m)[0]
    assert ad.consumer(layer, "attn").in_features == kv * g * hd
    assert [n for _, n in ad.linear_slots(layer, "attn")] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert [n for _, n in ad.linear_slots(layer, "ffn")] == ["gate_proj", "up_proj", "down_proj"]
    assert ad.residual_point(layer, "attn") == (layer.post_attention_layernorm, "input")
    assert ad.residual_point(layer, "ffn") == (layer, "output")
    assert [s.to_dict() for s in ad.spec(m)] == [{"heads": kv, "ffn": FFN}] * LAYERS


@pytest.mark.parametrize("model_type", TYPES)
def test_keep_everything_is_identical(decoders, model_type):
    m, ad = load_model(decoders[model_type])
    x = tokens()
    ref = logits(m, x)
    kv = units(m)[0]
    for layer in ad.layers(m):
        ad.shrink_(layer, "attn", torch.arange(kv), None, m.config)
        ad.shrink_(layer, "ffn", torch.arange(FFN), None, m.config)
    assert torch.equal(logits(m, x), ref)


# per layer: (kept KV groups, kept FFN neurons); [] removes the module
PLANS = {
    "subsets": [([1], [0, 5, 7, 50, 95]), ([0, 1], list(range(0, FFN, 3))), ([1], list(range(40)))],
    "removed": [([], list(range(0, FFN, 2))), ([0], []), ([], [])],
}


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("plan", list(PLANS))
def test_shrunk_equals_masked(decoders, model_type, plan):
    m, ad = load_model(decoders[model_type])
    masked = copy.deepcopy(m)
    x = tokens()
    for i, (heads, ffn) in enumerate(PLANS[plan]):
        ad.shrink_(ad.layers(m)[i], "attn", torch.tensor(heads, dtype=torch.long), None, m.config)
        ad.shrink_(ad.layers(m)[i], "ffn", torch.tensor(ffn, dtype=torch.long), None, m.config)
        mask_removed_(ad.layers(masked)[i], ad, "attn", heads, ad.group_size(masked, "attn"))
        mask_removed_(ad.layers(masked)[i], ad, "ffn", ffn, 1)
    assert [s.to_dict() for s in ad.spec(m)] == [{"heads": len(h), "ffn": len(f)} for h, f in PLANS[plan]]
    torch.testing.assert_close(logits(m, x), logits(masked, x), atol=1e-5, rtol=1e-5)
    assert n_params(m) < n_params(masked)      # physically smaller
    if plan == "removed":                                       # stand-ins: nothing is left to time but the bias
        L = ad.layers(m)
        assert isinstance(L[0].self_attn, remote.RemovedAttention) and isinstance(L[0].input_layernorm, nn.Identity)
        assert isinstance(L[1].mlp, remote.RemovedMLP) and isinstance(L[1].post_attention_layernorm, nn.Identity)
        assert ad.consumer(L[0], "attn") is None and ad.linear_slots(L[1], "ffn") == []


@pytest.mark.parametrize("model_type", TYPES)
def test_shrink_keeps_whole_kv_groups(decoders, model_type):
    """Unit u = KV head u with its G query heads: q rows and o_proj columns [u*G*hd, (u+1)*G*hd), k/v rows
    [u*hd, (u+1)*hd); the consumer weight given is used as is."""
    m, ad = load_model(decoders[model_type])
    kv, g, hd = units(m)
    layer = ad.layers(m)[0]
    sa = layer.self_attn
    q, k = sa.q_proj.weight.clone(), sa.k_proj.weight.clone()
    w = torch.randn(HIDDEN, g * hd)
    ad.shrink_(layer, "attn", torch.tensor([1]), w, m.config)
    assert torch.equal(sa.q_proj.weight, q[g * hd:2 * g * hd]) and torch.equal(sa.k_proj.weight, k[hd:2 * hd])
    assert torch.equal(sa.o_proj.weight, w) and sa.o_proj.in_features == g * hd
    assert sa.num_key_value_groups == g and ad.layer_spec(layer).heads == 1
    w2 = torch.randn(HIDDEN, 3)
    ad.shrink_(layer, "ffn", torch.tensor([9, 4, 2]), w2, m.config)
    assert torch.equal(layer.mlp.down_proj.weight, w2)
    assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == 3


# --------------------------------------------------------------------------------------------- use

@pytest.mark.parametrize("model_type", TYPES)
def test_distill_outputs_and_embed(decoders, model_type):
    m, ad = load_model(decoders[model_type])
    x = tokens()
    blocks = []
    hooks = [l.register_forward_hook(lambda mod, a, y: blocks.append(y)) for l in ad.layers(m)]
    with torch.no_grad():
        out = ad.distill_outputs(m, **x)
    for h in hooks:
        h.remove()
    base = ad.base(m)(**x, use_cache=False).last_hidden_state
    assert out["head"] == "token" and out["embedding"] is None and out["logits"].shape == (2, 10, VOCAB)
    assert len(out["hidden"]) == LAYERS
    for h, b in zip(out["hidden"][:-1], blocks[:-1]):           # raw block outputs ...
        assert torch.equal(h, b)
    assert torch.equal(out["hidden"][-1], base)                 # ... and last, the final norm's output
    assert not torch.allclose(base, blocks[-1])
    e = ad.embed(m, **x)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(e[1], torch.nn.functional.normalize(base[1, :7].mean(0), dim=0))
    emb = ad.embedding_parameters(m)
    assert len(emb) == 1 and emb[0] is ad.base(m).embed_tokens.weight
    assert (m.lm_head.weight is emb[0]) == bool(m.config.tie_word_embeddings)


def test_bare_model_has_no_head(tmp_path):
    m, ad = load_model(make_decoder(tmp_path / "bare", "llama", arch="Model"))
    assert ad.base(m) is m and ad.head_kind(m) is None
    out = ad.distill_outputs(m, **tokens())
    assert out["logits"] is None and len(out["hidden"]) == LAYERS


# ------------------------------------------------------------------------------------ generation, cache

@torch.no_grad()
def _greedy_without_cache(model, ids, mask, n):
    """Full recompute every step; positions from the mask as generate makes them (left padding)."""
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, nxt.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def _prune_for_generation_(m, ad):
    """Layer 0's attention removed, the others shrunk to one KV group, one FFN cut."""
    L = ad.layers(m)
    ad.shrink_(L[0], "attn", torch.tensor([], dtype=torch.long), None, m.config)
    for layer in L[1:]:
        ad.shrink_(layer, "attn", torch.tensor([1]), None, m.config)
    ad.shrink_(L[2], "ffn", torch.arange(0, FFN, 2), None, m.config)


@pytest.mark.parametrize("model_type", TYPES)
def test_generate_with_removed_attention_matches_recompute(decoders, model_type):
    """Positions and mask sizes come from the KV cache (layer 0's length): the removed attention must keep its
    cache slot's length right. Left padding makes generate build explicit masks of the cache's size; 8 new
    tokens after 7 take mistral past its sliding window of 8."""
    m, ad = load_model(decoders[model_type])
    _prune_for_generation_(m, ad)
    x = tokens(t=7, pad=0)
    ids, mask = x["input_ids"], x["attention_mask"]
    ids[1, :2], mask[1, :2] = 0, 0                              # left padding
    with torch.no_grad():
        gen = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, _greedy_without_cache(m, ids, mask, 8))

    # a plain cached loop without position_ids: positions are the cache's length
    with torch.no_grad():
        out = m(input_ids=ids[:1], use_cache=True)
        seq = ids[:1]
        for _ in range(6):
            seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], 1)
            out = m(input_ids=seq[:, -1:], use_cache=True, **cache_kwargs(m, output_cache(out)))
        assert output_cache(out).get_seq_length() == seq.shape[1]
        torch.testing.assert_close(out.logits[:, -1], logits(m, {"input_ids": seq})[:, -1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ portable checkpoint

def _prune_for_saving_(m, ad):
    """Every kind of layer change: a removed attention, a removed FFN, shrunk widths and a sparse FFN."""
    L = ad.layers(m)
    ad.shrink_(L[0], "attn", torch.tensor([], dtype=torch.long), None, m.config)
    ad.shrink_(L[0], "ffn", torch.arange(0, FFN, 3), None, m.config)
    ad.shrink_(L[1], "attn", torch.tensor([1]), None, m.config)
    ad.shrink_(L[1], "ffn", torch.tensor([], dtype=torch.long), None, m.config)
    ws = [getattr(p, n).weight * (torch.rand_like(getattr(p, n).weight) > 0.5) for p, n in ad.linear_slots(L[2], "ffn")]
    ad.sparsify_(L[2], "ffn", 0.5, ws)


def test_portable_roundtrip_without_planner(decoders, tmp_path):
    x, prompt = tokens(), tokens(t=5, pad=0)
    refs, dirs = {}, {}
    for t in TYPES:
        m, ad = load_model(decoders[t])
        _prune_for_saving_(m, ad)
        with torch.no_grad():
            refs[t] = (logits(m, x), m.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))
        dirs[t] = str(save_portable(m, ad, decoders[t], tmp_path / t))
        assert (tmp_path / t / "modeling_planner_llama.py").exists() and (tmp_path / t / "planner_common.py").exists()
        m2 = planner.load(dirs[t])                              # through the planner's copy of the code
        assert type(m2).__name__ == "Planner" + type(m).__name__
        assert [s.to_dict() for s in ad.spec(m2)] == [s.to_dict() for s in ad.spec(m)]
        assert torch.equal(logits(m2, x), refs[t][0])
        assert m2.config.auto_map["AutoModelForCausalLM"] == f"modeling_planner_llama.{type(m2).__name__}"

    got = load_without_planner(dirs, x, tmp_path / "fresh", prompt=prompt, new_tokens=6)
    for t in TYPES:
        assert got[t]["cls"] == f"Planner{CONFIGS[t][0].__name__.removesuffix('Config')}ForCausalLM"
        assert got[t]["layers"] == [{"heads": 0, "ffn": 32}, {"heads": 1, "ffn": 0},
                                    {"heads": CONFIGS[t][1]["num_key_value_heads"], "ffn": FFN,
                                     "ffn_sparsity": 0.5}]
        assert torch.equal(got[t]["logits"], refs[t][0])
        assert torch.equal(got[t]["gen"], refs[t][1])


def test_save_config_refuses_heads_without_portable_class(tmp_path):
    m, ad = load_model(make_decoder(tmp_path / "cls", "llama", arch="ForSequenceClassification"))
    with pytest.raises(ValueError, match="no portable class"):
        ad.save_config_(m)


# ------------------------------------------------------------------------------------ the pipeline pieces

def _plan(layers):
    return Plan(method="planner", target_speedup=1.5, predicted_time=1.0, predicted_speedup=1.5, base_time=1.5,
                layers=layers, total_error=0.0, profile={}, model={})


@pytest.mark.parametrize("model_type", TYPES)
def test_database_and_sequential_apply(decoders, model_type, tmp_path):
    m, ad = load_model(decoders[model_type])
    kv = units(m)[0]
    batches = [tokens(b=4, t=16, seed=s, pad=5) for s in range(4)]
    db = database.build(m, ad, batches, tmp_path / "db", {"attn": list(range(kv + 1)), "ffn": [0, 32, 64, FFN]},
                        database.DatabaseConfig(damp=0.01, val_fraction=0.25), identity={"t": model_type},
                        progress=False)
    for i in range(LAYERS):
        for kind, full in (("attn", kv), ("ffn", FFN)):
            errs = db.errors(i, kind)
            assert max(errs) == full and errs[full] == pytest.approx(0.0, abs=1e-9)
            assert all(torch.isfinite(torch.tensor(v)) for v in errs.values())
            assert errs[0] > 0                                  # removing the module costs something

    plan = _plan([{"heads": 0, "ffn": 64}, {"heads": 1, "ffn": 0}, {"heads": kv, "ffn": 32}])
    seq = apply_(copy.deepcopy(m), ad, plan, select="obs", weights="sequential", db=db, batches=batches,
                 progress=False)
    plain = apply_(copy.deepcopy(m), ad, plan, select="obs", weights="none", db=db, progress=False)
    assert [s.to_dict() for s in ad.spec(seq)] == [{"heads": l["heads"], "ffn": l["ffn"]} for l in plan.layers]

    def err(model):                                             # relative logit error on the calibration tokens
        return sum(float(((logits(model, b) - logits(m, b))[b["attention_mask"].bool()] ** 2).sum()) for b in batches)
    assert 0 < err(seq) < err(plain)                            # the least-squares fit beats the kept weights


@pytest.mark.parametrize("model_type", TYPES)
def test_profiler_variants_run_with_cache(decoders, model_type):
    dense, ad = dense_model_from_config(decoders[model_type])
    assert type(dense).__name__.endswith("ForCausalLM")
    kv = units(dense)[0]
    layers = [{"heads": 0, "ffn": FFN}, {"heads": 1, "ffn": 0}, {"heads": 0, "ffn": 0}]
    v = _variant(dense, ad, layers)
    assert [s.to_dict() for s in ad.spec(v)] == layers and ad.spec(dense)[0].heads == kv
    assert ad.embedding_parameters(v)[0] is ad.embedding_parameters(dense)[0]    # shared, never copied
    x = tokens(pad=0)
    with torch.no_grad():
        out = v(**x, use_cache=True, logits_to_keep=1)
        assert out.logits.shape == (2, 1, VOCAB) and torch.isfinite(out.logits).all()
        assert output_cache(out).get_seq_length() == 10
        step = v(input_ids=x["input_ids"][:, :1], use_cache=True, logits_to_keep=1, **cache_kwargs(v, output_cache(out)))
    assert output_cache(step).get_seq_length() == 11 and torch.isfinite(step.logits).all()
