"""A decode step's projections by row count: F.linear (`x @ weight.T`) against `weight @ x.T`.

In batched decode a routed block gets only the rows that execute it, so its seven projections run
on a few rows each; the blocks every row runs, and the output projection, get the whole batch.
The CPU's BLAS picks its kernel by the shape, and for some row counts the transposed product reads
the weights much faster. This measures both over every block of the model's shape and its output
projection (the weights come from memory, as in decode), interleaved, best of --repeats, and marks
the rows `layers.TRANSPOSED_ROWS` sends the transposed way. Each repeat times both products
back to back, and the least and most of those ratios show how steady the gain is: a row count is
worth sending when the transposed product is well ahead in every repeat, run after run.

    python -m benchmarks.bench_linear_rows --out benchmarks/results/linear_rows_cpu.json
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from benchmarks import write_results
from benchmarks.bench_skip import run_meta
from dllm import distributed
from dllm.config import Settings, setting
from dllm.core.layers import TRANSPOSED_ROWS
from dllm.errors import run_cli
from dllm.timing import CLOCKS, timed


@dataclass
class LinearRowsConfig(Settings):
    dim: int = setting(576, "model width (default: SmolLM2-135M's)", low=1)
    hidden_dim: int = setting(1536, "FFN width", low=1)
    kv_dim: int = setting(192, "K/V projection width", low=1)
    n_layers: int = setting(30, "blocks (their weights together should not fit in the caches)", low=1)
    vocab_size: int = setting(49152, "the output projection's rows, read once per pass as in a decode step; 0: "
                              "blocks only", low=0)
    rows: List[int] = setting([1, 2, 3, 4, 5, 6, 7, 8, 16], "row counts", low=1)
    repeats: int = setting(7, "interleaved repeats; the best is kept", low=1)
    clock: str = setting("wall", "wall time, or the process's CPU time (a CPU shared with other jobs)",
                         choices=tuple(CLOCKS))
    seed: int = setting(0, "random seed")
    out: Optional[str] = setting(None, "write the JSON here, and the table beside it (.md)")


def block_weights(config: LinearRowsConfig, device) -> List[torch.Tensor]:
    """wq, wk, wv, wo, w1, w3, w2 of every block, [out, in] as the model keeps them, and the output
    projection."""
    d, h, kv = config.dim, config.hidden_dim, config.kv_dim
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (h, d), (h, d), (d, h)] * config.n_layers
    return [torch.randn(o, i, device=device) for o, i in shapes + [(config.vocab_size, d)] if o]


def main(config: LinearRowsConfig):
    device = distributed.setup()
    torch.manual_seed(config.seed)
    weights = block_weights(config, device)
    gigabytes = sum(w.numel() * w.element_size() for w in weights) / 1e9
    sends = TRANSPOSED_ROWS.get(device.type, ())
    rows = []
    with torch.inference_mode():
        for n in config.rows:
            inputs = {w.shape[1]: torch.randn(n, w.shape[1], device=device) for w in weights}
            routes = {"linear": lambda: [F.linear(inputs[w.shape[1]], w) for w in weights],
                      "transposed": lambda: [torch.mm(w, inputs[w.shape[1]].T).T.contiguous() for w in weights]}
            for a, b in zip(*(route() for route in routes.values())):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            times = {name: [] for name in routes}
            for _ in range(config.repeats):
                for name, route in routes.items():
                    times[name].append(timed(route, device, config.clock)[0])
            best = {name: min(seconds) for name, seconds in times.items()}
            ratios = sorted(a / b for a, b in zip(times["linear"], times["transposed"]))  # one repeat's pair each
            rows.append({"rows": n, "linear_ms": 1e3 * best["linear"], "transposed_ms": 1e3 * best["transposed"],
                         "linear_gb_s": gigabytes / best["linear"], "transposed_gb_s": gigabytes / best["transposed"],
                         "transposed_x_linear": best["linear"] / best["transposed"],
                         "ratio_low": ratios[0], "ratio_high": ratios[-1], "sent_transposed": n in sends})
            print(markdown_row(rows[-1]), flush=True)
    meta = {**run_meta(config, device), "weight_gb": gigabytes}
    write_results(config.out, {"meta": meta, "rows": rows}, markdown(meta, rows))


def markdown_row(row: dict) -> str:
    return (f"| {row['rows']} | {row['linear_ms']:.1f} | {row['transposed_ms']:.1f} | {row['linear_gb_s']:.1f} | "
            f"{row['transposed_gb_s']:.1f} | {row['transposed_x_linear']:.2f} | {row['ratio_low']:.2f} to {row['ratio_high']:.2f} | "
            f"{'yes' if row['sent_transposed'] else ''} |")


def markdown(meta: dict, rows: List[dict]) -> str:
    s = meta["settings"]
    lines = [f"# A decode step's projections by row count: {meta['device']}", "", f"    {meta['command']}", "",
             f"The seven projections of {s['n_layers']} blocks of width {s['dim']} (FFN {s['hidden_dim']}, K/V "
             f"{s['kv_dim']})" + (f" and the output projection ({s['vocab_size']} x {s['dim']})" if s['vocab_size'] else "")
             + f": {meta['weight_gb']:.3f} GB of fp32 weights read per pass; best of {s['repeats']}, "
             f"{s['clock']} clock, {meta['threads']} threads; torch {meta['torch']}; load average (1, 5, 15 min) "
             f"{', '.join(f'{x:.1f}' for x in meta['load_average'])} at the end.",
             "", "| rows | F.linear ms | weight @ x.T ms | F.linear GB/s | weight @ x.T GB/s | transposed x linear "
             "| the same, repeat by repeat | layers.TRANSPOSED_ROWS sends it |", "|" + "---|" * 8]
    return "\n".join(lines + [markdown_row(r) for r in rows]) + "\n"


if __name__ == "__main__":
    run_cli(main, LinearRowsConfig.parse(description=__doc__))
