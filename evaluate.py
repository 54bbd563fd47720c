"""Evaluate an adapter (D-LLM or any routing policy, as its params.json says) or the dense base
model on the paper's benchmarks.

    torchrun --nproc_per_node 1 evaluate.py --datasets demo,piqa --output_dir results/demo-dllm
    torchrun --nproc_per_node 1 evaluate.py --dense --datasets demo,piqa --output_dir results/demo-dense

With no path flags it evaluates the shipped demo model with the shipped demo adapter; another base
model (Meta or Hugging Face directory) gets the adapter shipped for it under assets/ if there is one,
else it is evaluated dense. Writes results.md and results.json to --output_dir once every dataset
is done.
"""
import os
import sys
from typing import Optional

import fire

from dllm.checkpoint import default_model_parallel_size, shipped_adapter
from dllm.data import TASK_METRIC
from dllm.errors import InputError, run_cli
from dllm.evaluate import Evaluator, write_results
from dllm.generation import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_BASE = os.path.join(HERE, "assets", "tiny-llama2")
ASSETS = os.path.join(HERE, "assets")  # shipped adapters, each found by the base it was trained on


def main(
    llama_ckpt_dir: str = DEMO_BASE,
    dynamic_ckpt_dir: Optional[str] = None,
    model_args_path: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    dataset_path: str = os.path.join(HERE, "datasets"),
    datasets="demo",
    dense: bool = False,
    output_dir: str = "results/eval",
    n_shot: int = 0,
    max_seq_len: int = 512,
    batch_size: int = 8,
    max_gen_len: int = 32,
    execute_threshold: Optional[float] = None,
    model_parallel_size: Optional[int] = None,
    seed: int = 1,
):
    names = [d.strip() for d in datasets.split(",")] if isinstance(datasets, str) else [str(d) for d in datasets]
    unknown = [n for n in names if n not in TASK_METRIC]
    if unknown or not names:
        raise InputError(f"unknown dataset(s) {unknown}; known: {', '.join(sorted(TASK_METRIC))}")
    # model parallel over the checkpoint's shards; the remaining processes split the records
    model_parallel_size = model_parallel_size or default_model_parallel_size(llama_ckpt_dir)
    if dynamic_ckpt_dir is None and not dense:
        dynamic_ckpt_dir = shipped_adapter(llama_ckpt_dir, ASSETS)
        if dynamic_ckpt_dir:
            print(f"adapter: {dynamic_ckpt_dir} (shipped for this base; --dense runs the base alone)", file=sys.stderr)
    generator = Llama.build(llama_ckpt_dir, dynamic_ckpt_dir, model_args_path, tokenizer_path, max_seq_len,
                            batch_size, model_parallel_size, seed, dense, execute_threshold)
    evaluator = Evaluator(generator, batch_size, max_gen_len, n_shot, dataset_path)
    rows = [row for name in names for row in evaluator.evaluate(name)]
    routing = generator.model.routing.label
    label = f"dense base model ({llama_ckpt_dir})" if dense or not dynamic_ckpt_dir else f"{routing} ({dynamic_ckpt_dir})"
    write_results(rows, output_dir, f"{label}, {n_shot}-shot")


if __name__ == "__main__":
    run_cli(fire.Fire, main)
