"""Convert a Llama-family checkpoint between layouts, into a new directory.

    python -m tools.convert_checkpoint SRC DST --to hf|meta [--model_parallel_size N] [--dtype bfloat16]

SRC is a GGUF file (dequantized), a Hugging Face directory (config.json + safetensors) or a Meta
directory (params.json + consolidated.NN.pth, any number of shards). `--to meta` with
`--model_parallel_size N` writes N shards for `torchrun --nproc_per_node N` (resharding a Meta
checkpoint is Meta -> Meta). Tokenizer files and the chat template travel along.
`--random_weights` writes SRC's shape (and tokenizer files) with random weights instead: a stand-in
base for timing on a machine the real weights cannot reach (benchmarks/gpu_tables.sh).
"""
import argparse

import torch

from dllm.checkpoints.conversion import convert
from dllm.errors import run_cli

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="GGUF file, Hugging Face directory or Meta directory")
    p.add_argument("dst", help="new output directory (must not exist)")
    p.add_argument("--to", choices=("hf", "meta"), required=True, help="output layout")
    p.add_argument("--model_parallel_size", type=int, default=1, help="Meta output: number of shards (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="output dtype (default bfloat16)")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="HF output: safetensors shard size (default 5)")
    p.add_argument("--random_weights", action="store_true",
                   help="SRC's architecture with random weights (only SRC's config is read)")
    args = p.parse_args(argv)
    if args.model_parallel_size < 1:
        p.error(f"--model_parallel_size {args.model_parallel_size}: must be at least 1")
    if args.max_shard_gb <= 0:
        p.error(f"--max_shard_gb {args.max_shard_gb}: must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    convert(args.src, args.dst, args.to, args.model_parallel_size, DTYPES[args.dtype], int(args.max_shard_gb * 2**30),
            args.random_weights)
    weights = "random weights" if args.random_weights else "weights"
    print(f"wrote {args.dst} ({args.to} layout, {args.dtype} {weights})")


if __name__ == "__main__":
    run_cli(main)
