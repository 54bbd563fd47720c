"""Calibrate a D-LLM adapter's compute dial, so that `--budget` (the share of blocks executed) is met.

    python -m tools.calibrate_dial --dynamic_ckpt_dir assets/tiny-dllm --dataset_name demo
    python -m tools.calibrate_dial --dynamic_ckpt_dir output/tiny-dllm --budgets "[0.4, 0.55, 0.7, 0.85, 1.0]"

For each budget of the grid, per block the quantile of the routers' execute margins that makes the
executed share on the first --n_records training records equal the budget, or with --by input the
budget a budget-conditioned adapter's routers are told instead (dllm/dial.py); written
beside the checkpoint as NAME.dial.json, which example.py, evaluate.py, Llama.build and the lm-eval
model read when a budget is asked.
"""
import presets
from dllm.dial import DialConfig, calibrate_dial
from dllm.errors import run_cli


def main(argv=None):
    return calibrate_dial(DialConfig.parse(argv, description=__doc__, defaults=presets.CHECKOUT_DEFAULTS,
                                           presets=presets.for_entry_point("calibrate_dial", default="demo")))


if __name__ == "__main__":
    run_cli(main)
