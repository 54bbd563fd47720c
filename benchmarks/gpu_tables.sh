#!/usr/bin/env bash
# The speed page's GPU tables in one run on one CUDA device:
#
#   bash benchmarks/gpu_tables.sh [OUT_DIR] [BASE]
#
# BASE is SmolLM2's directory (default models/smollm2). On a machine the weights cannot reach, time
# its shape with random weights instead (every timing here needs the shape only; routers are random
# and calibrated to each share anyway):
#   python -m tools.convert_checkpoint models/smollm2 /tmp/smollm2-random --to hf --random_weights
# The variables below can be set from the environment, to rehearse the script on a CPU with a small
# base and small contexts. A benchmark that fails, or runs past STEP_TIMEOUT seconds, is reported
# (a hung one with the Python stack of every thread: SIGABRT under PYTHONFAULTHANDLER) and the next
# one still runs, so one hang does not spend a lent machine's time.
set -u
export PYTHONFAULTHANDLER=1
OUT_DIR=${1:-benchmarks/results}
BASE=${2:-models/smollm2}
REPEATS=${REPEATS:-3}
LONG_CONTEXT=${LONG_CONTEXT:-2048}                 # bench_skip's decode after this many tokens
SCALING_CONTEXTS=${SCALING_CONTEXTS:-"[256,1024,4096,8192]"}
SCALING_BATCHES=${SCALING_BATCHES:-"[1,8,32]"}
LLAMA2_7B=${LLAMA2_7B:-"--dim 4096 --n_layers 32 --n_heads 32"}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}

failed=0
step() {
    echo "== $*"
    timeout -s ABRT -k 10 "$STEP_TIMEOUT" "$@" || { echo "FAILED ($?): $*"; failed=1; }
}

mkdir -p "$OUT_DIR"
timeout 60 python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
step python -m benchmarks.bench_train_step --llama_ckpt_dir "$BASE" --repeats "$REPEATS" \
    --out "$OUT_DIR/bench_train_step_gpu"
step python -m benchmarks.bench_train_step --llama_ckpt_dir "$BASE" --repeats "$REPEATS" --dynamic_router_hdim 128 \
    --out "$OUT_DIR/bench_train_step_gpu_hdim128"
step python -m benchmarks.bench_skip --llama_ckpt_dir "$BASE" --dtype bfloat16 --shares "[0.5]" \
    --decode_prompt_len "$LONG_CONTEXT" --decode_batches "[1,8]" --repeats "$REPEATS" \
    --out "$OUT_DIR/bench_skip_smollm2_gpu.json"
# shellcheck disable=SC2086  # the shape is several flags
step python -m benchmarks.bench_skip $LLAMA2_7B --dtype bfloat16 --shares "[0.5]" \
    --decode_prompt_len "$LONG_CONTEXT" --decode_batches "[1,8]" --repeats "$REPEATS" \
    --out "$OUT_DIR/bench_skip_gpu.json"
step python -m benchmarks.bench_scaling --llama_ckpt_dir "$BASE" --dtype bfloat16 \
    --contexts "$SCALING_CONTEXTS" --batches "$SCALING_BATCHES" --prefill_tokens 65536 --decode_tokens 262144 \
    --decode_steps 16 --repeats 2 --out "$OUT_DIR/scaling_smollm2_gpu.json" --png "$OUT_DIR/scaling-smollm2-gpu.png"
exit $failed
