"""Fine-tune D-LLM routers and LoRA on a frozen Llama checkpoint. Usually started by finetuning.sh.

    python finetuning.py --preset demo
    python finetuning.py --llama_ckpt_dir assets/tiny-llama2 --dataset_name demo --output_dir output/x

--preset NAME starts from a named recipe (presets/NAME.json: demo, smollm2, llama2-7b-alpaca);
every flag still overrides it. `--preset NAME --help` shows the values in force.
"""
import presets
from dllm.errors import run_cli
from dllm.training.config import TrainConfig
from dllm.training.loop import train


def parse_args(argv=None) -> TrainConfig:
    return TrainConfig.parse(argv, description=__doc__, presets=presets.for_entry_point("finetuning"))


if __name__ == "__main__":
    run_cli(lambda: train(parse_args()))
