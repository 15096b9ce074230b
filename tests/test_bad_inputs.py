"""Bad input a new user meets: wrong pairings, limits of the model's config, outputs that cannot be written,
tokenizers that do not fit. Each is one line on stderr, exit code 2, and nothing half-written."""
import errno
import json
import shutil
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import planner
from planner.config import PlanConfig, RecoverConfig
from planner.errors import PlannerError

from .conftest import _vocab, make_tiny, save_perturbed, steady_profile, target_inside
from .test_cli import FAST, _err, _ok
from .test_decoder_pipeline import make_tiny_llama


@pytest.fixture(scope="module")
def work(tiny_bert, calib_file, tmp_path_factory):
    """A profile, a plan and its compressed model of the tiny BERT, and a compressed tiny Llama."""
    root = tmp_path_factory.mktemp("bad")
    prof = root / "p.json"
    _ok(["profile", tiny_bert, *FAST, "--n-mixed", 3, "--out", prof, "-q"])
    # the subject is bad input, not the timer: module curves set by hand (a busy CI machine timed 0.889x of reach)
    steady_profile(planner.LatencyProfile.load(prof), prof)
    target = target_inside(planner.LatencyProfile.load(prof))
    _ok(["plan", "--search", 0, tiny_bert, "--profile", prof, "-x", target, "--calib", calib_file, "--n-calib", 32,
         "--loop-rounds", 0, "--out", root / "plans", "-q"])
    plan = root / "plans" / f"plan-{target:g}x.json"
    _ok(["apply", tiny_bert, plan, "--out", root / "small", "-q"])
    llama = make_tiny_llama(root / "llama")
    lprof = root / "lp.json"
    _ok(["profile", llama, *FAST, "--n-mixed", 3, "--out", lprof, "-q"])
    steady_profile(planner.LatencyProfile.load(lprof), lprof)
    lt = target_inside(planner.LatencyProfile.load(lprof))
    _ok(["plan", "--search", 0, llama, "--profile", lprof, "-x", lt, "--calib", calib_file, "--n-calib", 32,
         "--loop-rounds", 0, "--out", root / "lplans", "-q"])
    _ok(["apply", llama, root / "lplans" / f"plan-{lt:g}x.json", "--out", root / "lsmall", "-q"])
    return {"root": root, "profile": prof, "plan": plan, "target": target, "small": root / "small", "llama": llama,
            "lprofile": lprof, "lsmall": root / "lsmall"}


# --------------------------------------------------------------------------------------- wrong pairings

def test_verify_refuses_a_dense_model_of_another_architecture(work, tiny_bert, tmp_path):
    _err(["verify", work["llama"], work["small"], *FAST[2:6], "--reps", 3], "is a bert model, the dense one a llama")
    _err(["verify", tiny_bert, work["lsmall"], *FAST[2:6], "--reps", 3], "is a llama model, the dense one a bert")
    deeper = make_tiny(tmp_path / "deeper", layers=3)
    _err(["verify", deeper, work["small"], *FAST[2:6], "--reps", 3], "differ in layer count (2 vs 3)")


def test_verify_refuses_a_dense_checkpoint_it_was_not_made_from(work, tiny_bert, tmp_path, heldout_file):
    other = make_tiny(tmp_path / "other", seed=1)                  # the same shape, other weights
    line = _err(["verify", other, work["small"], *FAST[2:6], "--reps", 3], "made from another checkpoint")
    assert "dense model it was made from" in line
    assert planner.adapters.checkpoint.origin(planner.load(work["small"])) == planner.adapters.checkpoint.fingerprint(tiny_bert)
    copy = tmp_path / "copy"                                     # a copy of the right checkpoint is the same one
    shutil.copytree(tiny_bert, copy)
    _ok(["verify", copy, work["small"], *FAST[2:6], "--reps", 3, "--text", heldout_file])


def test_verify_refuses_a_profile_of_another_architecture(work, tiny_bert):
    _err(["verify", tiny_bert, work["small"], *FAST[2:6], "--reps", 3, "--profile", work["lprofile"]],
         "profile is for architecture llama")


def test_recover_refuses_a_teacher_it_was_not_made_from(work, tmp_path):
    other = make_tiny(tmp_path / "other", seed=1)
    _err(["recover", work["small"], "--teacher", other, "--steps", 1, "--out", tmp_path / "r"],
         "made from another checkpoint")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.ckpt").exists()


# ------------------------------------------------------------------------------- limits of the model

def test_sequence_longer_than_the_position_embeddings(work, tiny_bert, tmp_path, calib_file):
    # the tiny BERT has 160 positions, the tiny Llama rotary positions (no limit)
    _err(["profile", tiny_bert, "--seq-len", 161, "--batch-size", 1, "--out", tmp_path / "p.json"],
         "position embeddings for 160 tokens: use --seq-len at most 160")
    _err(["verify", tiny_bert, work["small"], "-b", 1, "-s", 400, "--reps", 3], "--seq-len 400 needs 400 positions")
    with pytest.raises(PlannerError, match="--calib-max-len 200 needs 200 positions"):
        planner.plan(tiny_bert, work["profile"], PlanConfig(search=0, targets=(work["target"],), calib_path=str(calib_file),
                                                            calib_max_len=200), tmp_path / "o", progress=False)
    with pytest.raises(PlannerError, match="--max-len 300 needs 300 positions"):
        planner.recover(work["small"], tiny_bert, RecoverConfig(steps=1, max_len=300), out=tmp_path / "r",
                        progress=False)
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_gpt2_decode_counts_the_cache_and_the_new_tokens(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=20)
    d = save_perturbed(transformers.GPT2LMHeadModel, cfg, tmp_path / "gpt2")
    line = _err(["profile", d, "--mode", "decode", "-b", 1, "-s", 20, "--out", tmp_path / "p.json"],
                "needs 36 positions")                     # 20 in the cache, 16 decoded (--decode-steps)
    assert "use --seq-len at most 4" in line
    _ok(["profile", d, "--mode", "decode", "-b", 1, "-s", 4, "--rounds", 1, "--n-mixed", 0, "--out", tmp_path / "q.json", "-q"])
    ad = planner.adapters.get_adapter("gpt2")
    assert ad.max_positions(cfg) == 20 and planner.adapters.get_adapter("llama").max_positions(None) is None
    rob = transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    assert planner.adapters.get_adapter("roberta").max_positions(rob) == 512   # positions start after padding


# ------------------------------------------------------------------------------- tokenizers that don't fit

def _word_tokenizer(vocab: list[str], **special) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special)


def test_causal_lm_tokenizer_without_an_end_of_text_token(work, tmp_path, calib_file):
    d = tmp_path / "noeos"
    shutil.copytree(work["llama"], d)
    for f in d.glob("*token*"):
        f.unlink()
    (d / "vocab.txt").unlink(missing_ok=True)
    _word_tokenizer(list(dict.fromkeys(_vocab()))).save_pretrained(str(d))
    line = _err(["plan", "--search", 0, d, "--profile", work["lprofile"], "-x", target_inside(planner.LatencyProfile.load(work["lprofile"])),
                 "--calib", calib_file, "--n-calib", 32,
                 "--out", tmp_path / "o"], "no EOS")
    assert "eos_token" in line and not (tmp_path / "o" / "db" / "index.json").exists()


def test_tokenizer_with_more_tokens_than_the_model_embeds(tmp_path, calib_file, heldout_file):
    """A small Qwen2 built for a 10-token vocabulary next to a tokenizer of 400 pieces (planner plan stopped with
    'IndexError: index out of range in self' inside the embedding)."""
    d = tmp_path / "qwen"
    d.mkdir()
    _word_tokenizer(list(dict.fromkeys(_vocab())), eos_token="[SEP]").save_pretrained(str(d))
    cfg = transformers.Qwen2Config(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    save_perturbed(transformers.Qwen2ForCausalLM, cfg, d)
    with pytest.raises(PlannerError, match="has 10 embeddings"):          # what `plan` calibrates on
        planner.api.calibration_batches(d, calib_file, 32, 32, 8)
    line = _err(["verify", d, d, *FAST[2:6], "--reps", 3, "--text", heldout_file], "has 10 embeddings (vocab_size)")
    assert "tokenizer" in line


# ------------------------------------------------------------------------------- outputs that can't be written

def test_outputs_that_are_existing_files_or_inputs(work, tiny_bert, tmp_path, calib_file):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    _err(["profile", tiny_bert, *FAST, "--out", tmp_path], "is a directory")
    _err(["plan", "--search", 0, tiny_bert, "--profile", work["profile"], "-x", 1.1, "--calib", calib_file, "--out", a_file],
         "is an existing file")
    _err(["apply", tiny_bert, work["plan"], "--out", a_file], "is an existing file")
    _err(["recover", work["small"], "--teacher", tiny_bert, "--steps", 1, "--out", a_file], "is an existing file")
    _err(["verify", tiny_bert, work["small"], *FAST[2:6], "--reps", 3, "--out", tmp_path], "is a directory")
    _err(["report", work["root"] / "plans", "--out", a_file], "is an existing file")
    _err(["run", "--search", 0, tiny_bert, "--out", a_file], "is an existing file")
    _err(["plan", "--search", 0, tiny_bert, "--profile", work["profile"], "-x", 1.1, "--calib", calib_file,
          "--out", a_file / "sub"], "is a file, not a directory")
    assert a_file.read_text() == "keep me\n"
    # the source model is never overwritten, nor a directory planner did not write
    before = sorted(p.name for p in Path(tiny_bert).iterdir())
    _err(["apply", tiny_bert, work["plan"], "--out", tiny_bert], "is an input of this command")
    assert sorted(p.name for p in Path(tiny_bert).iterdir()) == before
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    _err(["apply", tiny_bert, work["plan"], "--out", mine], "holds something planner did not write")
    assert (mine / "notes.txt").read_text() == "mine\n"
    _ok(["apply", tiny_bert, work["plan"], "--out", work["small"], "-q"])          # rewriting its own output is fine


@pytest.mark.parametrize("code,expect", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EACCES, "permission denied")])
def test_a_disk_that_fills_while_saving(work, tiny_bert, tmp_path, monkeypatch, code, expect):
    def full(self, path, *a, **kw):
        (Path(path) / "model.safetensors").write_bytes(b"\0" * 100)              # a part was written, then:
        raise OSError(code, "simulated", str(Path(path) / "model.safetensors"))
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    line = _err(["apply", tiny_bert, work["plan"], "--out", tmp_path / "m"], expect)
    assert "model.safetensors" in line
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_os_error_messages_are_one_line():
    from planner.errors import os_error_message
    for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENOENT, errno.EIO):
        msg = os_error_message(OSError(code, "why", "/some/file"))
        assert "\n" not in msg and "/some/file" in msg


def test_profile_listing_skips_other_planner_files(work, tmp_path):
    root = tmp_path / "r"
    (root / "v").mkdir(parents=True)
    shutil.copy(work["profile"], root / "p.json")
    shutil.copy(work["plan"], root / "v" / "plan.json")
    rows = json.loads(_ok(["profiles", "--root", root, "--json"]).output)
    assert [Path(r["path"]).name for r in rows] == ["p.json"]


def test_profile_of_other_threads_on_this_machine_plans(work, tiny_bert, tmp_path, calib_file):
    """The thread count is a condition of the profile, not another machine: a plan may run with any threads."""
    d = json.loads(Path(work["profile"]).read_text())
    assert d["hardware"]["threads"] == 1
    planner.hardware.set_threads(2)
    try:
        _ok(["plan", "--search", 0, tiny_bert, "--profile", work["profile"], "-x", work["target"], "--calib", calib_file,
             "--n-calib", 32, "--out", tmp_path / "o", "-q"])
    finally:
        planner.hardware.set_threads(1)
    assert (tmp_path / "o" / f"plan-{work['target']:g}x.json").exists()
