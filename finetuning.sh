#!/usr/bin/env bash
# D-LLM fine-tuning. Edit the variables below, or override any of them from the environment:
#   EPOCHS=1 bash finetuning.sh
# PRESET names the recipe a run starts from (presets/NAME.json): demo (the default: the shipped demo
# model on the shipped demo dataset, about 15 minutes on 2 CPU cores, into output/tiny-dllm), smollm2
# (SmolLM2-135M-Instruct on datasets/smol), llama2-7b-alpaca (the paper's). A variable left empty
# keeps the preset's value, else finetuning.py's default (`python finetuning.py --preset demo --help`
# lists them all); a variable you set overrides both. The run ends by printing the example.py /
# evaluate.py commands that use the adapter it trained.
#
# Resume: NAME-last.pth in OUTPUT_PATH is written at every epoch end and every SAVE_STEPS steps, atomically
# (a kill never leaves a torn file). To continue an interrupted run with the same data order, optimizer
# state and noise, run the same command again with RESUME=OUTPUT_PATH (or RESUME=a checkpoint file):
#   RESUME=output/tiny-dllm bash finetuning.sh
# A fresh run refuses an OUTPUT_PATH that holds a run; OVERWRITE=1 starts over there (the old files go).
#
# The paper's recipe on 8 processes: MODEL_PATH=/path/llama-2-7b NPROC=8 PRESET=llama2-7b-alpaca bash finetuning.sh
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${PRESET-demo}                     # presets/NAME.json; empty: finetuning.py's defaults alone
MODEL_PATH=${MODEL_PATH:-}                # Meta (params.json) or Hugging Face (config.json) directory
MODEL_PARAM_PATH=${MODEL_PARAM_PATH:-}    # the params.json / config.json (default: the one in MODEL_PATH)
TOKENIZER_PATH=${TOKENIZER_PATH:-}        # tokenizer.model / tokenizer.json (default: the one in MODEL_PATH)
DATASET_PATH=${DATASET_PATH:-}
DATASET_NAME=${DATASET_NAME:-}
OUTPUT_PATH=${OUTPUT_PATH:-}
MODEL_SAVE_NAME=${MODEL_SAVE_NAME:-}

NPROC=${NPROC:-1}                         # processes (data parallel x model parallel); 1: no launcher
MODEL_PARALLEL_SIZE=${MODEL_PARALLEL_SIZE:-}  # the base's shard count (consolidated.NN.pth files)
MASTER_PORT=${MASTER_PORT:-29501}         # NPROC > 1: the launcher's port

ROUTING=${ROUTING:-}                      # dllm | mod | static | early_exit | dense (LoRA only)
STATIC_SKIP_LAYERS=${STATIC_SKIP_LAYERS:-} # ROUTING=static: the blocks to prune, e.g. "3 5" (tools/rank_blocks.py)
MAX_SEQ_LEN=${MAX_SEQ_LEN:-}
LORA_RANK=${LORA_RANK:-}
DYNAMIC_ACTIVE_TARGET=${DYNAMIC_ACTIVE_TARGET:-}
DYNAMIC_ROUTER_HDIM=${DYNAMIC_ROUTER_HDIM:-}
DYNAMIC_START_LAYER=${DYNAMIC_START_LAYER:-}
DYNAMIC_RESERVE_INITIALS=${DYNAMIC_RESERVE_INITIALS:-}
LAMBDA_ACTIVE=${LAMBDA_ACTIVE:-}
DYNAMIC_BUDGET_RANGE=${DYNAMIC_BUDGET_RANGE:-}  # a budget-conditioned D-LLM, e.g. "0.4 1.0": --budget chosen at inference
RATE_LOSS_UNIT=${RATE_LOSS_UNIT:-}        # token (the reference), sequence (tokens of one sequence may differ) or response (response tokens only)
RATE_LOSS_GAP=${RATE_LOSS_GAP:-}          # absolute (the reference) or relative (the gap over the target: low budgets held as tightly)
DYNAMIC_BUDGET_ROUTERS=${DYNAMIC_BUDGET_ROUTERS:-}  # with DYNAMIC_BUDGET_RANGE: routers per block, each owning a stretch of the range
DYNAMIC_BUDGET_LORA=${DYNAMIC_BUDGET_LORA:-}  # with DYNAMIC_BUDGET_RANGE: LoRA gains per rank at this many budgets over the range
BUDGET_LORA_LR=${BUDGET_LORA_LR:-}  # with DYNAMIC_BUDGET_LORA: the gains' own lr
DYNAMIC_BUDGET_DRAW_POWER=${DYNAMIC_BUDGET_DRAW_POWER:-}  # with DYNAMIC_BUDGET_RANGE: above 1, training draws low budgets more often
BATCH_SIZE=${BATCH_SIZE:-}
ACCUM_ITER=${ACCUM_ITER:-}
EPOCHS=${EPOCHS:-}
WARMUP_EPOCHS=${WARMUP_EPOCHS:-}
SAVE_FREQ=${SAVE_FREQ:-}                  # NAME-EPOCH.pth every this many epochs
SAVE_STEPS=${SAVE_STEPS:-}                # NAME-last.pth also every this many steps (0: epoch ends only)
BLR=${BLR:-}
LR=${LR:-}                                # absolute lr, overrides BLR
MIN_LR=${MIN_LR:-}
ROUTER_LR=${ROUTER_LR:-}                  # the routers' own lr; none: the LoRA lr (the reference)
ROUTER_BIAS=${ROUTER_BIAS:-}              # initial [skip, execute] logit bias of the routers, e.g. "0.1 2.0"
WEIGHT_DECAY=${WEIGHT_DECAY:-}
DISTILL_TEACHER=${DISTILL_TEACHER:-}      # also learn the teacher's predictions: base, or a run's adapter (e.g. ROUTING=dense)
DISTILL_WEIGHT=${DISTILL_WEIGHT:-}        # weight of that KL beside the CE
ROW_RELATIVE_LOSS=${ROW_RELATIVE_LOSS:-}  # 1: every record's loss counts by its relative change (a dial's low budgets don't dominate)
SEED=${SEED:-}
NUM_WORKERS=${NUM_WORKERS:-}
RESUME=${RESUME:-}                        # an output directory or checkpoint file to continue (see above)
OVERWRITE=${OVERWRITE:-}                  # 1: start over in an OUTPUT_PATH that holds a run
EXTRA_ARGS=${EXTRA_ARGS:-}                # more finetuning.py flags, e.g. "--log_freq 50"

flags=()
add() { [ -n "$2" ] && flags+=("--$1" "$2"); return 0; }   # a set variable becomes its flag
as_list() { local words; read -r -a words <<< "$1"; local IFS=,; echo "[${words[*]}]"; }  # "3 5" -> [3,5]
add_list() { [ -n "$2" ] && flags+=("--$1" "$(as_list "$2")"); return 0; }
add preset "$PRESET"
add llama_ckpt_dir "$MODEL_PATH"; add llama_param_path "$MODEL_PARAM_PATH"; add tokenizer_path "$TOKENIZER_PATH"
add dataset_path "$DATASET_PATH"; add dataset_name "$DATASET_NAME"
add output_dir "$OUTPUT_PATH"; add model_save_name "$MODEL_SAVE_NAME"; add model_parallel_size "$MODEL_PARALLEL_SIZE"
add routing "$ROUTING"; add_list static_skip_layers "$STATIC_SKIP_LAYERS"; add max_seq_len "$MAX_SEQ_LEN"
add lora_rank "$LORA_RANK"; add dynamic_active_target "$DYNAMIC_ACTIVE_TARGET"
add dynamic_router_hdim "$DYNAMIC_ROUTER_HDIM"; add dynamic_start_layer "$DYNAMIC_START_LAYER"
add dynamic_reserve_initials "$DYNAMIC_RESERVE_INITIALS"; add lambda_active "$LAMBDA_ACTIVE"
add_list dynamic_budget_range "$DYNAMIC_BUDGET_RANGE"; add rate_loss_unit "$RATE_LOSS_UNIT"; add rate_loss_gap "$RATE_LOSS_GAP"
add dynamic_budget_routers "$DYNAMIC_BUDGET_ROUTERS"; add dynamic_budget_lora "$DYNAMIC_BUDGET_LORA"; add budget_lora_lr "$BUDGET_LORA_LR"
add dynamic_budget_draw_power "$DYNAMIC_BUDGET_DRAW_POWER"
add batch_size "$BATCH_SIZE"; add accum_iter "$ACCUM_ITER"; add epochs "$EPOCHS"; add warmup_epochs "$WARMUP_EPOCHS"
add save_freq "$SAVE_FREQ"; add save_steps "$SAVE_STEPS"; add blr "$BLR"; add lr "$LR"; add min_lr "$MIN_LR"
add router_lr "$ROUTER_LR"; add_list dynamic_router_bias "$ROUTER_BIAS"; add weight_decay "$WEIGHT_DECAY"
add distill_teacher "$DISTILL_TEACHER"; add distill_weight "$DISTILL_WEIGHT"; add seed "$SEED"
add num_workers "$NUM_WORKERS"; add resume "$RESUME"
[ -n "$OVERWRITE" ] && [ "$OVERWRITE" != 0 ] && flags+=(--overwrite_output_dir)
[ -n "$ROW_RELATIVE_LOSS" ] && [ "$ROW_RELATIVE_LOSS" != 0 ] && flags+=(--row_relative_loss)

if [ "$NPROC" = 1 ]; then
    launcher=(python)
else  # torchrun, quiet: the worker's error line last, its exit status (dllm/launch.py)
    launcher=(python -m dllm.launch --nproc_per_node "$NPROC" --master_port "$MASTER_PORT")
fi
# shellcheck disable=SC2086
exec "${launcher[@]}" finetuning.py "${flags[@]}" $EXTRA_ARGS
