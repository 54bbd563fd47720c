"""Cost as the work grows: prefill and decode time per token against context length and batch, for
dense, D-LLM at each execution share and transformers' Llama on the same weights, and the K/V
memory each keeps; where skipping pays, and how much.

Each cell (batch, context) prefills `context` random tokens per row into a fresh cache (timed in
one forward when batch x context <= --prefill_tokens, else untimed in chunks), then times --decode_steps tokens one at a time (when
batch x context <= --decode_tokens); a cell past both caps is listed as skipped, with why. The
configurations are interleaved within every repeat of a cell and the best repeat is kept, so every
ratio in a row comes from one run. Routers and timing are bench_skip.py's; so is the bytes ideal
of a decode cell (weights of the blocks some row executes, and each executing row's kept K/V).

    python -m benchmarks.bench_scaling --llama_ckpt_dir models/smollm2 \\
        --out benchmarks/results/scaling_smollm2_cpu.json --png docs/scaling-smollm2.png
    python -m benchmarks.bench_scaling --out benchmarks/results/scaling_dim1024_cpu.json \\
        --png docs/scaling-dim1024.png   # the random-weight dim-1024 shape of bench_skip.py

--out writes the JSON and a Markdown table beside it (.md); without it the table is printed only.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from benchmarks import write_results
from benchmarks.bench_skip import (
    BenchBase, CacheBytes, build_model, decode_bytes, describe, keep_best, make_runners, weight_bytes,
)
from dllm import distributed
from dllm.config import setting
from dllm.errors import run_cli
from dllm.plots import save_png, scaling_figure
from dllm.core.routing import DLLMRouting

MB = 2 ** 20


@dataclass
class ScalingConfig(BenchBase):
    contexts: List[int] = setting([256, 512, 1024, 2048, 4096, 8192], "context lengths (tokens per row)", low=1)
    batches: List[int] = setting([1, 8, 32], "batch sizes", low=1)
    prefill_tokens: int = setting(8192, "time a prefill only up to this many tokens (batch x context)", low=1)
    decode_tokens: int = setting(32768, "time decode only after up to this many tokens (batch x context)", low=1)
    png: Optional[str] = setting(None, "draw the picture here")


def measure_cell(config: ScalingConfig, runners: dict, tokens: torch.Tensor, batch: int, context: int,
                 sizes: dict, device) -> Dict[str, dict]:
    """Every configuration's prefill and decode at one (batch, context), best of the repeats."""
    prompt, steps = tokens[:batch, :context], tokens[:batch, context : context + config.decode_steps]
    time_prefill = batch * context <= config.prefill_tokens
    best: Dict[str, Dict[str, float]] = {name: {} for name in runners}
    kept = {}
    for _ in range(config.repeats):
        for name, runner in runners.items():
            if time_prefill:
                seconds, activation, cache = runner.prefill(prompt, device, room=config.decode_steps)
                keep_best(best[name], "prefill", seconds)
            else:
                activation, cache = runner.fill(prompt, device, room=config.decode_steps)
            seconds, step_activation = runner.steps(cache, steps, context, device)
            keep_best(best[name], "decode", seconds)
            if activation is not None:
                kept[name] = (torch.cat([activation, step_activation], 1), CacheBytes.of(cache))
            del cache
    dense = best["dense"]
    pair_bytes = kept["dense"][1].pair
    dense_bytes = decode_bytes(torch.ones_like(kept["dense"][0]), sizes, context, pair_bytes, False)
    out = {}
    for name, runner in runners.items():
        cell = {"decode_ms_per_token": 1e3 * best[name]["decode"] / (batch * config.decode_steps),
                "decode_x_dense": dense["decode"] / best[name]["decode"]}
        if time_prefill:
            cell.update(prefill_ms_per_token=1e3 * best[name]["prefill"] / (batch * context),
                        prefill_x_dense=dense["prefill"] / best[name]["prefill"])
        if name in kept:
            activation, cache = kept[name]
            routed = isinstance(runner.routing, DLLMRouting)
            cell.update(exec_share_routed=float(activation[..., config.start_layer:].mean()),
                        kv_mb_per_row=cache.kept / batch / MB,
                        kv_mb_allocated_per_row=cache.allocated / batch / MB,
                        bytes_ideal_x=dense_bytes / decode_bytes(activation, sizes, context, pair_bytes, routed))
            cell["of_bytes_ideal"] = cell["decode_x_dense"] / cell["bytes_ideal_x"]
        else:  # transformers' static cache holds every slot it was made with
            cell["kv_mb_per_row"] = (context + config.decode_steps) * pair_bytes * len(sizes["blocks"]) / MB
        out[name] = cell
    return out


def main(config: ScalingConfig):
    device = distributed.setup()
    torch.manual_seed(config.seed)
    model = build_model(config, device, max(config.contexts) + config.decode_steps, max(config.batches))
    vocab = model.params.vocab_size
    tokens = torch.randint(0, vocab, (max(config.batches), max(config.contexts) + config.decode_steps), device=device)
    calibration = torch.randint(0, vocab, (8, min(256, min(config.contexts))), device=device)
    runners = make_runners(model, config.shares, calibration, device, config.clock)
    sizes = weight_bytes(model)
    meta = describe(config, model, device)
    meta["load_average_before"] = meta.pop("load_average")
    cells = []
    with torch.inference_mode():
        for batch in config.batches:
            for context in config.contexts:
                cell = {"batch": batch, "context": context}
                if batch * context > config.decode_tokens:
                    cell["skipped"] = (f"batch x context = {batch * context} > --decode_tokens {config.decode_tokens}"
                                       " (time and memory)")
                else:
                    cell["configs"] = measure_cell(config, runners, tokens, batch, context, sizes, device)
                    if batch * context > config.prefill_tokens:
                        cell["prefill_skipped"] = f"batch x context > --prefill_tokens {config.prefill_tokens}"
                cells.append(cell)
                print(markdown_row(cell, list(runners)), flush=True)
    meta["load_average_after"] = os.getloadavg()
    result = {"meta": meta, "cells": cells}
    write_results(config.out, result, markdown(result, list(runners)))
    if config.png:
        save_png(scaling_figure(result), config.png)
        print(f"wrote {config.png}")


def markdown_row(cell: dict, names: List[str]) -> str:
    """One decode row: ms per token, and D-LLM's speed over dense and share of its bytes ideal."""
    lead = f"| {cell['batch']} | {cell['context']} |"
    if "skipped" in cell:
        return lead + f" skipped: {cell['skipped']} |" + " |" * (len(names) - 1)
    parts = []
    for name in names:
        c = cell["configs"][name]
        text = f"{c['decode_ms_per_token']:.2f}"
        if name.startswith("dllm"):
            text += f" ({c['decode_x_dense']:.2f}x, {c['of_bytes_ideal']:.0%} of {c['bytes_ideal_x']:.2f}x)"
        parts.append(text)
    return lead + " " + " | ".join(parts) + " |"


def markdown(result: dict, names: List[str]) -> str:
    meta = result["meta"]
    s = meta["settings"]
    lines = [f"# Cost as the work grows: {meta['model']}, {meta['device']}, {s['dtype']}",
             "", f"    {meta['command']}", "",
             f"dim {meta['dim']}, {meta['n_layers']} layers, {meta['n_heads']} heads; decode {s['decode_steps']} steps "
             f"after each context; best of {s['repeats']}; torch {meta['torch']}, transformers {meta['transformers']}. "
             f"Load average (1, 5, 15 min) before {fmt_load(meta['load_average_before'])}, after "
             f"{fmt_load(meta['load_average_after'])} (this run's own {meta['threads']} threads count in it); the "
             f"ratios of a row come from one run, so compare those.",
             "", "## Decode, ms per generated token (D-LLM: speed over dense, share of the bytes ideal reached)", "",
             "| batch | context | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    lines += [markdown_row(cell, names) for cell in result["cells"]]
    lines += ["", "## Prefill, ms per token (D-LLM: speed over dense)", "",
              "| batch | context | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for cell in result["cells"]:
        lead = f"| {cell['batch']} | {cell['context']} |"
        if "configs" not in cell or "prefill_skipped" in cell:
            lines.append(lead + f" skipped: {cell.get('skipped') or cell['prefill_skipped']} |" + " |" * (len(names) - 1))
            continue
        parts = []
        for name in names:
            c = cell["configs"][name]
            parts.append(f"{c['prefill_ms_per_token']:.3f}" + (f" ({c['prefill_x_dense']:.2f}x)" if name.startswith("dllm") else ""))
        lines.append(lead + " " + " | ".join(parts) + " |")
    lines += ["", "## K/V memory per row, MB kept (transformers: its static cache)", "",
              "| context | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for cell in result["cells"]:
        if cell["batch"] == min(c["batch"] for c in result["cells"]) and "configs" in cell:
            lines.append(f"| {cell['context']} | " + " | ".join(f"{cell['configs'][n]['kv_mb_per_row']:.1f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def fmt_load(load) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    run_cli(main, ScalingConfig.parse(description=__doc__))
