#!/usr/bin/env bash
# The prepared GPU check (issue #17): everything `--device cuda` must do, in one run of under 8 minutes on one
# H100/H200 (16 cores). Run from the repository root, in the project's environment:
#
#     benchmarks/gpu_check.sh                    # writes runs/gpu-check/ (or $OUT)
#
# Steps (each prints a header and its wall time; a summary ends the run, also when a step fails):
#   tests     python -m pytest -q -m gpu tests/test_gpu.py
#   profiles  GPU latency profiles of the default encoder (prefill b8 x s128, float32: the main job's) and of
#             the tiny Llama (decode b8 x s128, bfloat16), stored under profiles/<gpu>/<shape>/ and copied
#             to $OUT/profiles/ (what comes back from a device machine is $OUT)
#   run       the default encoder's main job on the GPU with a short search and recovery budget, reusing the
#             encoder profile above; its verify table is printed
#   scale     python benchmarks/bench_scale.py --shape 7b --blocks 4 --device cuda --offload --out $OUT/scale
#
# Settings (environment):
#   OUT=runs/gpu-check     where everything is written (logs in $OUT/logs/, summary in $OUT/summary.txt)
#   STEPS="tests profiles run scale"   which steps to run, in that order
#   DEVICE=cuda            --device of every step (cpu: a dry run of the script's plumbing)
#   ENCODER=, LM=          model directories (default: the embedded all-MiniLM-L6-v2; the trained tiny Llama
#                          from tinylm's cache, or, when it is not trained there, its architecture alone: a
#                          profile times shapes, not weights, and training it takes ~8 CPU minutes)
#   PROFILE_ROOT=profiles  where the profiles are filed
#   ENCODER_PROFILE_FLAGS, LM_PROFILE_FLAGS, RUN_FLAGS   the flags of those steps (defaults below)
#   LIMIT_TESTS=70 LIMIT_PROFILES=100 LIMIT_RUN=190 LIMIT_SCALE=120   seconds per step (killed past it: 480 s in all)
set -euo pipefail

OUT=${OUT:-runs/gpu-check}
STEPS=${STEPS:-tests profiles run scale}
DEVICE=${DEVICE:-cuda}
PROFILE_ROOT=${PROFILE_ROOT:-profiles}
ENCODER_PROFILE_FLAGS=${ENCODER_PROFILE_FLAGS:---mode prefill --batch-size 8 --seq-len 128 --dtype float32 --extra-minutes 0.25}
LM_PROFILE_FLAGS=${LM_PROFILE_FLAGS:---mode decode --batch-size 8 --seq-len 128 --dtype bfloat16 --extra-minutes 0.25}
# the main job's targets (README) with budgets that fit: 16 candidates / 15 s of search and 15 s of recovery per
# target (on the GPU each candidate's refit and scoring take well under a second)
RUN_FLAGS=${RUN_FLAGS:---speedup 1.5 --speedup 2 --speedup 3 --search 16 --search-minutes 0.25 --recover-minutes 0.25}
LIMIT_TESTS=${LIMIT_TESTS:-70}
LIMIT_PROFILES=${LIMIT_PROFILES:-100}
LIMIT_RUN=${LIMIT_RUN:-190}
LIMIT_SCALE=${LIMIT_SCALE:-120}

mkdir -p "$OUT/logs"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T_ALL=$SECONDS
CURRENT=""            # the step running now: the exit trap names it when it fails
T_STEP=0

header() { printf '\n==================== %s ====================\n%s\n' "$1" "$2"; }

finish() {
  local rc=$?
  if [[ -n "$CURRENT" ]]; then
    printf '%-9s FAILED (exit %s) after %ss; log: %s\n' "$CURRENT" "$rc" "$((SECONDS - T_STEP))" \
      "$OUT/logs/$CURRENT.log" >> "$SUMMARY"
  fi
  printf '\n==================== summary (%ss in all, device %s) ====================\n' "$((SECONDS - T_ALL))" \
    "$DEVICE"
  cat "$SUMMARY"
  [[ $rc -eq 0 ]] && echo "gpu check: all steps passed" || echo "gpu check: FAILED"
}
trap finish EXIT

# run_step NAME LIMIT FUNCTION: FUNCTION's output to the terminal and $OUT/logs/NAME.log, killed after LIMIT s
run_step() {
  local name=$1 limit=$2 fn=$3
  [[ " $STEPS " == *" $name "* ]] || { printf '%-9s skipped (not in STEPS)\n' "$name" >> "$SUMMARY"; return 0; }
  CURRENT=$name
  T_STEP=$SECONDS
  header "$name" "started $(date -u +%H:%M:%S) UTC, limit ${limit}s"
  # a subshell, so that `timeout` can stop the whole step; pipefail carries its status through tee
  export -f "$fn" header profile_into
  timeout --kill-after=10 "$limit" bash -euo pipefail -c "$fn" 2>&1 | tee "$OUT/logs/$name.log"
  local took=$((SECONDS - T_STEP))
  echo "---- $name: ${took}s"
  printf '%-9s ok in %ss\n' "$name" "$took" >> "$SUMMARY"
  CURRENT=""
}

export OUT DEVICE PROFILE_ROOT ENCODER_PROFILE_FLAGS LM_PROFILE_FLAGS RUN_FLAGS

# ------------------------------------------------------------------------------------------------- the models

ENCODER=${ENCODER:-$(python -c 'from planner.jobs.run import default_model; print(default_model())')}
if [[ -z "${LM:-}" ]]; then
  # the trained tiny Llama where tinylm's cache has it, else its architecture alone (config.json), in $OUT
  LM=$(python - "$OUT/tinylm-architecture" <<'EOF'
import sys
from pathlib import Path

import transformers

from benchmarks import tinylm

cfg = tinylm.TinyLMConfig()
trained = tinylm._default_cache() / f"tinylm-{tinylm.cache_key(cfg)}"
if tinylm.is_trained(trained, tinylm.cache_key(cfg)):
    print(trained)
    sys.exit()
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
# tinylm.build_model's config; the special tokens are the tokenizer's first ids (unk, bos, eos, pad)
transformers.LlamaConfig(
    vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
    num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_positions,
    tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    architectures=["LlamaForCausalLM"]).save_pretrained(out)
print(out)
EOF
)
fi
export ENCODER LM
echo "encoder: $ENCODER"
echo "tiny LM: $LM"
python -c 'import torch; print("torch", torch.__version__, "| CUDA:", torch.cuda.is_available() and torch.cuda.get_device_name())'

# ------------------------------------------------------------------------------------------------- the steps

# profile_into NAME MODEL FLAGS...: profile MODEL on $DEVICE, file it as planner files profiles
# (PROFILE_ROOT/<hardware>/<shape>/<mode>-b<B>-s<T>-<dtype>.json) and copy it to $OUT/profiles/ and $OUT/NAME.json
profile_into() {
  local name=$1 model=$2; shift 2
  local tmp="$OUT/$name.json"
  rm -f "$tmp"
  planner profile "$model" --device "$DEVICE" "$@" --out "$tmp" --quiet
  python - "$tmp" "$PROFILE_ROOT" "$OUT/profiles" <<'EOF'
import shutil
import sys

from planner.stages.profile import default_profile_path
from planner.types import LatencyProfile

src, root, copy = sys.argv[1:]
p = LatencyProfile.load(src)
for r in (root, copy):
    dst = default_profile_path(p, r)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    print(f"filed: {dst}")
EOF
}

step_tests() {
  python -m pytest -q -m gpu tests/test_gpu.py --junitxml "$OUT/pytest-gpu.xml"
}

step_profiles() {
  # word splitting of the flag lists is wanted here
  # shellcheck disable=SC2086
  profile_into encoder-profile "$ENCODER" $ENCODER_PROFILE_FLAGS
  # shellcheck disable=SC2086
  profile_into lm-profile "$LM" $LM_PROFILE_FLAGS
  planner profiles --root "$OUT/profiles"
}

step_run() {
  # the job files its profile as profile-[<mode>-]b<B>-s<T>-<dtype>.json and reuses one that is there: the encoder
  # profile of the previous step, measured under the same flags
  mkdir -p "$OUT/run"
  if [[ -f "$OUT/encoder-profile.json" ]]; then
    name=$(python - "$OUT/encoder-profile.json" <<'EOF'
import sys

from planner.types import LatencyProfile

p = LatencyProfile.load(sys.argv[1])
regime = "" if p.mode == "prefill" else p.mode + "-"
print(f"profile-{regime}b{p.batch_size}-s{p.seq_len}-{p.dtype}.json")
EOF
)
    cp "$OUT/encoder-profile.json" "$OUT/run/$name"
    echo "reusing the encoder profile as $OUT/run/$name"
  fi
  # shellcheck disable=SC2086
  planner run "$ENCODER" --device "$DEVICE" $ENCODER_PROFILE_FLAGS $RUN_FLAGS --out "$OUT/run"
  echo
  echo "verify table ($OUT/run/results.md):"
  cat "$OUT/run/results.md"
}

step_scale() {
  if [[ ! -f benchmarks/bench_scale.py ]]; then
    echo "benchmarks/bench_scale.py is not in this checkout"
    exit 1
  fi
  python benchmarks/bench_scale.py --shape 7b --blocks 4 --device "$DEVICE" --offload --out "$OUT/scale"
}

run_step tests "$LIMIT_TESTS" step_tests
run_step profiles "$LIMIT_PROFILES" step_profiles
run_step run "$LIMIT_RUN" step_run
run_step scale "$LIMIT_SCALE" step_scale
