"""Causal LMs through the whole job: decode and prefill profiles, plan, apply, verify with perplexity."""
import pytest
import torch
import transformers

import planner
from planner.config import PlanConfig, ProfileConfig, VerifyConfig
from planner.errors import PlannerError

from .conftest import _vocab, save_perturbed, steady_profile


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
    assert prof.floor > 0 and prof.max_speedup() < float("inf")          # the all-removed model was timed
    prof, ppath = steady_profile(prof, tmp_path / "steady.json")            # the subject here: plan, apply, verify
    target = round(1 + min(0.3, 0.5 * (prof.max_speedup() - 1)), 2)      # well inside what the profile reaches
    # open loop: the budget holds on the profile (the loop's own tests are test_loop.py)
    [plan] = planner.plan(tiny_llama, ppath, PlanConfig(search=0, loop_rounds=0, targets=(target,), calib_path=str(calib_file), n_calib=64,
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
    from planner.stages.regimes import latency_call
    model, ad = planner.adapters.checkpoint.load_model(tiny_llama)
    step = latency_call(model, ad, "decode", 2, 10)
    with torch.inference_mode():
        for _ in range(3):
            out = step()
            assert step.cache.get_seq_length() == 10 and out.logits.shape[:2] == (2, 1)


def _lm_student(teacher, out):
    """A compressed copy of the tiny Llama: one KV group and half the FFN of block 0, block 1's attention gone."""
    m, a = planner.adapters.checkpoint.load_model(teacher)
    blocks = a.layers(m)
    a.shrink_(blocks[0], "attn", torch.tensor([0, 2, 3]), None, m.config)
    a.shrink_(blocks[0], "ffn", torch.arange(0, m.config.intermediate_size, 2), None, m.config)
    a.shrink_(blocks[1], "attn", torch.tensor([], dtype=torch.long), None, m.config)
    return planner.adapters.checkpoint.save_portable(m, a, teacher, out)


def test_window_data_is_a_function_of_the_index():
    import numpy as np

    from planner.stages.distill import WindowData
    stream = np.arange(1000) % 97
    d = WindowData(stream, 16, 4, 0.0, np.arange(50, 60), seed=3)
    b = d.batch(5)
    assert b["input_ids"].shape == (4, 16) and bool((b["attention_mask"] == 1).all())
    # every row is a contiguous run of the stream, not padded, not crossing the end
    for row in b["input_ids"].numpy():
        i = int(np.flatnonzero(stream == row[0])[0])
        assert np.array_equal(row, stream[i:i + 16]) or np.array_equal(row, (np.arange(row[0], row[0] + 16) % 97))
    assert torch.equal(WindowData(stream, 16, 4, 0.0, np.arange(50, 60), seed=3).batch(5)["input_ids"], b["input_ids"])
    e0 = torch.cat([d.batch(m)["input_ids"] for m in range(d.n_per_epoch)])
    e1 = torch.cat([d.batch(d.n_per_epoch + m)["input_ids"] for m in range(d.n_per_epoch)])
    assert len(e0) == d.n_windows and not torch.equal(e0, e1)        # each epoch: all windows, new cuts and order
    s = WindowData(stream, 16, 4, 0.5, np.arange(200, 210), seed=3).batch(5)["input_ids"]
    assert 0.3 < float((s >= 200).float().mean()) < 0.7             # half the tokens swapped for pool pieces
    with pytest.raises(PlannerError, match="fewer than two windows"):
        WindowData(stream[:20], 16, 4, 0.0, np.arange(5), seed=0)


def test_recovery_of_a_causal_lm(tiny_llama, tmp_path, calib_file, heldout_file):
    """Distillation moves a pruned Llama towards its teacher: KL of the next-token distributions and the
    per-block MSE fall, held-out perplexity gets closer to the teacher's, the architecture and the generate()
    path are untouched, and the saved directory loads with plain transformers."""
    from planner.config import RecoverConfig
    from planner.stages.distill import logit_kl
    from planner.stages.verify import lm_quality
    student = _lm_student(tiny_llama, tmp_path / "s")
    cfg = RecoverConfig(data_path=str(calib_file), steps=24, batch_size=8, max_len=32, eval_every=8, ckpt_every=8,
                        lr=3e-3, minutes=None, substitute=0.0)
    rep = planner.recover(student, tiny_llama, cfg, out=tmp_path / "r", progress=False)
    h = rep.history
    assert [r["step"] for r in h] == [0, 8, 16, 24]
    assert {"val_hidden", "val_logit", "val_ppl"} <= set(h[0])
    assert h[-1]["val_logit"] < 0.7 * h[0]["val_logit"] and h[-1]["val_hidden"] < h[0]["val_hidden"]
    assert rep.spec == [s.to_dict() for s in planner.adapters.checkpoint.load_model(student)[1].spec(planner.load(student))]
    # on held-out text (random weights: perplexity itself means little, closeness to the teacher does)
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_llama))
    texts = planner.data.read_lines(heldout_file, "heldout.txt")[:48]
    w = planner.data.token_windows(tok, texts, 32)                    # (N, 32)
    teacher = planner.load(tiny_llama)
    with torch.no_grad():
        zt = teacher(input_ids=w).logits
        kl = {n: float(logit_kl(planner.load(d)(input_ids=w).logits, zt, 1.0))
              for n, d in (("oneshot", student), ("recovered", tmp_path / "r"))}
    assert kl["recovered"] < 0.7 * kl["oneshot"], kl
    q = {n: lm_quality(teacher, planner.load(d), tok, texts, window=32)["top1_agree"]
         for n, d in (("oneshot", student), ("recovered", tmp_path / "r"))}
    assert q["recovered"] > q["oneshot"], q
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "r"), trust_remote_code=True).eval()
    x = torch.randint(5, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, planner.load(tmp_path / "r")(input_ids=x).logits)
        g = hf.generate(x, max_new_tokens=5, do_sample=False)
        ids = x
        for _ in range(5):                                           # the cache path equals a loop without cache
            ids = torch.cat([ids, hf(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(g, ids)


def test_gradual_family_of_a_causal_lm(tiny_llama, tmp_path, calib_file, heldout_file):
    """compress on a decode profile: each member planned from the recovered previous one, verified in the
    profile's regime with perplexity columns in the family table."""
    from planner.config import RecoverConfig
    prof, ppath = planner.profile(tiny_llama, ProfileConfig(batch_size=2, seq_len=16, mode="decode", rounds=1,
                                                            threads=1, n_mixed=0), out=tmp_path / "p.json",
                                  progress=False)
    prof, ppath = steady_profile(prof, tmp_path / "steady.json")   # a busy machine once left t1 at 1.0x (CI run 7)
    top = prof.max_speedup()
    t1, t2 = round(1 + 0.2 * (top - 1), 2), round(1 + 0.5 * (top - 1), 2)
    df = planner.compress(tiny_llama, ppath, tmp_path / "fam",
                          PlanConfig(search=0, loop_rounds=0, targets=(t2, t1), calib_path=str(calib_file), n_calib=48, calib_max_len=32),
                          RecoverConfig(data_path=str(calib_file), steps=3, batch_size=4, max_len=32, minutes=None,
                                        eval_every=3, ckpt_every=3),
                          VerifyConfig(batch_size=2, seq_len=16, reps=3, threads=1, n_text=24, mode="decode",
                                       text_path=str(heldout_file), ppl_window=32), progress=False)
    assert list(df["target"]) == [t1, t2]
    assert {"ppl", "ppl_increase", "top1_agree", "oneshot_ppl_increase"} <= set(df.columns)
    assert (df["ppl"] > 1).all() and (df["predicted"] >= [t1 * 0.999, t2 * 0.999]).all()
    assert "ppl_increase" in (tmp_path / "fam" / "family.md").read_text()
