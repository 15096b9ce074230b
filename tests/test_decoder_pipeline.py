"""Causal LMs through the whole job: decode and prefill profiles, plan, apply, verify with perplexity."""
import pytest
import torch
import transformers

import planner
from planner.config import PlanConfig, ProfileConfig, VerifyConfig
from planner.errors import PlannerError

from .conftest import _vocab, save_perturbed


def make_tiny_llama(path, layers=2, seed=0):
    """A tiny GQA Llama (8 query / 4 KV heads) with the test WordPiece tokenizer (no EOS: windows join texts)."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys(_vocab()))
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(path))
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=4, intermediate_size=128,
                                   max_position_embeddings=256, pad_token_id=0)
    return save_perturbed(transformers.LlamaForCausalLM, cfg, path, seed)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llm") / "llama")


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_profile_plan_apply_verify(tiny_llama, tmp_path, calib_file, heldout_file, mode):
    prof, ppath = planner.profile(tiny_llama, ProfileConfig(batch_size=2, seq_len=16, mode=mode, rounds=1,
                                                            threads=1, n_mixed=3), out=tmp_path / "p.json",
                                  progress=False)
    assert prof.mode == mode and prof.shape["kv_heads"] == 4 and prof.times("attn").widths == [0, 1, 2, 3, 4]
    assert 1.0 < prof.max_speedup() < float("inf")
    target = round(1 + min(0.3, 0.5 * (prof.max_speedup() - 1)), 2)      # well inside what the profile reaches
    [plan] = planner.plan(tiny_llama, ppath, PlanConfig(targets=(target,), calib_path=str(calib_file), n_calib=64,
                                                        calib_max_len=32), tmp_path / "plans", progress=False)
    assert plan.predicted_speedup >= target * 0.999
    out, model = planner.apply(tiny_llama, plan, tmp_path / "small", progress=False)
    assert [s.to_dict() for s in planner.adapters.adapter_for(model).spec(model)] == \
        [{"heads": l["heads"], "ffn": l["ffn"]} for l in plan.layers]
    rep = planner.verify(tiny_llama, out, VerifyConfig(batch_size=2, seq_len=16, reps=3, threads=1, n_text=24,
                                                       text_path=str(heldout_file), ppl_window=32),
                         profile_path=ppath, progress=False)
    q = rep.quality
    assert rep.conditions["mode"] == mode and rep.predicted_speedup == pytest.approx(plan.predicted_speedup)
    assert q["ppl_dense"] > 1 and q["ppl"] > 1 and 0 <= q["top1_agree"] <= 1 and q["n_tokens"] > 100
    assert ("tokens_per_s" in q) == (mode == "decode")
    # the prediction recorded in the model is used when no profile is given, for the same regime only
    again = planner.verify(tiny_llama, out, VerifyConfig(batch_size=2, seq_len=16, reps=3, threads=1, n_text=24,
                                                         text_path=str(heldout_file), ppl_window=32),
                           progress=False)
    assert again.predicted_speedup == pytest.approx(plan.predicted_speedup)
    other = "prefill" if mode == "decode" else "decode"
    with pytest.raises(PlannerError, match=f"profile is for the {mode} regime"):
        planner.verify(tiny_llama, out, VerifyConfig(batch_size=2, seq_len=16, reps=3, mode=other),
                       profile_path=ppath, progress=False)


def test_decode_is_refused_for_an_encoder(tiny_bert, tmp_path):
    with pytest.raises(PlannerError, match="decode needs a causal language model"):
        planner.profile(tiny_bert, ProfileConfig(batch_size=2, seq_len=8, mode="decode", rounds=1),
                        out=tmp_path / "p.json", progress=False)


def test_decode_step_sees_a_constant_cache_length(tiny_llama):
    from planner.regimes import latency_call
    model, ad = planner.models.load_model(tiny_llama)
    step = latency_call(model, ad, "decode", 2, 10)
    with torch.inference_mode():
        for _ in range(3):
            out = step()
            assert step.cache.get_seq_length() == 10 and out.logits.shape[:2] == (2, 1)


def test_recovery_refuses_a_causal_lm_clearly(tiny_llama, tmp_path):
    with pytest.raises(PlannerError, match="causal LM"):
        planner.api.recover(tiny_llama, tiny_llama, out=tmp_path / "r", progress=False)
