"""--device cuda end to end: a CUDA profile (float32, float16), plan + apply + verify on the GPU, offloaded apply
against the plain one, OBS on the GPU against the CPU, and a tiny Llama in bfloat16.

The GPU tests carry the `gpu` marker (`pytest -m gpu tests/test_gpu.py`, benchmarks/gpu_check.sh) and skip with a
reason where CUDA is absent. The CPU tests run everywhere: --offload's code path (moving to the device the model
is already on) gives the same weights as the plain apply, and asking for CUDA where there is none fails in one
line for every command.
"""
import pytest
import torch
from click.testing import CliRunner

import planner
from planner.adapters.checkpoint import Checkpoint, load_model
from planner.algorithms import obs
from planner.cli import main
from planner.config import ApplyConfig, PlanConfig, ProfileConfig, RecoverConfig, VerifyConfig
from planner.errors import PlannerError
from planner.stages import plan as plan_stage
from planner.stages.apply import apply_
from planner.stages.calibration import calibration_batches
from planner.types import Plan

from .conftest import target_inside
from .test_decoder_pipeline import make_tiny_llama

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the error where CUDA is absent; this machine has it")

# tiny models time in microseconds: few rounds, no noise repeats; the loop and the search get their own small runs
QUICK = dict(batch_size=2, seq_len=16, rounds=1, n_mixed=2, extra_minutes=0.0)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64, on the host."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_weights(m1, m2, tol: float):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        if s1[k].is_floating_point():
            assert rel_diff(s1[k], s2[k]) <= tol, f"{k}: relative difference {rel_diff(s1[k], s2[k]):.2e} > {tol}"
        else:
            assert torch.equal(s1[k].cpu(), s2[k].cpu()), k


def hand_plan(model, adapter, keep_attn: int, keep_ffn: int) -> Plan:
    """Every block at `keep_attn` attention units and `keep_ffn` neurons (no profile or database needed: the
    magnitude order chooses, the sequential refit fits)."""
    layers = [{"heads": keep_attn, "ffn": keep_ffn} for _ in adapter.layers(model)]
    return Plan(method="hand", target_speedup=1.5, predicted_time=1.0, predicted_speedup=1.5, base_time=1.5,
                layers=layers, total_error=0.0, profile={}, model={})


# ------------------------------------------------------------------------------------------- CPU, every machine

@pytest.mark.parametrize("family", ["bert", "llama"])
def test_offloaded_apply_equals_plain_apply_on_cpu(family, tiny_bert, calib_file, tmp_path):
    """apply_ with offload=True, the device being the host: every move is a no-op, the weights are the same."""
    path = tiny_bert if family == "bert" else make_tiny_llama(tmp_path / "llama")
    ck = Checkpoint.open(path)
    batches, _ = calibration_batches(ck, str(calib_file), 32, 32, 8)
    plain, ad = load_model(path)
    off, _ = load_model(path)
    p = hand_plan(plain, ad, 2, 64)
    apply_(plain, ad, p, select="magnitude", batches=batches, progress=False)
    apply_(off, ad, p, select="magnitude", batches=batches, progress=False, device="cpu", offload=True)
    assert_same_weights(off, plain, 0.0)
    assert [s.to_dict() for s in ad.spec(off)] == [{"heads": 2, "ffn": 64}] * len(p.layers)


def test_offload_flag_through_the_api(tiny_bert, calib_file, tmp_path):
    """planner.apply with ApplyConfig(offload=True) writes the same checkpoint as without."""
    m, ad = load_model(tiny_bert)
    p = hand_plan(m, ad, 3, 96)
    kw = dict(calib_path=str(calib_file), select="magnitude", progress=False)
    planner.apply(tiny_bert, p, tmp_path / "plain", **kw)
    planner.apply(tiny_bert, p, tmp_path / "off", cfg=ApplyConfig(offload=True), **kw)
    assert_same_weights(load_model(tmp_path / "off")[0], load_model(tmp_path / "plain")[0], 0.0)


@no_cuda
def test_cuda_asked_for_without_cuda_fails_in_one_line(tiny_bert, tmp_path):
    ck = Checkpoint.open(tiny_bert)
    m, ad = load_model(tiny_bert)
    calls = {
        "load": lambda: planner.load(tiny_bert, "cuda"),
        "profile": lambda: planner.profile(tiny_bert, ProfileConfig(device="cuda"), out=tmp_path / "p.json"),
        "plan": lambda: plan_stage.plan(ck, None, None, PlanConfig(device="cuda"), tmp_path / "plan"),
        "apply": lambda: planner.apply(tiny_bert, hand_plan(m, ad, 2, 64), tmp_path / "a", select="magnitude",
                                       cfg=ApplyConfig(device="cuda")),
        "verify": lambda: planner.verify(tiny_bert, tiny_bert, VerifyConfig(device="cuda")),
        "recover": lambda: planner.recover(tiny_bert, tiny_bert, RecoverConfig(device="cuda"), out=tmp_path / "r"),
    }
    for name, call in calls.items():
        with pytest.raises(PlannerError, match="CUDA is not available here") as e:
            call()
        assert "\n" not in str(e.value), name
    r = CliRunner().invoke(main, ["run", str(tiny_bert), "--device", "cuda", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "CUDA is not available" in r.output
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------ CUDA

@pytest.fixture(scope="module")
def cuda_profile(tiny_bert, tmp_path_factory):
    if not CUDA:
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    path = tmp_path_factory.mktemp("cuda-prof") / "p.json"
    prof, _ = planner.profile(tiny_bert, ProfileConfig(device="cuda", **QUICK), out=path, progress=False)
    return prof, path


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_profile_of_a_tiny_bert(tiny_bert, tmp_path, dtype):
    prof, path = planner.profile(tiny_bert, ProfileConfig(device="cuda", dtype=dtype, **QUICK),
                                 out=tmp_path / "p.json", progress=False)
    assert prof.hardware["device"] == "cuda" and prof.hardware["name"] == torch.cuda.get_device_name()
    assert prof.dtype == dtype and prof.base["median"] > 0
    for kind in ("attn", "ffn"):
        t = prof.times(kind)
        assert all(x >= 0 and x == x for x in t.median) and len(t.widths) >= 2
    assert planner.LatencyProfile.load(path).hardware["key"] == prof.hardware["key"]


@pytest.mark.gpu
@needs_cuda
def test_plan_apply_verify_on_cuda(tiny_bert, cuda_profile, calib_file, heldout_file, tmp_path):
    """The database, the closed loop and the search on the GPU; apply there matches apply on the CPU."""
    prof, ppath = cuda_profile
    cfg = PlanConfig(targets=(target_inside(prof),), calib_path=str(calib_file), n_calib=64, calib_max_len=32,
                     device="cuda", search=4, search_minutes=0.5, loop_rounds=1)
    [p] = planner.plan(tiny_bert, ppath, cfg, tmp_path / "plans", progress=False)
    out, model = planner.apply(tiny_bert, p, tmp_path / "gpu", progress=False, cfg=ApplyConfig(device="cuda"))
    assert next(model.parameters()).device.type == "cuda"
    spec = [s.to_dict() for s in planner.adapters.adapter_for(model).spec(model)]
    assert spec == [{"heads": l["heads"], "ffn": l["ffn"]} for l in p.layers]
    _, on_cpu = planner.apply(tiny_bert, p, tmp_path / "cpu", progress=False)
    # same kept structures; the refit's float64 least squares on float32 activations agree across devices
    assert_same_weights(model, on_cpu, 1e-3)
    rep = planner.verify(tiny_bert, out, VerifyConfig(device="cuda", batch_size=2, seq_len=16, reps=3, max_reps=6,
                                                      n_text=24, text_path=str(heldout_file)),
                         profile_path=ppath, progress=False)
    assert rep.conditions["device"] == "cuda" and rep.measured_speedup > 0
    assert 0 < rep.quality["cosine"] <= 1 + 1e-6


@pytest.mark.gpu
@needs_cuda
def test_offloaded_apply_equals_plain_apply_on_cuda(tiny_bert, cuda_profile, calib_file, tmp_path):
    prof, ppath = cuda_profile
    cfg = PlanConfig(targets=(target_inside(prof),), calib_path=str(calib_file), n_calib=64, calib_max_len=32,
                     device="cuda", search=0, loop_rounds=0, offload=True)
    [p] = planner.plan(tiny_bert, ppath, cfg, tmp_path / "plans", progress=False)
    _, plain = planner.apply(tiny_bert, p, tmp_path / "plain", progress=False, cfg=ApplyConfig(device="cuda"))
    _, off = planner.apply(tiny_bert, p, tmp_path / "off", progress=False,
                           cfg=ApplyConfig(device="cuda", offload=True))
    assert {t.device.type for t in off.state_dict().values()} == {"cpu"}     # the model stayed in host memory
    assert_same_weights(off, plain, 1e-5)


@pytest.mark.gpu
@needs_cuda
def test_only_the_layers_outside_the_blocks_visit_the_gpu_for_the_capture():
    """What offloading puts on the GPU for the forward up to the first block: embeddings, the rotary table (a
    buffer), the tied LM head (the embedding's own Parameter, moved once, still tied), never a block; all back
    on the host afterwards, unchanged."""
    import transformers

    from planner.stages.apply import _outside_blocks_on
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = model.model.layers
    with _outside_blocks_on(model, blocks, torch.device("cuda")):
        assert {t.device.type for t in (*blocks.parameters(), *blocks.buffers())} == {"cpu"}
        rest = {n: t.device.type for n, t in (*model.named_parameters(), *model.named_buffers())
                if not n.startswith("model.layers.")}
        assert set(rest.values()) == {"cuda"} and "model.rotary_emb.inv_freq" in rest
        assert model.lm_head.weight is model.model.embed_tokens.weight
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], before[k]) for k in before)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("group_size", [1, 16])
def test_group_obs_on_cuda_equals_cpu(group_size):
    g = torch.Generator().manual_seed(0)
    d_out, d_in, n = 48, 128, 1024
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d_in, dtype=torch.float64)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)         # (d_out, d_in)
    H = 2.0 / n * X.T @ X                                                  # (d_in, d_in)
    levels = [d_in // group_size // 2, 1]
    cpu = obs.group_obs(W, H, group_size=group_size, snapshot_levels=levels)
    gpu = obs.group_obs(W.cuda(), H.cuda(), group_size=group_size, snapshot_levels=levels, device="cuda")
    assert torch.equal(gpu.order.cpu(), cpu.order)
    assert rel_diff(gpu.loss, cpu.loss) < 1e-9
    for lv in levels:
        assert gpu.snapshots[lv].device.type == "cuda"
        assert rel_diff(gpu.snapshots[lv], cpu.snapshots[lv]) < 1e-9
    kept = cpu.kept_columns(levels[0], group_size)
    assert rel_diff(obs.reconstruct(W.cuda(), H.cuda(), kept.cuda()), obs.reconstruct(W, H, kept)) < 1e-9


@pytest.mark.gpu
@needs_cuda
def test_tiny_llama_on_cuda_in_bfloat16(tmp_path, calib_file, heldout_file):
    """A decode profile in bfloat16, the database on the GPU, apply offloaded, verify timing bfloat16 models."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    llama = make_tiny_llama(tmp_path / "llama")
    prof, ppath = planner.profile(llama, ProfileConfig(device="cuda", dtype="bfloat16", mode="decode",
                                                       decode_steps=4, **QUICK), out=tmp_path / "p.json",
                                  progress=False)
    assert prof.dtype == "bfloat16" and prof.mode == "decode" and prof.base["median"] > 0
    cfg = PlanConfig(targets=(target_inside(prof),), calib_path=str(calib_file), n_calib=64, calib_max_len=32,
                     device="cuda", search=0, loop_rounds=0)
    [p] = planner.plan(llama, ppath, cfg, tmp_path / "plans", progress=False)
    out, model = planner.apply(llama, p, tmp_path / "small", progress=False,
                               cfg=ApplyConfig(device="cuda", offload=True))
    assert next(model.parameters()).device.type == "cpu"
    rep = planner.verify(llama, out, VerifyConfig(device="cuda", batch_size=2, seq_len=16, reps=3, max_reps=6,
                                                  n_text=24, text_path=str(heldout_file), ppl_window=32),
                         profile_path=ppath, progress=False)
    assert rep.conditions["dtype"] == "bfloat16" and rep.conditions["mode"] == "decode"
    q = rep.quality
    assert q["ppl_dense"] > 1 and q["ppl"] > 1 and 0 <= q["top1_agree"] <= 1 and "tokens_per_s" in q
