#!/usr/bin/env bash
# D-LLM fine-tuning. Edit the variables below, or override any of them from the environment:
#   EPOCHS=1 bash finetuning.sh
# The defaults train the shipped demo model on the shipped demo dataset on CPU (about 7 to 14 minutes on 2
# cores; README "Fine-tuning the demo") into OUTPUT_PATH=output/tiny-dllm; the run ends by printing the
# example.py / evaluate.py commands that use the adapter it trained.
#
# Resume: NAME-last.pth in OUTPUT_PATH is written at every epoch end and every SAVE_STEPS steps, atomically
# (a kill never leaves a torn file). To continue an interrupted run with the same data order, optimizer
# state and noise, run the same command again with RESUME=OUTPUT_PATH (or RESUME=a checkpoint file):
#   RESUME=output/tiny-dllm bash finetuning.sh
# A fresh run refuses an OUTPUT_PATH that holds a run; OVERWRITE=1 starts over there (the old files go).
#
# For Llama-2-7B on Alpaca (the paper's recipe): MODEL_PATH=/path/llama-2-7b DATASET_NAME=alpaca
# MAX_SEQ_LEN=1024 BATCH_SIZE=1 NPROC=8 EPOCHS=10 WARMUP_EPOCHS=2 BLR=9e-3 LAMBDA_ACTIVE=5.0
# DYNAMIC_ROUTER_HDIM=512 ROUTER_LR= ROUTER_BIAS="0.1 2.0" LR= bash finetuning.sh
# SmolLM2-135M-Instruct on datasets/smol (README "D-LLM on SmolLM2"; about 20 minutes alone on 2 CPU cores):
# MODEL_PATH=models/smollm2 DATASET_NAME=smol OUTPUT_PATH=output/smollm2-dllm MAX_SEQ_LEN=256 BATCH_SIZE=4
# EPOCHS=2 WARMUP_EPOCHS=0.2 DYNAMIC_ROUTER_HDIM=128 LAMBDA_ACTIVE=20 LR=1e-3 bash finetuning.sh
set -euo pipefail
cd "$(dirname "$0")"

MODEL_PATH=${MODEL_PATH:-assets/tiny-llama2}  # Meta (params.json) or Hugging Face (config.json) directory
MODEL_PARAM_PATH=${MODEL_PARAM_PATH:-}     # empty: the params.json / config.json in MODEL_PATH
TOKENIZER_PATH=${TOKENIZER_PATH:-}         # empty: the tokenizer.model / tokenizer.json in MODEL_PATH
DATASET_PATH=${DATASET_PATH:-datasets}
DATASET_NAME=${DATASET_NAME:-demo}
OUTPUT_PATH=${OUTPUT_PATH:-output/tiny-dllm}
MODEL_SAVE_NAME=${MODEL_SAVE_NAME:-checkpoint}

NPROC=${NPROC:-1}                         # processes (data parallel x model parallel); 1: no launcher
MODEL_PARALLEL_SIZE=${MODEL_PARALLEL_SIZE:-1}  # the base's shard count (consolidated.NN.pth files)
MASTER_PORT=${MASTER_PORT:-29501}         # NPROC > 1: the launcher's port

ROUTING=${ROUTING:-dllm}                   # dllm | mod | static | early_exit | dense (LoRA only)
STATIC_SKIP_LAYERS=${STATIC_SKIP_LAYERS:-} # ROUTING=static: the blocks to prune, e.g. "3 5" (tools/rank_blocks.py)
MAX_SEQ_LEN=${MAX_SEQ_LEN:-128}
LORA_RANK=${LORA_RANK:-8}
DYNAMIC_ACTIVE_TARGET=${DYNAMIC_ACTIVE_TARGET:-0.5}
DYNAMIC_ROUTER_HDIM=${DYNAMIC_ROUTER_HDIM:-64}
DYNAMIC_START_LAYER=${DYNAMIC_START_LAYER:-2}
DYNAMIC_RESERVE_INITIALS=${DYNAMIC_RESERVE_INITIALS:-2}
LAMBDA_ACTIVE=${LAMBDA_ACTIVE:-5.0}
DYNAMIC_BUDGET_RANGE=${DYNAMIC_BUDGET_RANGE:-}  # a budget-conditioned D-LLM, e.g. "0.4 1.0": --budget chosen at inference
RATE_LOSS_UNIT=${RATE_LOSS_UNIT:-token}   # the rate loss per token (the reference) or per sequence (tokens may differ)
BATCH_SIZE=${BATCH_SIZE:-16}
ACCUM_ITER=${ACCUM_ITER:-1}
EPOCHS=${EPOCHS:-3}
WARMUP_EPOCHS=${WARMUP_EPOCHS:-0.5}
SAVE_FREQ=${SAVE_FREQ:-1}                 # NAME-EPOCH.pth every this many epochs
SAVE_STEPS=${SAVE_STEPS:-100}             # NAME-last.pth also every this many steps (0: epoch ends only)
BLR=${BLR:-9e-3}
LR=${LR:-}                                # absolute lr, overrides BLR when set
MIN_LR=${MIN_LR:-0.0}
ROUTER_LR=${ROUTER_LR-2e-2}               # set empty (ROUTER_LR=) for the reference: routers use LR
ROUTER_BIAS=${ROUTER_BIAS:-"0.1 2.0"}     # initial [skip, execute] logit bias of the routers
WEIGHT_DECAY=${WEIGHT_DECAY:-0.02}
DISTILL_TEACHER=${DISTILL_TEACHER:-}      # also learn the teacher's predictions: base, or a run's adapter (e.g. ROUTING=dense)
DISTILL_WEIGHT=${DISTILL_WEIGHT:-1.0}     # weight of that KL beside the CE
SEED=${SEED:-0}
NUM_WORKERS=${NUM_WORKERS:-0}
RESUME=${RESUME:-}                        # an output directory or checkpoint file to continue (see above)
OVERWRITE=${OVERWRITE:-}                  # 1: start over in an OUTPUT_PATH that holds a run
EXTRA_ARGS=${EXTRA_ARGS:-}                # more finetuning.py flags, e.g. "--log_freq 50"

optional=()
[ -n "$MODEL_PARAM_PATH" ] && optional+=(--llama_param_path "$MODEL_PARAM_PATH")
[ -n "$TOKENIZER_PATH" ] && optional+=(--tokenizer_path "$TOKENIZER_PATH")
[ -n "$LR" ] && optional+=(--lr "$LR")
[ -n "$ROUTER_LR" ] && optional+=(--router_lr "$ROUTER_LR")
[ -n "$RESUME" ] && optional+=(--resume "$RESUME")
[ -n "$OVERWRITE" ] && [ "$OVERWRITE" != 0 ] && optional+=(--overwrite_output_dir)
as_list() { local words; read -r -a words <<< "$1"; local IFS=,; echo "[${words[*]}]"; }  # "3 5" -> [3,5]

# the shard-count error names this script's variables
export DLLM_LAUNCHER=finetuning.sh
if [ "$NPROC" = 1 ]; then
    launcher=(python)
else  # torchrun, quiet: the worker's error line last, its exit status (dllm/launch.py)
    launcher=(python -m dllm.launch --nproc_per_node "$NPROC" --master_port "$MASTER_PORT")
fi
# shellcheck disable=SC2086
exec "${launcher[@]}" finetuning.py \
    --llama_model_path "$MODEL_PATH" \
    --dataset_path "$DATASET_PATH" --dataset_name "$DATASET_NAME" \
    --output_dir "$OUTPUT_PATH" --model_save_name "$MODEL_SAVE_NAME" \
    --routing "$ROUTING" --model_parallel_size "$MODEL_PARALLEL_SIZE" --max_seq_len "$MAX_SEQ_LEN" --lora_rank "$LORA_RANK" \
    --dynamic_active_target "$DYNAMIC_ACTIVE_TARGET" --dynamic_router_hdim "$DYNAMIC_ROUTER_HDIM" \
    --dynamic_start_layer "$DYNAMIC_START_LAYER" --dynamic_reserve_initials "$DYNAMIC_RESERVE_INITIALS" \
    --lambda_active "$LAMBDA_ACTIVE" --rate_loss_unit "$RATE_LOSS_UNIT" --batch_size "$BATCH_SIZE" --accum_iter "$ACCUM_ITER" --epochs "$EPOCHS" \
    --warmup_epochs "$WARMUP_EPOCHS" --save_freq "$SAVE_FREQ" --save_steps "$SAVE_STEPS" --blr "$BLR" --min_lr "$MIN_LR" \
    --dynamic_router_bias "$(as_list "$ROUTER_BIAS")" --static_skip_layers "$(as_list "$STATIC_SKIP_LAYERS")" \
    --dynamic_budget_range "$(as_list "$DYNAMIC_BUDGET_RANGE")" \
    --weight_decay "$WEIGHT_DECAY" --seed "$SEED" --num_workers "$NUM_WORKERS" \
    --distill_teacher "$DISTILL_TEACHER" --distill_weight "$DISTILL_WEIGHT" \
    "${optional[@]}" $EXTRA_ARGS
