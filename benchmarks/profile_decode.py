"""Where a decode step's time goes, dense against D-LLM, in one run: torch.profiler over batched
decode steps after a long prompt, each operator's self time per step grouped as attention, matrix
products (the routers' among them), and everything else, beside the step's wall time with and
without the profiler, and the K/V bytes attention must read (each executing row's kept pairs) with the
rate its time gives them. `bench_skip.py` says how fast a step is against its ideal; this says which
part of it falls short.

    python -m benchmarks.profile_decode --llama_ckpt_dir models/smollm2 --context 4096 --batch 8 \\
        --out benchmarks/results/profile_decode_smollm2_ctx4096.json

The model and routers are bench_skip's (a real base or random weights, random routers calibrated
to the share); the steps are timed after `--warmup` untimed ones, each configuration's cache filled
untimed first.
"""
import json
import time
from dataclasses import dataclass
from typing import Dict, List

import torch

from benchmarks.bench_skip import BenchBase, build_model, decode_reads, make_runners, run_meta, weight_bytes
from dllm import distributed
from dllm.atomic_io import atomic_write_text
from dllm.config import setting
from dllm.errors import run_cli

ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
             "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention")
PRODUCTS = ("aten::mm", "aten::addmm")  # addmm: the routers' layers, the only ones with a bias


@dataclass
class ProfileConfig(BenchBase):
    context: int = setting(4096, "prompt tokens per row before the profiled steps", low=1)
    batch: int = setting(8, "rows decoded together", low=1)
    warmup: int = setting(4, "untimed decode steps before the profiled ones", low=0)
    decode_steps: int = setting(8, "profiled decode steps", low=1)
    shares: List[float] = setting([0.5], "execution shares of the routed blocks", low=0, high=1, low_open=True)


def step_profile(runner, tokens, config, device) -> Dict[str, float]:
    """ms per step: wall with and without the profiler, and operator self time by group."""
    prompt, steps = tokens[:, : config.context], tokens[:, config.context :]
    activation, cache = runner.fill(prompt, device, room=steps.shape[1])
    runner.model.use_routing(runner.routing)
    activations = [activation]

    def run(first: int, last: int):
        for i in range(first, last):
            activations.append(runner.model(steps[:, i : i + 1], config.context + i, cache)[1])

    run(0, config.warmup)
    begin = time.perf_counter()
    run(config.warmup, config.warmup + config.decode_steps)
    wall = (time.perf_counter() - begin) / config.decode_steps
    with torch.profiler.profile() as prof:
        begin = time.perf_counter()
        run(config.warmup + config.decode_steps, config.warmup + 2 * config.decode_steps)
        profiled = (time.perf_counter() - begin) / config.decode_steps
    events = prof.key_averages()

    def self_ms(names) -> float:
        return sum(e.self_cpu_time_total for e in events if e.key in names) / 1e3 / config.decode_steps

    def calls(names) -> float:
        return sum(e.count for e in events if e.key in names) / config.decode_steps

    total = sum(e.self_cpu_time_total for e in events) / 1e3 / config.decode_steps
    attention, products = self_ms(ATTENTION), self_ms(PRODUCTS)
    # the K/V pairs the profiled steps' attention must read: each executing row's kept ones
    profiled_from = config.context + config.warmup + config.decode_steps
    weights, pairs = decode_reads(torch.cat(activations, 1), weight_bytes(runner.model), profiled_from, False)
    kv_mb = pairs * cache.pair_bytes() / 1e6 / config.decode_steps
    return {"kv_read_mb": kv_mb, "kv_gb_s": kv_mb / attention, "weights_mb": weights / 1e6 / config.decode_steps,
            "wall_ms": wall * 1e3, "profiled_ms": profiled * 1e3, "ops_ms": total, "attention_ms": attention,
            "attention_calls": calls(ATTENTION), "products_ms": products, "routers_ms": self_ms(("aten::addmm",)),
            "other_ops_ms": total - attention - products, "outside_ops_ms": profiled * 1e3 - total}


def main(config: ProfileConfig):
    device = distributed.setup()
    torch.manual_seed(config.seed)
    length = config.context + config.warmup + 2 * config.decode_steps
    model = build_model(config, device, length, config.batch)
    tokens = torch.randint(0, model.params.vocab_size, (config.batch, length), device=device)
    runners = make_runners(model, config.shares, tokens[:, : min(256, config.context)], device, config.clock,
                           reference=False)
    rows = []
    with torch.inference_mode():
        for name, runner in runners.items():
            rows.append({"config": name, **step_profile(runner, tokens, config, device)})
    dense = rows[0]["wall_ms"]
    keys = ("wall_ms", "profiled_ms", "attention_ms", "attention_calls", "kv_read_mb", "kv_gb_s", "products_ms",
            "routers_ms", "other_ops_ms", "outside_ops_ms")
    print(f"batch {config.batch}, decode after {config.context} tokens, ms per step")
    print("| config | x dense | " + " | ".join(keys) + " |")
    for row in rows:
        row["x_dense"] = dense / row["wall_ms"]
        print(f"| {row['config']} | {row['x_dense']:.2f} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    if config.out:
        meta = {**run_meta(config, device), "model": config.llama_ckpt_dir or "random weights"}
        atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", config.out)
        print(f"wrote {config.out}")


if __name__ == "__main__":
    run_cli(main, ProfileConfig.parse(description=__doc__))
