"""Fine-tune D-LLM routers and LoRA on a frozen Llama checkpoint. Usually started by finetuning.sh.

    python finetuning.py --llama_model_path assets/tiny-llama2 --dataset_name demo --output_dir output/x
"""
from dllm.errors import run_cli
from dllm.training.loop import train
from dllm.training.config import TrainConfig


def parse_args(argv=None) -> TrainConfig:
    return TrainConfig.parse(argv, description=__doc__)


if __name__ == "__main__":
    run_cli(lambda: train(parse_args()))
