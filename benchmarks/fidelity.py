r"""What each adapter keeps of the dense base, and where its compute goes (dllm/fidelity.py), on one
split, in one run.

    python -m benchmarks.fidelity --llama_ckpt_dir models/smollm2 --split validation \
        --runs "shipped=assets/smollm2-dllm/checkpoint.pth" --out benchmarks/results/fidelity_smollm2_shipped_validation.json

`--runs` is `label=adapter` separated by `;`, `label=adapter@B` to run the adapter at budget B (its
dial: docs/dial.md); a label `METHOD:NAME` (e.g. `static_ppl:13`, `dllm:t0.85`) puts the run on
METHOD's line in the picture (tools/plot_fidelity.py), and every run is set against the --reference
method's curve at equal FLOPs. `--append` adds the runs to an
existing --out (measured on the same split), so a curve grows as its fine-tunes finish. Per run: KL(base || model) per response token, top-1
agreement with the base and CE (teacher forced on every record of the split); greedy answers of both
models on every prompt compared (exact, first ten words, ROUGE-L); execution share and FLOPs ratio over
prompt and response tokens, and over prefill and decode in generation; prefill and decode speed
against the base, timed in the same generations (batch 1, model and base alternating). The JSON keeps
every answer; the Markdown table shows each run's first three, in file order.
"""
import datetime
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from dllm.atomic_io import atomic_write_text
from dllm.chat import ChatFormat
from dllm.config import Settings, setting
from dllm.curves import curve_points, interpolate, method_of
from dllm.data import TASKS, load_records
from dllm.errors import InputError, run_cli
from dllm.evaluate import code_version
from dllm.fidelity import Sums, generation, summary, teacher_forced
from dllm.generation import Llama

COLUMNS = [("KL", "kl", "{:.3f}"), ("top-1", "top1_agreement", "{:.3f}"), ("CE", "ce", "{:.3f}"),
           ("gen exact", "gen_exact", "{:.2f}"), ("gen first 10 words", "gen_first_words", "{:.2f}"),
           ("gen ROUGE-L", "gen_rouge_l", "{:.3f}"), ("share prompt", "share_prompt", "{:.3f}"),
           ("share response", "share_response", "{:.3f}"), ("FLOPs prompt", "flops_prompt", "{:.3f}"),
           ("FLOPs response", "flops_response", "{:.3f}"), ("FLOPs all", "flops_all", "{:.3f}"),
           ("share decode", "share_decode", "{:.3f}"), ("FLOPs generation", "flops_generation", "{:.3f}"),
           ("prefill x", "prefill_speedup", "{:.2f}"), ("decode x", "decode_speedup", "{:.2f}")]


@dataclass
class FidelityConfig(Settings):
    llama_ckpt_dir: str = setting("models/smollm2", "base model directory (the dense reference)")
    runs: str = setting("", "label=adapter or label=adapter@budget, separated by ';'", required=True)
    dataset_path: str = setting("datasets", "directory of the datasets")
    dataset_name: str = setting("smol", "dataset measured", choices=sorted(TASKS))
    split: str = setting("validation", "split measured: validation for choices, test for the final tables",
                         choices=["validation", "test"])
    records: int = setting(0, "the split's first N records (0: all)", low=0)
    max_gen_len: int = setting(96, "most tokens per greedy answer", low=1)
    batch_size: int = setting(8, "records per teacher-forced forward", low=1)
    max_seq_len: int = setting(512, "longest prompt plus answer", low=1)
    out: str = setting("", "JSON written at the end (the Markdown table beside it)", required=True)
    append: bool = setting(False, "add the runs to the rows --out already holds (same base, dataset and split)")
    reference: str = setting("static_ppl", "the method (label prefix) whose curve every run is set against")


def parse_runs(runs: str):
    """[(label, adapter, budget or None)]."""
    out = []
    for item in runs.split(";"):
        label, sep, adapter = item.partition("=")
        adapter, at, budget = adapter.partition("@")
        try:
            if not sep or not label.strip() or not adapter.strip():
                raise ValueError
            out.append((label.strip(), adapter.strip(), float(budget) if at else None))
        except ValueError:
            raise InputError(f"--runs {item!r}: expected label=adapter or label=adapter@budget") from None
    return out


def measure(config: FidelityConfig, base: Llama, adapter: str, records, budget: Optional[float] = None) -> dict:
    generator = Llama.build(config.llama_ckpt_dir, adapter, max_seq_len=config.max_seq_len,
                            max_batch_size=config.batch_size, model_parallel_size=1, budget=budget)
    chat = ChatFormat(generator.tokenizer)
    sums, answers = Sums(), []
    teacher_forced(generator.model, base.model, generator.tokenizer, records, sums, config.batch_size)
    generation(generator, base, records, sums, config.max_gen_len, chat.stop_ids, answers)
    return {"adapter": os.path.abspath(adapter), "budget": budget, "routing": generator.model.params.routing,
            **summary(sums, generator.model.n_layers), "sums": asdict(sums), "answers": answers}


def against_static(rows: dict, label: str, x_key: str, reference: str) -> str:
    if method_of(label) == reference:
        return ""
    row = rows[label]
    static = interpolate(curve_points(rows, reference, x_key, "kl"), row[x_key])
    return "outside its curve" if static is None else f"{row['kl'] - static:+.3f}"


def markdown(meta: dict, rows: dict) -> str:
    reference = meta.get("reference", "static_ppl")
    lines = [f"### What each adapter keeps of {meta['base_model']}, {meta['dataset']} {meta['split']} split", ""]
    lines += [f"`{command}`" for command in meta["commands"]]
    lines += ["", f"KL − static: the run's KL minus {reference}'s at the same FLOPs ratio (interpolated between "
              "its depths), over all teacher-forced tokens and over generation.", "",
              "| run | " + " | ".join(name for name, _, _ in COLUMNS) + " | KL − static, all-token FLOPs "
              "| KL − static, generation FLOPs |", "|---" * (len(COLUMNS) + 3) + "|"]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) +
                     f" | {against_static(rows, label, 'flops_all', reference)} "
                     f"| {against_static(rows, label, 'flops_generation', reference)} |")
    for label, row in rows.items():
        lines += ["", f"#### {label}: the first three answers beside the base's", ""]
        for answer in row["answers"][:3]:
            lines += [f"- base: {json.dumps(answer['base'])}", f"  - model: {json.dumps(answer['model'])}"]
    return "\n".join(lines) + "\n"


def earlier(config: FidelityConfig, labels) -> tuple:
    """(meta, rows) --out holds, checked to be this measurement's; empty without --append."""
    if not config.append:
        if os.path.exists(config.out):
            raise InputError(f"--out {config.out} exists; pass --append to add runs to it, or choose another path")
        return None, {}
    if not os.path.isfile(config.out):
        return None, {}
    with open(config.out) as f:
        data = json.load(f)
    meta = data["meta"]
    for key, value in (("base_model", config.llama_ckpt_dir), ("dataset", config.dataset_name),
                       ("split", config.split), ("max_gen_len", config.max_gen_len)):
        if meta[key] != value:
            raise InputError(f"--out {config.out}: its runs have {key} {meta[key]!r}, this one {value!r}")
    twice = sorted(set(labels) & set(data["runs"]))
    if twice:
        raise InputError(f"--out {config.out} already has runs {', '.join(twice)}")
    return meta, data["runs"]


def main(config: FidelityConfig, command: str):
    runs = parse_runs(config.runs)
    if not config.out.endswith(".json"):
        raise InputError(f"--out {config.out}: expected a .json path")
    meta, rows = earlier(config, [label for label, _, _ in runs])
    base = Llama.build(config.llama_ckpt_dir, dense=True, max_seq_len=config.max_seq_len,
                       max_batch_size=config.batch_size, model_parallel_size=1)
    records = load_records(config.dataset_path, config.dataset_name, config.split, ChatFormat(base.tokenizer))
    records = records[: config.records] if config.records else records
    if meta is not None and meta["records"] != len(records):
        raise InputError(f"--out {config.out}: its runs were measured on {meta['records']} records, this one on "
                         f"{len(records)}")
    for label, adapter, budget in runs:
        rows[label] = measure(config, base, adapter, records, budget)
        print(label, json.dumps({k: v for k, v in rows[label].items() if k not in ("sums", "answers")}))
    meta = {"commands": (meta["commands"] if meta else []) + [command], "base_model": config.llama_ckpt_dir,
            "dataset": config.dataset_name, "split": config.split, "records": len(records),
            "max_gen_len": config.max_gen_len, "reference": config.reference, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "code_version": code_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    table = markdown(meta, rows)
    print(table)
    atomic_write_text(json.dumps({"meta": meta, "runs": rows}, indent=1, ensure_ascii=False) + "\n", config.out)
    atomic_write_text(table, config.out[: -len(".json")] + ".md")


if __name__ == "__main__":
    run_cli(main, FidelityConfig.parse(description=__doc__), "python -m benchmarks.fidelity " + " ".join(sys.argv[1:]))
