"""D-LLM versus the dense model in one run: prefill and decode speed, KV bytes, FLOPs ratio.

A random-weight Llama-2-shaped model (matmuls dominate at dim 2048). Each routed block's router is
calibrated on the fly so that a chosen share of tokens executes it; the FLOPs ratio is counted
from the routing that really happened (dllm/flops.py). Dense and D-LLM runs are interleaved and
the best of `repeats` is kept, so machine noise hits both alike.

    python benchmarks/bench_skip.py                      # CPU, fp32, dim 2048, 8 layers
    python benchmarks/bench_skip.py --dim 4096 --n_layers 32 --n_heads 32 --dtype bfloat16   # GPU
    python benchmarks/bench_skip.py --llama_ckpt_dir models/smollm2 --decode_batches "(1,)" \
        --out benchmarks/results/bench_smollm2_cpu.json   # a real base (Meta or HF layout), random routers
"""
import json
import os
import platform
import sys
import time

import fire
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dllm import checkpoint, distributed  # noqa: E402
from dllm.flops import flops_ratio, kv_ratio  # noqa: E402
from dllm.model import ModelArgs, Transformer  # noqa: E402
from dllm.routing import DenseRouting, DLLMRouting  # noqa: E402


class CalibratedRouting(DLLMRouting):
    """D-LLM inference routing with a per-block threshold, set the first time a block is seen so
    that a fraction `share` of those tokens executes it (p(execute) >= threshold, as in D-LLM)."""

    def __init__(self, share: float, args: ModelArgs):
        super().__init__(args)
        self.share = share
        self.thresholds = {}

    def decide(self, block, x, positions, state):
        if block.router is not None:
            if block.layer_id not in self.thresholds:
                logits = block.router(x)
                margin = (logits[..., 1] - logits[..., 0]).flatten()
                self.thresholds[block.layer_id] = torch.sigmoid(torch.quantile(margin, 1.0 - self.share)).item()
            self.threshold = self.thresholds[block.layer_id]
        return super().decide(block, x, positions, state)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def run_prefill(model, tokens):
    cache = model.new_cache(tokens.shape[0])
    logits, activation = model(tokens, 0, cache)
    return activation, cache


def run_decode(model, prompt, steps, vocab):
    """Prefill `prompt`, then time `steps` single-token steps; returns (seconds, activation, cache)."""
    cache = model.new_cache(prompt.shape[0])
    _, prompt_act = model(prompt, 0, cache)
    device = prompt.device
    next_tokens = torch.randint(0, vocab, (prompt.shape[0], steps), device=device)
    acts = [prompt_act]
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        _, act = model(next_tokens[:, i : i + 1], prompt.shape[1] + i, cache)
        acts.append(act)
    sync(device)
    return time.perf_counter() - start, torch.cat(acts, 1), cache


def main(dim=2048, n_layers=8, n_heads=16, n_kv_heads=None, vocab_size=32000, router_hdim=512,
         start_layer=2, prompt_len=512, decode_prompt_len=128, decode_steps=32, decode_batches=(1, 8),
         shares=(0.25, 0.5, 0.75), repeats=3, dtype="float32", seed=0, llama_ckpt_dir=None,
         out="benchmarks/results/bench_skip_cpu.json"):
    """With `llama_ckpt_dir` the base weights and shape come from that checkpoint (routers stay random)."""
    device = distributed.setup()
    torch.manual_seed(seed)
    sizes = dict(dynamic_router_hdim=router_hdim, dynamic_start_layer=start_layer, lora_rank=0,
                 max_seq_len=prompt_len + decode_steps + decode_prompt_len, max_batch_size=max(decode_batches))
    torch_dtype = getattr(torch, dtype)
    if llama_ckpt_dir:
        args = checkpoint.load_params(llama_ckpt_dir, **sizes)
        model = checkpoint.build_model(args, llama_ckpt_dir, None, device, torch_dtype).eval()
        dim, n_layers, n_heads, vocab_size = args.dim, args.n_layers, args.n_heads, args.vocab_size
    else:
        args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                         **sizes)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        model = Transformer(args).to(device).eval()
        torch.set_default_dtype(previous)
    for layer in model.layers:
        if layer.router is not None:
            torch.nn.init.normal_(layer.router.linear_2.weight, std=0.5)
    prompt = torch.randint(0, vocab_size, (1, prompt_len), device=device)
    decode_prompts = {b: torch.randint(0, vocab_size, (b, decode_prompt_len), device=device) for b in decode_batches}

    policies = {"dense": DenseRouting()}
    with torch.inference_mode():
        for share in shares:
            policy = CalibratedRouting(share, args)
            model.routing = policy
            run_prefill(model, prompt)  # calibrates every router on the prompt
            policies[f"dllm@{share:.2f}"] = policy

        best = {name: {} for name in policies}
        record = {name: {} for name in policies}
        for _ in range(repeats):
            for name, policy in policies.items():
                model.routing = policy
                seconds, (act, cache) = timed(lambda: run_prefill(model, prompt), device)
                keep_best(best[name], "prefill_s", seconds)
                record[name]["prefill"] = (act, cache.bytes_kept(), cache.bytes_allocated())
                for b, dprompt in decode_prompts.items():
                    seconds, act, cache = run_decode(model, dprompt, decode_steps, vocab_size)
                    keep_best(best[name], f"decode{b}_s", seconds)
                    record[name][f"decode{b}"] = (act, cache.bytes_kept())

    rows = []
    dense = best["dense"]
    for name in policies:
        act, kv_bytes, kv_allocated = record[name]["prefill"]
        row = {
            "config": name,
            "exec_share_routed": float(act[..., start_layer:].mean()),
            "exec_share_all": float(act.mean()),
            "flops_ratio": flops_ratio(args, act, routing=policies[name]),
            "kv_ratio": kv_ratio(act),
            "kv_bytes": kv_bytes,
            "kv_bytes_ratio": kv_bytes / record["dense"]["prefill"][1],
            "kv_bytes_allocated": kv_allocated,
            "prefill_tok_s": prompt_len / best[name]["prefill_s"],
        }
        row["prefill_speedup"] = dense["prefill_s"] / best[name]["prefill_s"]
        row["prefill_of_ideal"] = row["prefill_speedup"] * row["flops_ratio"]
        for b in decode_batches:
            dact, dbytes = record[name][f"decode{b}"]
            decode_ratio = flops_ratio(args, dact, routing=policies[name])
            row[f"decode{b}_tok_s"] = b * decode_steps / best[name][f"decode{b}_s"]
            row[f"decode{b}_speedup"] = dense[f"decode{b}_s"] / best[name][f"decode{b}_s"]
            row[f"decode{b}_flops_ratio"] = decode_ratio
            row[f"decode{b}_of_ideal"] = row[f"decode{b}_speedup"] * decode_ratio
            row[f"decode{b}_kv_bytes_ratio"] = dbytes / record["dense"][f"decode{b}"][1]
        rows.append(row)

    meta = {"device": device_name(device), "model": llama_ckpt_dir or "random weights", "dtype": dtype, "dim": dim, "n_layers": n_layers, "n_heads": n_heads,
            "vocab_size": vocab_size, "router_hdim": router_hdim, "start_layer": start_layer,
            "prompt_len": prompt_len, "decode_prompt_len": decode_prompt_len, "decode_steps": decode_steps,
            "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__}
    print_table(rows, meta, decode_batches)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {out}")


def keep_best(store, key, seconds):
    store[key] = min(seconds, store.get(key, float("inf")))


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def print_table(rows, meta, decode_batches):
    print(f"\n{meta['model']}, {meta['device']}, {meta['dtype']}, dim {meta['dim']}, {meta['n_layers']} layers, "
          f"prompt {meta['prompt_len']}, decode {meta['decode_steps']} tokens after {meta['decode_prompt_len']}")
    head = ["config", "exec(routed)", "FLOPs ratio", "ideal x", "KV bytes ratio", "prefill tok/s", "prefill x", "% ideal"]
    for b in decode_batches:
        head += [f"decode b{b} tok/s", f"b{b} x", f"b{b} % ideal"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["config"], f"{r['exec_share_routed']:.3f}", f"{r['flops_ratio']:.3f}", f"{1 / r['flops_ratio']:.2f}",
                 f"{r['kv_bytes_ratio']:.3f}", f"{r['prefill_tok_s']:.1f}", f"{r['prefill_speedup']:.2f}",
                 f"{100 * r['prefill_of_ideal']:.0f}%"]
        for b in decode_batches:
            cells += [f"{r[f'decode{b}_tok_s']:.1f}", f"{r[f'decode{b}_speedup']:.2f}", f"{100 * r[f'decode{b}_of_ideal']:.0f}%"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    fire.Fire(main)
