"""Calibrate a budget-conditioned D-LLM adapter's LoRA strength per budget (dllm/dial.py).

    python -m tools.calibrate_lora_strength --llama_ckpt_dir models/smollm2 --dynamic_ckpt_dir runs/smol-dial \
        --dataset_name smol --max_seq_len 256 --batch_size 8

At each budget of a grid, the factor on the LoRA update (from --strengths) with the least KL to the
base on the first --n_records training records; written beside the checkpoint as
NAME.lora_strength.json, which example.py, evaluate.py, Llama.build and the lm-eval model read: the
LoRA is then merged at the strength of the budget asked.
"""
import presets
from dllm.dial import LoraStrengthConfig, calibrate_lora_strength
from dllm.errors import run_cli


def main(argv=None):
    return calibrate_lora_strength(LoraStrengthConfig.parse(
        argv, description=__doc__, defaults=presets.CHECKOUT_DEFAULTS,
        presets=presets.for_entry_point("calibrate_lora_strength", default="demo")))


if __name__ == "__main__":
    run_cli(main)
