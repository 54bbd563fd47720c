"""What budget-conditioned adapters execute when told a budget through the router input alone: per
adapter and budget, the share of all blocks run (inference: execute where the margin is >= 0), the
share training's Gumbel sampling would run on the same hidden states (the mean execute
probability), and how confident the routers are (mean |p(execute) - 0.5|). If the two shares agree
and the routers are confident, a share above the budget is what training taught, not a gap between
training's sampling and inference's threshold (docs/dial.md).

    python -m benchmarks.dial_shares --llama_ckpt_dir models/smollm2 --dataset_name smol \\
        --adapters '["wide=runs/smol-dial-wide"]' --out benchmarks/results/dial_smollm2_shares.json

Counted over the first --records records of --split, prompt and response, past the reserved
initial tokens; the blocks before the first routed one count as run.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from benchmarks import write_results
from benchmarks.bench_skip import run_meta
from dllm.config import Settings, setting
from dllm.dial import calibration_records, record_margins, records_loader
from dllm.errors import InputError, run_cli
from dllm.generation import Llama


@dataclass
class DialSharesConfig(Settings):
    llama_ckpt_dir: str = setting("", "base model directory", required=True)
    dataset_path: str = setting("datasets", "directory with one NAME/{train,validation,test}.json per dataset")
    dataset_name: str = setting("", "the dataset whose records are routed", required=True)
    split: str = setting("validation", "the split measured", choices=("train", "validation", "test"))
    records: int = setting(24, "the first records of the split, in file order", low=1)
    max_seq_len: int = setting(256, "tokens per record (longer ones are cut as in fine-tuning)", low=2)
    batch_size: int = setting(8, "records per forward pass", low=1)
    adapters: List[str] = setting([], "NAME=RUN, one per budget-conditioned adapter, e.g. "
                                  "'[\"wide=runs/smol-dial-wide\"]'", required=True)
    budgets: List[float] = setting([0.4, 0.5, 0.625, 0.75, 0.875], "budgets told to the routers", low=0.0, high=1.0)
    out: Optional[str] = setting(None, "write the JSON here, and the table beside it (.md)")


def shares_at(generator: Llama, loader, budget: float) -> dict:
    """One adapter told `budget`: the shares run and expected, and the routers' confidence."""
    model = generator.model
    generator.set_budget(budget)  # checked against the trained range, the LoRA at its strength there
    margins = record_margins(model, loader, generator.device)
    routed = torch.stack([margins[layer_id] for layer_id in sorted(margins)], -1)  # [tokens, routed blocks]
    always = model.n_layers - routed.shape[1]
    probability = torch.sigmoid(routed)
    return {"budget": budget,
            "share_run": float((always + (routed >= 0).sum(-1).float().mean()) / model.n_layers),
            "share_expected_under_sampling": float((always + probability.sum(-1).mean()) / model.n_layers),
            "confidence": float((probability - 0.5).abs().mean())}


def main(config: DialSharesConfig):
    rows = []
    for entry in config.adapters:
        name, _, run = entry.partition("=")
        if not run:
            raise InputError(f"--adapters {entry!r}: give NAME=RUN")
        generator = Llama.build(config.llama_ckpt_dir, run, max_seq_len=config.max_seq_len,
                                max_batch_size=config.batch_size)
        if not generator.model.params.dynamic_budget_range:
            raise InputError(f"--adapters {entry!r}: not a budget-conditioned adapter (DYNAMIC_BUDGET_RANGE)")
        generator.model.routing.dial = None  # the router input alone, whatever is calibrated beside it
        records = calibration_records(generator.tokenizer, config.dataset_path, config.dataset_name, config.split,
                                      config.records)
        loader = records_loader(records, generator.tokenizer, config.max_seq_len, config.batch_size)
        for budget in config.budgets:
            rows.append({"adapter": name, "run": run, **shares_at(generator, loader, budget)})
            print(markdown_row(rows[-1]), flush=True)
    meta = run_meta(config, generator.device)
    write_results(config.out, {"meta": meta, "rows": rows}, markdown(meta, rows))


def markdown_row(row: dict) -> str:
    return (f"| {row['adapter']} | {row['budget']} | {row['share_run']:.3f} | {row['share_run'] - row['budget']:+.3f} | "
            f"{row['share_expected_under_sampling']:.3f} | {row['confidence']:.3f} |")


def markdown(meta: dict, rows: List[dict]) -> str:
    s = meta["settings"]
    lines = [f"# Shares run through the router input: {s['dataset_name']} {s['split']}, first {s['records']} records",
             "", f"    {meta['command']}", "",
             "| adapter | budget | share run | share − budget | share expected under training's sampling | "
             "mean abs(p − 0.5) |", "|" + "---|" * 6]
    return "\n".join(lines + [markdown_row(r) for r in rows]) + "\n"


if __name__ == "__main__":
    run_cli(main, DialSharesConfig.parse(description=__doc__))
