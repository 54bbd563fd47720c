"""Decode attention at one routed block, by route: what kv_cache.py chose and what it rejected.

For each (batch, context, share) a block's cache holds `context` kept pairs per row (rows differ
by a few), a share of the rows executes the step, and each route computes those rows' attention:
- batched: one call over every row's keys up to the longest, through a mask; rows that run
  nothing attend too (the only route before row-by-row);
- gathered: the executing rows' keys copied into a sub-batch (index_select), one masked call;
- row_by_row: one call per executing row over exactly its kept keys, views of the cache.
Routes are interleaved and the best of --repeats kept; `chosen` is the route the cache's cost rule
(kv_cache.CALL_COST_BYTES) takes there. Attention only: projections and FFN are the same for all.

    python -m benchmarks.bench_kept_attention --clock cpu --out benchmarks/results/kept_attention_cpu.json
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from benchmarks import write_results
from benchmarks.bench_skip import run_meta
from dllm import distributed
from dllm.config import Settings, setting
from dllm.errors import run_cli
from dllm.core.kv_cache import LayerKVCache
from dllm.core.model import Attention, ModelArgs
from dllm.timing import CLOCKS, timed

ROUTES = ("batched", "gathered", "row_by_row")


@dataclass
class KeptAttentionConfig(Settings):
    dim: int = setting(576, "model width (default: SmolLM2-135M's)", low=1)
    n_heads: int = setting(9, "attention heads", low=1)
    n_kv_heads: int = setting(3, "key/value heads", low=1)
    batches: List[int] = setting([1, 8, 32], "batch sizes", low=1)
    contexts: List[int] = setting([128, 512, 2048, 4096], "kept pairs per row", low=1)
    shares: List[float] = setting([0.5], "share of the rows that execute the step", low=0, high=1, low_open=True)
    repeats: int = setting(20, "interleaved repeats; the best is kept", low=1)
    clock: str = setting("wall", "wall time, or the process's CPU time (a CPU shared with other jobs)",
                         choices=tuple(CLOCKS))
    seed: int = setting(0, "random seed")
    out: Optional[str] = setting(None, "write the JSON here, and the table beside it (.md)")


def measure(attention: Attention, batch: int, context: int, share: float, config: KeptAttentionConfig, device) -> dict:
    kv = LayerKVCache(batch, attention.n_local_kv_heads, attention.head_dim, torch.float32, device, max_len=2 * context + 8)
    running = max(1, round(share * batch))
    kv.reserve(context + 8)
    kv.k.normal_(), kv.v.normal_()
    kv.lengths = [context + r % 5 for r in range(batch)]
    execute = [[r * running // batch != (r + 1) * running // batch] for r in range(batch)]
    packing = kv.pack(execute, start=context + 8, device=device)
    rows = [(r, kv.lengths[r] - 1, 1) for r in range(batch) if execute[r][0]]
    q = torch.randn(len(rows), attention.n_local_heads, attention.head_dim, device=device)
    longest = max(kv.lengths)
    keys, values = kv.k[:, :, :longest], kv.v[:, :, :longest]
    bounds = torch.tensor([length - 1 for length in kv.lengths], device=device)
    mask = torch.arange(longest, device=device) <= bounds[:, None, None]  # [batch, 1, keys]
    index = torch.tensor([r for r, _, _ in rows], device=device)

    def batched():
        q_pad = q.new_zeros(batch, 1, *q.shape[1:])
        q_pad[index, 0] = q
        return attention.attend(q_pad, keys, values, mask)[index, 0]

    def gathered():
        return attention.attend(q[:, None], keys.index_select(0, index), values.index_select(0, index), mask[index])[:, 0]

    def row_by_row():
        return attention.attend_rows(q, rows, kv)

    routes = {"batched": batched, "gathered": gathered, "row_by_row": row_by_row}
    reference = batched()
    for route in routes.values():
        torch.testing.assert_close(route(), reference, rtol=1e-4, atol=1e-5)
    best = {name: float("inf") for name in routes}
    for _ in range(config.repeats):
        for name, route in routes.items():
            best[name] = min(best[name], timed(route, device, config.clock)[0])
    return {"batch": batch, "context": context, "share": share, "rows_run": len(rows),
            "chosen": "batched" if packing.rows is None else "row_by_row",
            **{f"{name}_us": 1e6 * seconds for name, seconds in best.items()},
            "row_by_row_x_batched": best["batched"] / best["row_by_row"]}


def main(config: KeptAttentionConfig):
    device = distributed.setup()
    torch.manual_seed(config.seed)
    args = ModelArgs(dim=config.dim, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, lora_rank=0)
    attention = Attention(args, torch.nn.init.normal_).to(device)
    rows = []
    with torch.inference_mode():
        for batch in config.batches:
            for context in config.contexts:
                for share in config.shares:
                    rows.append(measure(attention, batch, context, share, config, device))
                    print(markdown_row(rows[-1]), flush=True)
    meta = run_meta(config, device)
    write_results(config.out, {"meta": meta, "rows": rows}, markdown(meta, rows))


def markdown_row(row: dict) -> str:
    times = " | ".join(f"{row[f'{name}_us']:.0f}" for name in ROUTES)
    return (f"| {row['batch']} | {row['context']} | {row['share']:.2f} | {row['rows_run']} | {times} | "
            f"{row['row_by_row_x_batched']:.2f} | {row['chosen']} |")


def markdown(meta: dict, rows: List[dict]) -> str:
    s = meta["settings"]
    lines = [f"# Decode attention at one routed block, by route: {meta['device']}", "", f"    {meta['command']}", "",
             f"dim {s['dim']}, {s['n_heads']} heads, {s['n_kv_heads']} K/V heads, fp32; one query per executing row; "
             f"best of {s['repeats']}, {s['clock']} clock; torch {meta['torch']}; load average (1, 5, 15 min) "
             f"{', '.join(f'{x:.1f}' for x in meta['load_average'])} at the end (other jobs shared the cores).",
             "", "| batch | kept pairs per row | share running | rows run | batched us | gathered us | row by row us "
             "| row by row x batched | cost rule takes |", "|" + "---|" * 9]
    return "\n".join(lines + [markdown_row(r) for r in rows]) + "\n"


if __name__ == "__main__":
    run_cli(main, KeptAttentionConfig.parse(description=__doc__))
