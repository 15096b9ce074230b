"""The project's own small LM: deterministic text, a working tokenizer, deterministic training, the cache, and
a perplexity that matches a hand computation. A micro config keeps the whole file to a few seconds."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import transformers

from benchmarks import tinylm
from planner.data import CALIBRATION, HELDOUT, read_lines

# hidden 32, 2 layers, 4 query / 2 KV heads (GQA), byte-level BPE with 300 tokens, ~0.5 MB of text, 30 steps
MICRO = tinylm.TinyLMConfig(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=300, max_positions=64,
                            window=32, batch=8, steps=30, lr=1e-2, train_chars=150_000, calib_repeat=1,
                            eval_passages=40, autocast="fp32", threads=1)   # 1 thread: tiny ops, no OpenMP waits


def test_generator_deterministic_and_splits_disjoint():
    a, b = tinylm.generate(300, seed=5), tinylm.generate(300, seed=5)
    assert a == b
    assert tinylm.generate(300, seed=6) != a
    train = set(tinylm.generate(3000, tinylm.TRAIN_SEED, "train"))
    held = tinylm.lm_heldout_text(300)
    assert held == tinylm.lm_heldout_text(300)
    assert not train & set(held)
    # the hash buckets make the splits disjoint even from the same seed
    assert not set(tinylm.generate(2000, 7, "train")) & set(tinylm.generate(500, 7, "heldout"))
    # English-like text with the structure the grammar promises
    text = " ".join(a)
    assert len(set(re.findall(r"[a-z]+", text))) > 1500
    assert re.search(r"\bhas (\w+) \w+s\b", text) and "How many" in text and " things: " in text


_NUM = {tinylm.number_words(i): i for i in range(1000)} | {str(i): i for i in range(1000)}
_NAME = r"([A-Z][a-z]+(?: [A-Z][a-z]+)?)"


def test_count_facts_are_consistent():
    """Counts in a passage add up and are recalled right: "X has 3 cups." then "Y gives X four more cups, so X now
    has seven cups." then "How many cups does X have? She has seven." (present-tense passages)."""
    states = [(re.compile(rf"^{_NAME} has (\S+) (\w+)$"), "set"),
              (re.compile(rf"^\w[\w ]* gives {_NAME} (\S+) more (\w+), so \1 now has (\S+) \3$"), "add"),
              (re.compile(rf"^{_NAME} (?:loses|sells|breaks|gives away) (\S+) of the (\w+), and (\S+) \w+ (?:are|is) "
                          r"left$"), "sub")]
    question, answer = re.compile(rf"^How many (\w+) does {_NAME} have\?$"), re.compile(r"^(?:He|She) has (\S+)\.$")
    checked = 0
    for p in tinylm.generate(1500, seed=3):
        count, asked = {}, None                               # (name, noun) -> the count the passage stated
        for sent in re.split(r"(?<=[.!?]) ", p):
            if asked is not None:                             # only what was said can be recalled
                assert count[asked] == _NUM[answer.match(sent)[1]], p
                asked, checked = None, checked + 1
                continue
            if (m := question.match(sent)):
                asked = (m[2], m[1])
                continue
            sent = sent.rstrip(".!?")
            for rx, op in states:
                if (m := rx.match(sent)):
                    if op == "set":
                        count[m[1], m[3]] = _NUM[m[2]]
                    else:
                        before = count.get((m[1], m[3]))
                        delta = _NUM[m[2]] if op == "add" else -_NUM[m[2]]
                        assert before is not None and before + delta == _NUM[m[4]], p
                        count[m[1], m[3]] = _NUM[m[4]]
                        checked += 1
    assert checked > 100


def test_heldout_txt_never_in_training_text():
    cfg = replace(MICRO, train_chars=1_000_000, calib_repeat=2)
    passages = tinylm.training_passages(cfg)
    held = read_lines(None, HELDOUT)
    assert not set(held) & set(passages)
    text = "\n".join(passages)
    long_held = [h for h in held if len(h.split()) >= 6]
    assert not [h for h in long_held if h in text]
    calib = read_lines(None, CALIBRATION)
    assert sum(p in set(calib) for p in passages) == 2 * len(calib)      # calibration is in, twice
    assert not set(tinylm.lm_heldout_text(200)) & set(passages)


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    return tinylm.train(tmp_path_factory.mktemp("tinylm") / "micro", MICRO, progress=False)


def test_tokenizer_roundtrip_and_special_tokens(micro_dir):
    tok = transformers.AutoTokenizer.from_pretrained(micro_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len(tok) <= MICRO.vocab
    for text in ["Maya has seven cups, and 12 are left.", "Ünïcödé & emoji ☕ — fine!", "  two  spaces\tand tab"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_micro_training_is_deterministic_and_learns(micro_dir, tmp_path):
    again = tinylm.train(tmp_path / "again", MICRO, progress=False)
    info_a = tinylm.io.read_json(micro_dir / "train.json")
    info_b = tinylm.io.read_json(again / "train.json")
    assert info_a["loss_history"] == info_b["loss_history"]
    assert info_a["text"]["sha"] == info_b["text"]["sha"]
    ma = transformers.AutoModelForCausalLM.from_pretrained(micro_dir)
    mb = transformers.AutoModelForCausalLM.from_pretrained(again)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma.config.num_key_value_heads == 2 and ma.config.num_attention_heads == 4
    # learned: lower held-out perplexity than the same architecture untrained (same seed)
    tok = transformers.AutoTokenizer.from_pretrained(micro_dir)
    torch.manual_seed(MICRO.seed)
    init = tinylm.build_model(MICRO, tok)
    held = tinylm.lm_heldout_text(MICRO.eval_passages, MICRO.heldout_seed)
    ppl_init = tinylm.perplexity(init, tok, held, window=MICRO.window)
    ppl = tinylm.perplexity(ma, tok, held, window=MICRO.window)
    assert ppl == pytest.approx(info_a["ppl_heldout_generated"], rel=1e-4)
    assert ppl < 0.7 * ppl_init, (ppl, ppl_init)
    assert info_a["train_loss"] < info_a["first_loss"] - 0.5


def test_ensure_caches_and_retrains_when_corrupt(tmp_path, monkeypatch):
    calls = []
    real = tinylm.train

    def counting(out_dir, cfg, progress=True):
        calls.append(out_dir)
        return real(out_dir, cfg, progress)

    monkeypatch.setattr(tinylm, "train", counting)
    cfg = replace(MICRO, steps=5)
    d1 = tinylm.ensure(tmp_path, cfg, progress=False)
    assert d1.name == f"tinylm-{tinylm.cache_key(cfg)}" and d1.parent == tmp_path and len(calls) == 1
    mtime = (d1 / "model.safetensors").stat().st_mtime_ns
    assert tinylm.ensure(tmp_path, cfg, progress=False) == d1 and len(calls) == 1      # reused
    assert (d1 / "model.safetensors").stat().st_mtime_ns == mtime
    (d1 / "train.json").write_text("{not json")                                        # corrupt -> retrain
    assert tinylm.ensure(tmp_path, cfg, progress=False) == d1 and len(calls) == 2
    assert tinylm.is_trained(d1, tinylm.cache_key(cfg))
    (d1 / "train.json").unlink()                                                       # absent -> retrain
    assert tinylm.ensure(tmp_path, cfg, progress=False) == d1 and len(calls) == 3
    assert tinylm.cache_key(replace(cfg, steps=6)) != tinylm.cache_key(cfg)
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path))                                 # default cache location
    assert tinylm.ensure(cfg=cfg, progress=False) == d1 and len(calls) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]               # no temp dirs left


def test_perplexity_matches_hand_computation(micro_dir):
    tok = transformers.AutoTokenizer.from_pretrained(micro_dir)
    torch.manual_seed(0)
    model = tinylm.build_model(MICRO, tok).eval()
    texts = ["Maya has seven cups.", "Two plus two is four. The kettle clicked off."]
    window = 8
    ids = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    nll, n = 0.0, 0
    for s in range(0, len(ids), window):
        w = ids[s:s + window]
        if len(w) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0].double(), -1)   # (T, V)
        for i in range(1, len(w)):
            if w[i] != tok.bos_token_id:                    # BOS after EOS is not scored
                nll -= logp[i - 1, w[i]].item()
                n += 1
    got = tinylm.perplexity(model, tok, texts, window=window, batch=3)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert not model.training
