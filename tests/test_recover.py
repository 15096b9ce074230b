"""Recovery by distillation: the losses against hand-computed references, the loop on a tiny model, resume
after an interruption, the architecture left alone, and bad input through the CLI."""
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file

import planner
from planner.adapters.checkpoint import Checkpoint, load_model, save_portable
from planner.cli import main
from planner.config import RecoverConfig, VerifyConfig
from planner.data import read_lines
from planner.errors import PlannerWarning
from planner.stages import distill as R
from planner.types import RecoverReport

from .conftest import inputs, make_tiny

FAST = dict(batch_size=8, eval_every=4, ckpt_every=4, lr=2e-3, minutes=None)


def make_student(teacher: Path, out: Path) -> Path:
    """A compressed copy of `teacher`: heads and neurons removed (one attention module entirely), no re-fit."""
    m, a = load_model(teacher)
    blocks = a.layers(m)
    a.shrink_(blocks[0], "attn", torch.tensor([0, 2]), None, m.config)
    a.shrink_(blocks[0], "ffn", torch.arange(0, m.config.intermediate_size, 3), None, m.config)
    a.shrink_(blocks[1], "attn", torch.tensor([], dtype=torch.long), None, m.config)
    a.shrink_(blocks[1], "ffn", torch.arange(0, m.config.intermediate_size, 4), None, m.config)
    return save_portable(m, a, teacher, out)


@pytest.fixture(scope="module")
def student(tiny_bert, tmp_path_factory) -> Path:
    return make_student(tiny_bert, tmp_path_factory.mktemp("student") / "s")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("train") / "train.txt"
    p.write_text("\n".join(read_lines(None)[:64]) + "\n")
    return p


def _weights(d: Path) -> dict:
    return load_file(str(d / "model.safetensors"))


# ------------------------------------------------------------------------------------------------- losses

def test_hidden_loss_is_zero_for_the_teacher_itself(tiny_bert):
    m, a = load_model(tiny_bert)
    x = inputs(m.config.vocab_size)
    out = a.distill_outputs(m, x["input_ids"], x["attention_mask"])
    assert len(out["hidden"]) == 2 and out["hidden"][0].shape == (2, 12, 64)
    ls = R.losses(out, out, x["attention_mask"].bool(), RecoverConfig())
    assert ls["hidden"].item() == 0.0
    assert ls["embed"].item() == pytest.approx(0.0, abs=1e-6)         # cosine 1


def test_hidden_loss_reference():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 5, 4, generator=g) for _ in range(3)]
    s = [x + 0.1 * torch.randn(2, 5, 4, generator=g) for x in t]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    s[0][1, 4] += 100.0                                              # padding never counts
    want = np.mean([((a[mask] - b[mask]) ** 2).sum().item() / (b[mask] ** 2).sum().item() for a, b in zip(s, t)])
    assert R.hidden_loss(s, t, mask).item() == pytest.approx(want, rel=1e-6)


def _np_kl(zs, zt, T):
    ps = np.exp(zs / T) / np.exp(zs / T).sum(-1, keepdims=True)
    pt = np.exp(zt / T) / np.exp(zt / T).sum(-1, keepdims=True)
    return float((pt * (np.log(pt) - np.log(ps))).sum(-1).mean() * T * T)


def test_logit_kl_on_a_classification_head(tmp_path):
    teacher = make_tiny(tmp_path / "t", arch="BertForSequenceClassification")
    m_t, a = load_model(teacher)
    m_s = make_student(teacher, tmp_path / "s")
    m_s, _ = load_model(m_s)
    with torch.no_grad():                                            # a head that disagrees clearly
        m_s.classifier.weight.add_(torch.randn(m_s.classifier.weight.shape, generator=torch.Generator().manual_seed(0)))
    assert a.head_kind(m_t) == "sequence" and a.head_kind(m_s) == "sequence"
    x = inputs(m_t.config.vocab_size, b=3)
    with torch.no_grad():
        ot = a.distill_outputs(m_t, x["input_ids"], x["attention_mask"])
        os_ = a.distill_outputs(m_s, x["input_ids"], x["attention_mask"])
    assert os_["embedding"] is None and ot["logits"].shape == (3, 2)
    cfg = RecoverConfig(temperature=2.0)
    ls = R.losses(os_, ot, x["attention_mask"].bool(), cfg)
    want = _np_kl(os_["logits"].double().numpy(), ot["logits"].double().numpy(), 2.0)
    assert ls["logit"].item() == pytest.approx(want, rel=1e-5) and want > 0
    assert ls["total"].item() == pytest.approx(ls["hidden"].item() + want, rel=1e-5)
    # task loss: cross-entropy on the given labels only (-100 = no label)
    labels = torch.tensor([1, -100, 0])
    ls = R.losses(os_, ot, x["attention_mask"].bool(), RecoverConfig(task_weight=0.5), labels)
    z = os_["logits"].double().numpy()
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert ls["task"].item() == pytest.approx(-(logp[0, 1] + logp[2, 0]) / 2, rel=1e-5)


def test_logit_kl_per_token_ignores_padding():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    want = _np_kl(zs[mask].double().numpy(), zt[mask].double().numpy(), 1.5)
    assert R.logit_kl(zs, zt, 1.5, mask).item() == pytest.approx(want, rel=1e-5)


def test_embed_loss_reference():
    g = torch.Generator().manual_seed(2)
    es = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    et = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    want = np.mean([1 - float(es[i] @ et[i]) for i in range(4)])
    assert R.embed_loss(es, et).item() == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------------------------------- data

def test_training_data_is_a_function_of_the_index():
    ids = [list(range(10 + i, 20 + i)) for i in range(40)]
    mk = lambda: R.DistillData(ids, R.Special(1, 2, 0), np.arange(100, 200), 8, 32, concat=0.5,   # noqa: E731
                               substitute=0.2, seed=3, labels=list(range(40)))
    a, b = mk(), mk()
    for m in (7, 0, 3, 12):                                          # any order, other instances: same batches
        x, y = a.batch(m), b.batch(m)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    seen_labels = []
    for m in range(a.n_per_epoch):                                   # one epoch: every passage once
        x = a.batch(m)
        assert (x["input_ids"][:, 0] == 1).all() and x["input_ids"].shape[0] == 8
        lens = x["attention_mask"].sum(1)
        assert (x["input_ids"][torch.arange(8), lens - 1] == 2).all()   # [SEP] closes every sequence
        assert lens.max() - lens.min() <= 12                         # length-sorted: little padding
        seen_labels += x["labels"].tolist()
        for r in torch.nonzero(x["labels"] >= 0).flatten():          # labels survive only on untouched passages
            assert x["input_ids"][r, 1:lens[r] - 1].tolist() == ids[x["labels"][r]]
    assert 0 < sum(l == -100 for l in seen_labels) < 40              # some joined or swapped, some left as they were
    longest = max(a.batch(m)["attention_mask"].sum(1).max().item() for m in range(a.n_per_epoch))
    assert longest > 12                                              # some were joined with a second passage
    swapped = sum(((a.batch(m)["input_ids"] >= 100) & (a.batch(m)["input_ids"] < 200)).sum().item()
                  for m in range(a.n_per_epoch))
    assert swapped > 0
    assert not torch.equal(a.batch(0)["input_ids"], a.batch(a.n_per_epoch)["input_ids"])   # next epoch reshuffles


def test_plain_epochs_show_the_passages_as_they_are_first():
    ids = [list(range(10 + i, 20 + i)) for i in range(40)]
    d = R.DistillData(ids, R.Special(1, 2, 0), np.arange(100, 200), 8, 32, concat=0.5, substitute=0.2, seed=3,
                      labels=list(range(40)), plain_epochs=1)

    def epoch(e):
        return [d.batch(e * d.n_per_epoch + m) for m in range(d.n_per_epoch)]

    first = epoch(0)                                                 # every passage once, unaltered, labelled
    got = sorted(tuple(x["input_ids"][r, 1:int(x["attention_mask"][r].sum()) - 1].tolist())
                 for x in first for r in range(len(x["input_ids"])))
    assert got == sorted(map(tuple, ids))
    assert all((x["labels"] >= 0).all() for x in first)
    second = epoch(1)                                                # then the variants start
    assert any((x["labels"] == -100).any() for x in second)
    assert any(((x["input_ids"] >= 100) & (x["input_ids"] < 200)).any() for x in second)


# ------------------------------------------------------------------------------------------------- loop

@pytest.fixture(scope="module")
def recovered(student, tiny_bert, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "r"
    cfg = RecoverConfig(data_path=str(train_file), steps=12, **FAST)
    return out, cfg, planner.recover(student, tiny_bert, cfg, out=out, progress=False)


def test_distillation_moves_the_student_to_the_teacher(recovered, student, tiny_bert, heldout_file):
    out, cfg, rep = recovered
    h = rep.history
    assert [r["step"] for r in h] == [0, 4, 8, 12] and rep.steps == 12 and rep.stop == "schedule"
    assert h[-1]["val_total"] < 0.8 * h[0]["val_total"]
    assert h[-1]["val_hidden"] < h[0]["val_hidden"] and h[-1]["val_embed"] < h[0]["val_embed"]
    assert rep.best_step == min(h, key=lambda r: r["val_total"])["step"]
    assert rep.after["val_total"] == pytest.approx(min(r["val_total"] for r in h))
    # on text it never saw: the recovered student's blocks are closer to the teacher's than the one-shot's
    texts = read_lines(heldout_file, "heldout.txt")[:16]
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    x = tok(texts, padding=True, return_tensors="pt")
    t, a = load_model(tiny_bert)
    with torch.no_grad():
        ot = a.distill_outputs(t, x["input_ids"], x["attention_mask"])
        err = {}
        for name, d in (("oneshot", student), ("recovered", out)):
            m, _ = load_model(d)
            err[name] = R.hidden_loss(a.distill_outputs(m, x["input_ids"], x["attention_mask"])["hidden"],
                                      ot["hidden"], x["attention_mask"].bool()).item()
    assert err["recovered"] < 0.8 * err["oneshot"], err
    assert not (Path(str(out) + ".ckpt")).exists()                   # the resume point is gone once finished


def test_recovery_never_changes_the_architecture(recovered, student):
    out, _, rep = recovered
    cs, cr = (json.loads((d / "config.json").read_text()) for d in (student, out))
    assert cr["planner_layers"] == cs["planner_layers"] == rep.spec
    assert cr["planner"]["recover"]["steps"] == 12
    ws, wr = _weights(student), _weights(out)
    assert {k: v.shape for k, v in ws.items()} == {k: v.shape for k, v in wr.items()}
    assert torch.equal(ws["embeddings.word_embeddings.weight"], wr["embeddings.word_embeddings.weight"])  # frozen
    assert not torch.equal(ws["encoder.layer.0.output.dense.weight"], wr["encoder.layer.0.output.dense.weight"])
    hf = transformers.AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    ours = planner.load(out)
    x = inputs(hf.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(hf(**x).last_hidden_state, ours(**x).last_hidden_state, atol=1e-6)
    assert RecoverReport.load(out / "recover.json") == rep


def test_sparse_modules_stay_sparse(tiny_bert, train_file, tmp_path):
    m, a = load_model(tiny_bert)
    layer = a.layers(m)[1]
    g = torch.Generator().manual_seed(0)
    ws = [getattr(p, n).weight.detach() * (torch.rand(getattr(p, n).weight.shape, generator=g) > 0.6)
          for p, n in a.linear_slots(layer, "ffn")]
    a.sparsify_(layer, "ffn", 0.6, ws)
    student = save_portable(m, a, tiny_bert, tmp_path / "s")
    cfg = RecoverConfig(data_path=str(train_file), steps=4, **FAST)
    rep = planner.recover(student, tiny_bert, cfg, out=tmp_path / "r", progress=False)
    assert rep.spec[1]["ffn_sparsity"] == 0.6
    w0, w1 = _weights(student), _weights(tmp_path / "r")
    for k in ("encoder.layer.1.intermediate.dense.weight", "encoder.layer.1.output.dense.weight"):
        assert torch.equal(w0[k] == 0, w1[k] == 0) and (w1[k] == 0).float().mean() > 0.5   # same zeros
        assert not torch.equal(w0[k], w1[k])                                                # the rest trained
    r, ra = load_model(tmp_path / "r")
    assert ra.spec(r) == a.spec(m)


def test_finished_run_is_not_redone(recovered, student, tiny_bert, monkeypatch):
    out, cfg, rep = recovered
    monkeypatch.setattr(R, "distill_", lambda *a, **k: pytest.fail("trained again"))
    again = planner.recover(student, tiny_bert, cfg, out=out, progress=False)
    assert again == rep


def test_interrupted_run_resumes_to_the_same_weights(recovered, student, tiny_bert, tmp_path):
    ref_out, cfg, ref = recovered
    out = tmp_path / "r"
    seen = []

    def interrupt(row, model):
        seen.append(row["step"])
        if row["step"] == 10:
            raise KeyboardInterrupt

    c = RecoverConfig(**{**cfg.to_dict(), "eval_every": 2})
    c_ref = planner.recover(student, tiny_bert, c, out=tmp_path / "ref", progress=False)
    with pytest.raises(KeyboardInterrupt):
        planner.recover(student, tiny_bert, c, out=out, progress=False, callback=interrupt)
    state = torch.load(tmp_path / "r.ckpt" / R.CKPT_FILE, weights_only=True)
    assert state["step"] == 8 and not (out / "config.json").exists()
    rep = planner.recover(student, tiny_bert, c, out=out, progress=False, callback=lambda r, m: seen.append(r["step"]))
    assert seen == [0, 2, 4, 6, 8, 10, 10, 12]                       # steps 9-10 redone after the step-8 checkpoint
    w0, w1 = _weights(tmp_path / "ref"), _weights(out)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)               # bit for bit on CPU with the fixed seed
    assert [r["val_total"] for r in rep.history] == [r["val_total"] for r in c_ref.history]


def test_the_jobs_recover_in_a_child_process_to_the_same_weights(recovered, student, tiny_bert, tmp_path,
                                                                monkeypatch):
    """recover.Apart (the main and gradual jobs, which time models after training: a process that trained timed
    a 3x model at 2.93x where it had timed 3.13x) runs the same recovery in a spawned child, errors included."""
    import multiprocessing

    from planner.errors import PlannerError
    from planner.stages import recover as recover_stage
    ref_out, cfg, ref = recovered
    cfg = cfg.replace(threads=torch.get_num_threads())              # the child starts with torch's default
    monkeypatch.setattr(R, "distill_", lambda *a, **k: pytest.fail("trained in this process"))
    with recover_stage.Apart() as apart:
        rep = apart.recover(student, tiny_bert, cfg, tmp_path / "r", progress=False)
        assert len(multiprocessing.active_children()) == 1
        with pytest.raises(PlannerError, match="--out must be a new directory"):      # one line, as raised there
            apart.recover(student, tiny_bert, cfg, tiny_bert, progress=False)
    assert not multiprocessing.active_children()                    # the child ends with the block
    w0, w1 = _weights(ref_out), _weights(tmp_path / "r")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)               # the same computation, bit for bit
    assert [r["val_total"] for r in rep.history] == [r["val_total"] for r in ref.history]
    with recover_stage.Apart() as apart:                            # resumed with the recovery finished:
        assert apart.recover(student, tiny_bert, cfg, tmp_path / "r", progress=False) == rep
        assert not multiprocessing.active_children()                # the report is read here, no child started
    changed = cfg.replace(lr=cfg.lr / 2)                            # other settings: not the finished run
    assert recover_stage.finished(*map(Checkpoint.open, (student, tiny_bert)), changed, tmp_path / "r") is None


def test_verify_warns_in_a_process_that_has_trained(recovered, tiny_bert, monkeypatch):
    """Timing after training in the same process can read slow (3.13x before, 2.93x after): verify says so."""
    from planner import timing
    cfg = VerifyConfig(batch_size=2, seq_len=8, reps=3, max_reps=3, n_text=8)
    out, _, _ = recovered                                           # trained in this process
    assert timing.trained_here()
    with pytest.warns(PlannerWarning, match="this process has trained a model"):
        planner.verify(tiny_bert, out, cfg, progress=False)
    monkeypatch.setattr(timing, "_TRAINED_HERE", False)             # a fresh process: no such warning
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        planner.verify(tiny_bert, out, cfg, progress=False)
    assert not [w for w in got if "has trained" in str(w.message)]


def test_time_budget_fixes_the_step_count(student, tiny_bert, train_file, tmp_path):
    cfg = RecoverConfig(data_path=str(train_file), **{**FAST, "minutes": 0.05, "eval_every": 1000})
    rep = planner.recover(student, tiny_bert, cfg, out=tmp_path / "r", progress=False)
    assert rep.total_steps >= 1 and rep.steps <= rep.total_steps
    assert rep.stop in ("schedule", "time-budget") and rep.train_time < 3 * 0.05 * 60


def test_time_budget_follows_the_pace(student, tiny_bert, train_file, tmp_path, monkeypatch):
    """The first training passes (the ones the first estimate of the step count is timed on) are slow, as a
    machine's first calls can be, the rest fast: the step count follows the pace, so the budget is used and the
    learning rate has annealed at its end. (Planned from the first estimate alone, the run stopped early.)"""
    cls = type(Checkpoint.open(student).adapter)
    orig, slow = cls.distill_outputs, [5]

    def slow_start(self, model, ids, mask):
        if torch.is_grad_enabled() and slow[0] > 0:                 # a training pass of the student
            slow[0] -= 1
            time.sleep(0.15)
        return orig(self, model, ids, mask)

    monkeypatch.setattr(cls, "distill_outputs", slow_start)
    cfg = RecoverConfig(data_path=str(train_file), **{**FAST, "minutes": 0.05, "eval_every": 1000})
    rep = planner.recover(student, tiny_bert, cfg, out=tmp_path / "r", progress=False)
    assert slow[0] == 0 and rep.train_time > 0.8 * 0.05 * 60
    assert rep.history[-1]["lr"] < 0.2 * FAST["lr"]


def test_early_stopping_keeps_the_best(student, tiny_bert, train_file, tmp_path):
    cfg = RecoverConfig(data_path=str(train_file), steps=40, patience=1, **{**FAST, "lr": 0.3, "eval_every": 2})
    rep = planner.recover(student, tiny_bert, cfg, out=tmp_path / "r", progress=False)   # lr far too high
    assert rep.stop == "early-stop" and rep.steps < 40
    assert rep.after["val_total"] == min(r["val_total"] for r in rep.history)


# -------------------------------------------------------------------------------------------------- CLI

def _err(args, expect):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    assert expect.lower() in lines[0].lower(), lines[0]


def test_cli_recover_and_apply_shortcut(student, tiny_bert, train_file, tmp_path):
    args = ["recover", student, "--teacher", tiny_bert, "--data", train_file, "--steps", 4, "-b", 8,
            "--eval-every", 2, "--out", tmp_path / "r", "-q"]
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0 and "4 steps" in r.output and "recovered" in r.output, r.output
    assert RecoverReport.load(tmp_path / "r" / "recover.json").config["minutes"] is None


def test_cli_bad_input(student, tiny_bert, train_file, tmp_path):
    base = ["--data", train_file, "--steps", 2, "-b", 4]
    _err(["recover", tmp_path / "nope", "--teacher", tiny_bert, *base, "--out", tmp_path / "o"], "not found")
    wide = make_tiny(tmp_path / "wide", hidden=32, heads=2, ffn=64)
    _err(["recover", student, "--teacher", wide, *base, "--out", tmp_path / "o"], "hidden size")
    deep = make_tiny(tmp_path / "deep", layers=3)
    _err(["recover", student, "--teacher", deep, *base, "--out", tmp_path / "o"], "layer count")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    _err(["recover", student, "--teacher", tiny_bert, "--data", empty, "--steps", 2, "--out", tmp_path / "o"], "empty")
    _err(["recover", student, "--teacher", tiny_bert, *base, "--lr", 0, "--out", tmp_path / "o"], "--lr must be > 0")
    _err(["recover", student, "--teacher", tiny_bert, *base, "--plain-epochs", -1, "--out", tmp_path / "o"],
         "--plain-epochs must be >= 0")
    _err(["recover", student, "--teacher", tiny_bert, *base, "--out", student], "new directory")
    heldout = Path(planner.__file__).parent / "data" / "heldout.txt"
    _err(["recover", student, "--teacher", tiny_bert, "--data", heldout, "--steps", 2, "--out", tmp_path / "o"],
         "held-out")
    assert not (tmp_path / "o").exists()
    ck = tmp_path / "o.ckpt"
    ck.mkdir()
    (ck / R.CKPT_FILE).write_bytes(b"\x00 not a checkpoint")
    _err(["recover", student, "--teacher", tiny_bert, *base, "--out", tmp_path / "o"], "corrupted")
    torch.save({"version": R.CKPT_VERSION, "student": {}, "identity": {"other": 1}}, ck / R.CKPT_FILE)
    _err(["recover", student, "--teacher", tiny_bert, *base, "--out", tmp_path / "o"], "another run")
    assert not (tmp_path / "o").exists()
