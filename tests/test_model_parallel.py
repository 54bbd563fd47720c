"""Model parallel size 2 under torchrun (gloo, CPU) computes what one process computes.

A random model is built and saved here as a 2-shard Meta checkpoint plus an adapter; two ranks
load it (tests/mp_worker.py) and their logits must equal the single-process logits.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from dllm.checkpoints.meta_layout import BASE_PARAM_KEYS, save_meta_checkpoint
from dllm.checkpoints.adapters import adapter_state_dict
from dllm.atomic_io import atomic_save
from dllm.core.model import Transformer
from dllm.core.routing import DLLMRouting
from helpers import ROOT, free_port, randomize, subprocess_env, tiny_args
from mp_worker import inference_probes, training_probe

pytestmark = pytest.mark.slow

WORKER = os.path.join(ROOT, "tests", "mp_worker.py")


def test_model_parallel_2_matches_single_process(tmp_path):
    torch.manual_seed(30)
    args = tiny_args(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=320, lora_rank=4, dynamic_start_layer=1)
    model = randomize(Transformer(args), seed=31, router_scale=2.0, lora_b_std=0.2)
    ckpt, adapter = tmp_path / "base", tmp_path / "adapter.pth"
    save_meta_checkpoint(model, str(ckpt), dtype=torch.float32, mp_size=2)
    assert sorted(os.listdir(ckpt)) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    atomic_save({"epoch": 0, "model": adapter_state_dict(model)}, str(adapter))

    b, s = 2, 12
    tokens = torch.randint(0, args.vocab_size, (b, s), generator=torch.Generator().manual_seed(32))
    g = torch.Generator().manual_seed(33)
    masks = {i: torch.rand(b, s, generator=g) < 0.6 for i in range(args.dynamic_start_layer, args.n_layers)}
    expected = inference_probes(model, tokens, masks)
    routed = expected["eval_dllm_activation"][:, args.dynamic_reserve_initials:, args.dynamic_start_layer:]
    assert 0 < routed.mean() < 1, "some tokens should skip and some execute"

    # training: Gumbel routing and LoRA dropout, seeded identically; gradients of routers and LoRA
    seed = 34
    expected["train_dllm"], expected["train_dllm_activation"], expected_grads = training_probe(model, tokens, seed)
    assert len(expected_grads) == len(adapter_state_dict(model))
    routed = expected["train_dllm_activation"][:, args.dynamic_reserve_initials:, args.dynamic_start_layer:]
    assert 0 < routed.mean() < 1

    with torch.no_grad():
        model.eval()
        model.use_routing(DLLMRouting(args))
        model.set_lora_strength(0.5)
        expected["eval_half_strength"], _ = model(tokens)
        model.set_lora_strength(1.0)

    # the D-LLM settings are not part of a Meta params.json: pass them as overrides
    overrides = {k: v for k, v in args.to_dict().items() if k not in BASE_PARAM_KEYS}
    inputs, out = tmp_path / "inputs.pth", tmp_path / "out.pth"
    torch.save({"tokens": tokens, "masks": {str(k): v for k, v in masks.items()}, "overrides": json.dumps(overrides),
                "seed": torch.tensor(seed)}, inputs)
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           WORKER, str(ckpt), str(adapter), str(inputs), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    got = torch.load(out, weights_only=True)
    for key in ("eval_dllm", "eval_fixed", "train_dense", "train_fixed", "train_dllm"):
        assert got[key].shape == expected[key].shape, key
        diff = (got[key] - expected[key]).abs().max().item()
        assert diff <= 1e-5, f"{key}: max abs diff {diff}"
    assert torch.equal(got["eval_dllm_activation"], expected["eval_dllm_activation"])
    assert torch.equal(got["train_dllm_activation"], expected["train_dllm_activation"])
    assert sorted(got["grads"]) == sorted(expected_grads)
    for name, grad in expected_grads.items():
        assert torch.count_nonzero(grad) > 0, name
        diff = (got["grads"][name] - grad).abs().max().item()
        assert diff <= 1e-5 * max(1.0, grad.abs().max().item()), f"grad {name}: max abs diff {diff}"
    # adapter_state_dict gathers the LoRA B shards back into the full tensors
    full = adapter_state_dict(model)
    assert sorted(got["adapter"]) == sorted(full)
    for name, tensor in full.items():
        assert torch.equal(got["adapter"][name], tensor), name
    # merging LoRA shard by shard keeps the function, at a strength too (and merged for good after it)
    diff = (got["eval_half_strength"] - expected["eval_half_strength"]).abs().max().item()
    assert diff <= 1e-5, f"eval_half_strength: max abs diff {diff}"
    assert (expected["eval_half_strength"] - expected["eval_dllm"]).abs().max().item() > 1e-3
    diff = (got["eval_merged"] - expected["eval_dllm"]).abs().max().item()
    assert diff <= 1e-5, f"eval_merged: max abs diff {diff}"
