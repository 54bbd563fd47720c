"""How deep a model's predictions settle: per block, the share of response tokens whose top-1 from
the head on that block's input is already the model's final top-1 (early exit's label,
`EarlyExitRouting.settled`). An early exit that runs a share s of the blocks stops the average token
near block s·n_layers, so it can only be harmless where this share is high there.

    python -m benchmarks.settled_depth --llama_ckpt_dir models/smollm2 --dataset_name smol \\
        --out benchmarks/results/settled_depth_smollm2.json

Teacher forced on the test split's prompt + response, the base model with every block run.
"""
import argparse
import json
import os
from typing import List, Tuple

import torch

import presets
from dllm.atomic_io import atomic_write_text
from dllm.chat import ChatFormat
from dllm.data import load_records
from dllm.errors import run_cli
from dllm.generation import Llama
from dllm.core.routing import EarlyExitRouting
from dllm.scoring import encode_pair, fit


@torch.inference_mode()
def settled_shares(model, sequences: List[Tuple[List[int], int]]) -> List[float]:
    """Per block, the share of the positions that predict a response token (from the one before the
    first response token to the last but one) settled at the block's input; sequences are (token
    ids, index of the first response token), as evaluate.py scores them."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda block, args: inputs.__setitem__(block.layer_id, args[0]))
             for layer in model.layers]
    counts, total = torch.zeros(len(model.layers)), 0
    try:
        for ids, start in sequences:
            logits, _ = model(torch.tensor([ids], device=model.tok_embeddings.weight.device))
            final = logits[0, start - 1 : -1].argmax(-1)
            for layer_id, x in inputs.items():
                counts[layer_id] += EarlyExitRouting.settled(model, x[0, start - 1 : -1], final).sum().item()
            total += len(final)
    finally:
        for hook in hooks:
            hook.remove()
    return (counts / max(total, 1)).tolist()


def main(args):
    generator = Llama.build(args.llama_ckpt_dir, None, max_seq_len=args.max_seq_len, max_batch_size=1,
                            model_parallel_size=1, dense=True)
    tokenizer = generator.tokenizer
    records = load_records(args.dataset_path, args.dataset_name, "test", ChatFormat(tokenizer))[: args.records]
    sequences = [fit(*encode_pair(tokenizer, r.prompt, r.response, eos=True), args.max_seq_len) for r in records]
    shares = settled_shares(generator.model, sequences)
    print("block  settled at its input")
    for layer_id, share in enumerate(shares):
        print(f"{layer_id:5d}  {share:.3f}")
    result = {"llama_ckpt_dir": args.llama_ckpt_dir, "dataset": args.dataset_name, "records": len(sequences),
              "settled_at_block_input": shares}
    if args.out:
        atomic_write_text(json.dumps(result, indent=2) + "\n", args.out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama_ckpt_dir", default=os.path.relpath(presets.DEMO_BASE))
    p.add_argument("--dataset_path", default="datasets")
    p.add_argument("--dataset_name", default="demo")
    p.add_argument("--records", type=int, default=32, help="test records measured")
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--out", default=None, help="JSON to write")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
