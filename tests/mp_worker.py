"""Run by tests/test_model_parallel.py under torchrun: load a sharded base + adapter with model
parallel size = world size, run the fixed inputs, and have rank 0 write the logits.

usage: torchrun --nproc_per_node N tests/mp_worker.py CKPT_DIR ADAPTER INPUTS OUT
INPUTS is a torch file {"tokens", "masks": {layer: [b, s] bool}, "overrides": json string}.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dllm import distributed  # noqa: E402
from dllm.checkpoints.adapters import adapter_state_dict, load_adapter  # noqa: E402
from dllm.checkpoints.base_model import load_base  # noqa: E402
from dllm.checkpoints.model_params import load_params  # noqa: E402
from dllm.checkpoints.sharding import shard_dim  # noqa: E402
from dllm.core.model import Transformer  # noqa: E402
from dllm.core.routing import DenseRouting, DLLMRouting, FixedRouting  # noqa: E402


@torch.no_grad()
def inference_probes(model, tokens, masks):
    """Logits of both paths (eval: real skipping; train: masked) under D-LLM, fixed and dense routing."""
    results = {}
    model.eval()
    model.use_routing(DLLMRouting(model.params))
    results["eval_dllm"], results["eval_dllm_activation"] = model(tokens)
    model.use_routing(FixedRouting(masks))
    results["eval_fixed"], _ = model(tokens)
    model.train()
    model.use_routing(DenseRouting())
    results["train_dense"], _ = model(tokens)
    model.use_routing(FixedRouting(masks))
    results["train_fixed"], _ = model(tokens)
    return results


def training_probe(model, tokens, seed):
    """One training forward/backward (Gumbel routing, LoRA dropout 0.3, RNG seeded): logits,
    activation and the full (gathered over model-parallel ranks) router and LoRA gradients."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    model.set_adapter_trainable(True)
    model.train()
    model.use_routing(DLLMRouting(model.params))
    torch.manual_seed(seed)
    logits, activation = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()) + activation.mean()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.detach()
        if shard_dim(name) is not None:
            parts = [torch.empty_like(grad) for _ in range(distributed.mp_size())]
            dist.all_gather(parts, grad.contiguous(), group=distributed.mp_group())
            grad = torch.cat(parts, shard_dim(name))
        grads[name] = grad.clone()
    # replicated decisions must agree across ranks, or the all-reduced hidden states mix two models
    acts = [torch.empty_like(activation) for _ in range(dist.get_world_size())]
    dist.all_gather(acts, activation.detach().contiguous())
    assert all(torch.equal(a, acts[0]) for a in acts), "ranks took different routing decisions"
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return logits.detach(), activation.detach(), grads


def main(ckpt_dir, adapter_path, inputs_path, out_path):
    torch.set_num_threads(1)
    distributed.setup()
    world = dist.get_world_size()
    assert distributed.mp_size() == world > 1, (distributed.mp_size(), world)
    inputs = torch.load(inputs_path, weights_only=True)
    tokens, masks = inputs["tokens"], {int(k): v for k, v in inputs["masks"].items()}
    args = load_params(ckpt_dir, **json.loads(inputs["overrides"]))
    model = Transformer(args, init_weights=False)
    load_base(model, ckpt_dir)
    load_adapter(model, adapter_path)

    attn = model.layers[0].attention
    n_kv = args.n_kv_heads or args.n_heads
    # the tensors really are this rank's shards
    assert attn.wq.weight.shape == (args.n_heads * args.head_dim // world, args.dim)
    assert attn.wk.weight.shape == (n_kv * args.head_dim // world, args.dim)
    assert attn.lora_q.linear_B.weight.shape == (args.n_heads * args.head_dim // world, args.lora_rank)
    assert model.tok_embeddings.weight.shape == (args.vocab_size, args.dim // world)

    # gathered from the shards (a collective: every rank calls it)
    gathered = adapter_state_dict(model)
    results = inference_probes(model, tokens, masks)

    # one training forward/backward with Gumbel routing and LoRA dropout, the RNG seeded the same
    # on every rank (and as in the single process): same decisions, same (gathered) gradients
    results["train_dllm"], results["train_dllm_activation"], grads = training_probe(model, tokens, int(inputs["seed"]))

    with torch.no_grad():
        model.eval()
        model.use_routing(DLLMRouting(args))
        model.merge_lora_at(0.5)  # each rank merges its shard at a strength, from the weights it keeps
        results["eval_half_strength"], _ = model(tokens)
        model.merge_lora()
        results["eval_merged"], _ = model(tokens)
    if dist.get_rank() == 0:
        results = {k: v.contiguous() for k, v in results.items()}
        results["adapter"] = gathered
        results["grads"] = grads
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
