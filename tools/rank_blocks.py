"""Rank a base model's blocks for static pruning: Shortened-LLaMA's two criteria (Kim et al. 2024), and KL.

    python -m tools.rank_blocks --llama_ckpt_dir assets/tiny-llama2 --dataset_name demo --out runs/ranking.json

On the first --n_records training records: the perplexity of the responses with each block removed
(every token skips it, as `--routing static` runs it), and each block's Taylor importance, the sum
over its weight matrices of |dL/dW * W| (the first-order loss change of zeroing them); and KL(base ||
base without the block) per response token, what a pruned model loses of the base's distributions
(what issue 20 measures quality by; perplexity rewards a block whose removal sharpens). Only blocks
from --start_layer on are candidates: the blocks every policy here always runs stay. The JSON lists,
per criterion, the candidates from least to most important; `blocks_to_skip` takes the first k,
k = round((1 - target) * n_layers), so the executed share matches a routing target.
Choices: the loss is the fine-tune's (response tokens of instruction records), not raw text.
"""
import argparse
import dataclasses
import json
import math
import os
from typing import Dict, List

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import presets
from dllm.core.objective import compute_loss, distill_loss, scored_positions
from dllm import distributed
from dllm.checkpoints import base_model, model_params
from dllm.chat import ChatFormat
from dllm.atomic_io import atomic_write_text
from dllm.data import InstructionDataset, load_records
from dllm.errors import run_cli
from dllm.core.model import Transformer
from dllm.core.routing import DenseRouting, StaticRouting
from dllm.tokenizer import Tokenizer
from dllm.training.data_loading import trim_padding

CRITERIA = ("ppl", "taylor", "kl")


def response_ce(model: Transformer, batches) -> torch.Tensor:
    """Mean CE over every response token of the batches (a tensor, with its graph in train mode)."""
    total, count = 0.0, 0.0
    for batch in batches:
        c_loss, _, metrics = compute_loss(model, *batch)
        total = total + c_loss * metrics["n_labels"]
        count += metrics["n_labels"]
    return total / max(count, 1)


def skip_only(model: Transformer, block: int) -> Transformer:
    """The model in eval mode with every token skipping `block` and running the rest."""
    model.use_routing(StaticRouting(dataclasses.replace(model.params, static_skip_layers=(block,))))
    return model.eval()


@torch.no_grad()
def perplexity_without(model: Transformer, batches, block: int) -> float:
    return math.exp(response_ce(skip_only(model, block), batches).item())


@torch.no_grad()
def kl_without(model: Transformer, batches, base_logits, block: int) -> float:
    """KL(base || model without `block`) per response token; base_logits: the dense model's at each
    batch's scored positions."""
    model = skip_only(model, block)
    total, count = 0.0, 0
    for batch, base in zip(batches, base_logits):
        positions = scored_positions(batch[3])
        total += distill_loss(model.logits_at(batch[0], positions), base).item() * len(positions)
        count += len(positions)
    return total / max(count, 1)


def taylor_scores(model: Transformer, batches) -> Dict[int, float]:
    """Per block: sum over its 2-D weights of |grad * weight|, the gradient of the mean CE."""
    model.use_routing(DenseRouting())
    model.train()
    weights = {layer.layer_id: [p for p in layer.parameters() if p.ndim == 2] for layer in model.layers}
    for p in model.parameters():
        p.requires_grad_(False)
    for params in weights.values():
        for p in params:
            p.requires_grad_(True)
    response_ce(model, batches).backward()
    return {block: sum((p.grad * p).abs().sum().item() for p in params) for block, params in weights.items()}


def rank_blocks(model: Transformer, batches, start_layer: int) -> dict:
    candidates = list(range(start_layer, model.n_layers))
    with torch.no_grad():
        model.use_routing(DenseRouting())
        base_ppl = math.exp(response_ce(model.eval(), batches).item())
        base_logits = [model.logits_at(batch[0], scored_positions(batch[3])) for batch in batches]
    ppl = {block: perplexity_without(model, batches, block) for block in tqdm(candidates, desc="ppl without each block")}
    kl = {block: kl_without(model, batches, base_logits, block) for block in tqdm(candidates, desc="KL without each block")}
    taylor = {block: score for block, score in taylor_scores(model, batches).items() if block in candidates}
    return {
        "base_ppl": base_ppl,
        "ppl": {str(b): v for b, v in ppl.items()},
        "taylor": {str(b): v for b, v in taylor.items()},
        "kl": {str(b): v for b, v in kl.items()},
        "order": {"ppl": sorted(ppl, key=ppl.get), "taylor": sorted(taylor, key=taylor.get), "kl": sorted(kl, key=kl.get)},
        "n_layers": model.n_layers,
    }


def blocks_to_skip(ranking: dict, criterion: str, target: float) -> List[int]:
    """The k least important candidates, k = round((1 - target) * n_layers) at most all of them."""
    order = ranking["order"][criterion]
    k = min(len(order), round((1 - target) * ranking["n_layers"]))
    return sorted(order[:k])


def main(args):
    device = distributed.setup(1)
    tokenizer = Tokenizer(args.tokenizer_path or args.llama_ckpt_dir)
    params = model_params.load_params(args.llama_ckpt_dir, lora_rank=0, routing="dense", max_seq_len=args.max_seq_len)
    params = model_params.with_vocab(params, tokenizer, args.tokenizer_path or args.llama_ckpt_dir)
    model = base_model.build_model(params, args.llama_ckpt_dir, None, device)
    records = load_records(args.dataset_path, args.dataset_name, "train", ChatFormat(tokenizer))[: args.n_records]
    loader = DataLoader(InstructionDataset(records, tokenizer, args.max_seq_len), batch_size=args.batch_size)
    batches = [[t.to(device) for t in trim_padding(batch)] for batch in loader]
    ranking = rank_blocks(model, batches, args.start_layer)
    ranking["settings"] = vars(args)
    atomic_write_text(json.dumps(ranking, indent=2) + "\n", args.out)
    for criterion in CRITERIA:
        print(f"{criterion}: least to most important {ranking['order'][criterion]}")
    print(f"wrote {args.out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama_ckpt_dir", default=os.path.relpath(presets.DEMO_BASE),
                   help="base checkpoint directory, Meta or Hugging Face layout")
    p.add_argument("--tokenizer_path", default=None, help="default: the one in --llama_ckpt_dir")
    p.add_argument("--dataset_path", default="datasets")
    p.add_argument("--dataset_name", default="demo")
    p.add_argument("--n_records", type=int, default=64, help="training records the criteria are measured on")
    p.add_argument("--max_seq_len", type=int, default=128, help="as the fine-tune (finetuning.sh MAX_SEQ_LEN)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--start_layer", type=int, default=2,
                   help="blocks below it are not candidates (finetuning.sh DYNAMIC_START_LAYER)")
    p.add_argument("--out", required=True, help="the ranking JSON")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
