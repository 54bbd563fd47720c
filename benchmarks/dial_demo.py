"""One adapter, any budget: the compute dial measured against adapters trained per budget.

    python -m benchmarks.dial_demo --dial_adapter runs/dial \\
        --separate "['0.55=runs/sep-0.55', '0.85=runs/sep-0.85']"
    python -m benchmarks.dial_demo --llama_ckpt_dir models/smollm2 --dataset_name smol \\
        --dial_adapter output/smollm2-dial --baselines "" --out benchmarks/results/dial_smollm2.json \\
        --png docs/dial_smollm2.png

Methods, each at every --budgets value: the budget-conditioned adapter (--dial_adapter) through its
calibrated dial, and through its routers' budget input alone (the dial file ignored); the quantile
dial on an ordinary D-LLM adapter (--ordinary_adapter, default the one shipped for the base). Beside
them, once each: adapters trained separately at one target (--separate TARGET=PATH, run here), and
the rows of a benchmarks/baselines.py table (--baselines: its seed-0 D-LLM, static pruning and
dense LoRA runs, numbers as that file has them). Each adapter needs its dial beside it
(python -m tools.calibrate_dial).

Per configuration, on the dataset's test split (never calibrated on): the share of blocks executed
(the budget's own measure: real tokens past the reserved initial ones, as in training's validation)
and its gap to the budget; evaluate.py's perplexity rows (held-out CE, top-1 agreement, FLOPs and
KV ratios from the routing that happened); and generation speed: greedy generation of up to
--max_gen_len tokens for each of the first --n_generate test prompts alone (batch 1), best of
--repeats, the dense base timed in turn with it (the same load for both). With the method "mixed", the
same prompts served as one batch, each at its own budget through the routers' input, timed against
the dense base and against every row at the budgets' mean. Writes --out (JSON), the same path with
.md, and --png (quality against FLOPs ratio, one line per method).
"""
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import presets
from benchmarks import command as run_command
from benchmarks.baselines import baseline_label
from dllm.checkpoints import adapters
from dllm import assets
from dllm.atomic_io import atomic_write_text
from dllm.config import Settings, setting
from dllm.dial import records_loader
from dllm.errors import InputError, run_cli
from dllm.evaluate import Evaluator, task_records
from dllm.chat import ChatFormat
from dllm.generation import Llama
from dllm.plots import quality_flops_figure, save_png
from dllm.timing import timed
from dllm.training.validation import validate

BASELINE_ROWS = ("dllm", "static_ppl", "dense")  # the baselines table's methods shown beside the dial


@dataclass
class DialBenchConfig(Settings):
    llama_ckpt_dir: str = setting(presets.DEMO_BASE, "base model directory (Meta or Hugging Face layout)")
    dataset_path: str = setting(os.path.join(ROOT, "datasets"), "directory with one NAME/{train,test,prompt}.json per "
                                "dataset")
    dataset_name: str = setting("demo", "the dataset whose test split is measured")
    budgets: List[float] = setting([0.4, 0.55, 0.7, 0.85, 1.0], "the budgets every dial is measured at", low=0.0,
                                   high=1.0, low_open=True)
    dial_adapter: Optional[str] = setting(None, "a budget-conditioned D-LLM adapter (finetuning.sh "
                                          "DYNAMIC_BUDGET_RANGE) with its dial calibrated")
    ordinary_adapter: Optional[str] = setting(None, "an ordinary D-LLM adapter with its dial calibrated (default: the "
                                              "one shipped for the base)")
    separate: List[str] = setting([], "adapters trained at one target, TARGET=PATH each, e.g. \"['0.55=runs/sep-0.55']\"")
    baselines: str = setting(os.path.join(ROOT, "benchmarks", "results", "baselines_demo.json"),
                             "a benchmarks/baselines.py JSON whose seed-0 dllm, static_ppl and dense rows are shown "
                             "(empty: none)")
    methods: List[str] = setting(list(("dial", "router_input", "quantile", "separate", "baselines")),
                                 "what this run measures (separate processes may split them, --parts joins them); "
                                 "mixed: the dial adapter serving the timing prompts as one batch, each at its own budget",
                                 choices=("dial", "router_input", "quantile", "separate", "baselines", "mixed"))
    parts: List[str] = setting([], "join the rows of these earlier runs' JSON files instead of measuring")
    max_seq_len: int = setting(512, "longest sequence in tokens", low=2)
    batch_size: int = setting(8, "records per forward pass", low=1)
    n_generate: int = setting(8, "test prompts generated for, one at a time, for the timing", low=1)
    max_gen_len: int = setting(32, "tokens generated per prompt for the timing", low=1)
    repeats: int = setting(3, "timed generations per configuration; the best is kept", low=1)
    out: str = setting(os.path.join(ROOT, "benchmarks", "results", "dial_demo.json"), "the JSON written (and .md)")
    png: str = setting(os.path.join(ROOT, "docs", "dial_demo.png"), "the quality against FLOPs picture")

    def __post_init__(self):
        super().__post_init__()
        for item in self.separate:
            target, sep, path = item.partition("=")
            try:
                float(target)
            except ValueError:
                sep = ""
            if not sep or not path:
                raise InputError(f"--separate {item!r}: expected TARGET=PATH, e.g. 0.55=runs/sep-0.55")


class Bench:
    def __init__(self, config: DialBenchConfig):
        self.config = config
        self.dense = self.build(None)
        tokenizer = self.dense.tokenizer
        records = task_records(config.dataset_path, config.dataset_name, 0, ChatFormat(tokenizer))
        self.records = records
        self.prompts = [tokenizer.encode(r.prompt, bos=True, eos=False) for r in records[: config.n_generate]]
        self.loader = records_loader(records, tokenizer, config.max_seq_len, config.batch_size)

    def build(self, adapter: Optional[str], budget: Optional[float] = None) -> Llama:
        c = self.config
        return Llama.build(c.llama_ckpt_dir, adapter, max_seq_len=c.max_seq_len,
                           max_batch_size=max(c.batch_size, c.n_generate), model_parallel_size=1,
                           dense=adapter is None, budget=budget)

    def greedy(self, generator: Llama, prompts, budget=None):
        """A greedy generation of the timing length, to be timed."""
        return lambda: generator.generate(prompts, self.config.max_gen_len, temperature=0.0, actprobs=False,
                                          budget=budget)

    @torch.inference_mode()
    def generation_speedup(self, generator: Llama):
        """(tokens/s, x dense) of greedy generation for each timing prompt alone (batch 1, a request
        as served): each prompt's best of --repeats, the configuration and the dense base timed in
        turn so that both see the same load."""
        seconds, generated = {"dense": 0.0, "run": 0.0}, {"dense": 0, "run": 0}
        for prompt in self.prompts:
            runs = {"dense": self.greedy(self.dense, [prompt]), "run": self.greedy(generator, [prompt])}
            for name, (took, generation) in best_in_turn(runs, self.config.repeats, generator.device).items():
                seconds[name] += took
                generated[name] += len(generation.tokens[0])
        tok_s = generated["run"] / seconds["run"]
        return tok_s, tok_s / (generated["dense"] / seconds["dense"])

    def measure(self, generator: Llama, method: str, budget: Optional[float], adapter: str) -> dict:
        c = self.config
        share = validate(generator.model, self.loader, generator.device)["val_act_ratio"]
        evaluator = Evaluator(generator, c.batch_size, c.max_gen_len, 0, c.dataset_path)
        ppl, top1 = evaluator.perplexity(c.dataset_name, self.records)
        tok_s, x_dense = self.generation_speedup(generator)
        row = {"method": method, "budget": budget, "adapter": os.path.relpath(adapters.adapter_file(adapter), ROOT),
               "exec_share": share, "share_gap": None if budget is None else share - budget,
               "flops_ratio": ppl.flops_ratio, "kv_ratio": ppl.kv_ratio, "val_ce": math.log(ppl.value),
               "val_ppl": ppl.value, "top1_agreement": top1.value, "gen_tok_s": tok_s, "gen_x_dense": x_dense}
        print(f"{method:<28} budget {budget if budget is not None else '-':<5} share {share:.3f} FLOPs "
              f"{row['flops_ratio']:.3f} CE {row['val_ce']:.3f} top-1 {row['top1_agreement']:.3f} "
              f"gen x{row['gen_x_dense']:.2f}", flush=True)
        return row

    def mixed_batch_row(self, adapter: str) -> dict:
        """The timing prompts as one batch, each at its own budget (--budgets in turn), through the
        routers' budget input: the batch's generated tokens/s against the dense base and against
        every row at the budgets' mean, on the same batch, timed in turn (best of --repeats); and each
        row's executed share (prompt and answer) beside its budget."""
        c = self.config
        budgets = [c.budgets[i % len(c.budgets)] for i in range(len(self.prompts))]
        mean = sum(budgets) / len(budgets)
        generator = self.build(adapter)
        generator.model.routing.dial = None
        runs = {"dense": self.greedy(self.dense, self.prompts), "mixed": self.greedy(generator, self.prompts, budgets),
                "uniform": self.greedy(generator, self.prompts, mean)}
        best = best_in_turn(runs, c.repeats, generator.device)
        tok_s = {name: sum(map(len, g.tokens)) / took for name, (took, g) in best.items()}
        shares = [best["mixed"][1].routing.exec_share(i) for i in range(len(budgets))]
        row = {"method": "dial adapter, budgets mixed in one batch", "budget": None, "budgets": budgets,
               "adapter": os.path.relpath(adapters.adapter_file(adapter), ROOT), "row_exec_shares": shares,
               "exec_share": sum(shares) / len(shares), "share_gap": None, "batch": len(budgets),
               "uniform_budget": mean, "gen_tok_s": tok_s["mixed"], "gen_x_dense": tok_s["mixed"] / tok_s["dense"],
               "uniform_x_dense": tok_s["uniform"] / tok_s["dense"]}
        print(f"{row['method']}: batch {len(budgets)}, gen x{row['gen_x_dense']:.2f} dense, every row at {mean:.3f}: "
              f"x{row['uniform_x_dense']:.2f}", flush=True)
        return row

    def dial_rows(self, adapter: str, method: str, router_input_only: bool = False) -> List[dict]:
        rows = []
        for budget in self.config.budgets:
            generator = self.build(adapter, budget)
            if router_input_only:
                generator.model.routing.dial = None
            rows.append(self.measure(generator, method, budget, adapter))
        return rows


def best_in_turn(runs: dict, repeats: int, device) -> dict:
    """{name: (seconds, result)}: each run's fastest of `repeats`, the runs timed in turn in every
    repeat so that all see the same load."""
    best = {}
    for _ in range(repeats):
        for name, run in runs.items():
            took, result = timed(run, device)
            if took < best.get(name, (math.inf,))[0]:
                best[name] = took, result
    return best


def baseline_rows(path: str) -> List[dict]:
    with open(path) as f:
        rows = json.load(f)
    return [dict(r, method=f"{r['method']} (baselines)", budget=None, exec_share=None, share_gap=None)
            for r in rows if r["method"] in BASELINE_ROWS and r["seed"] == 0]


def plot_rows(rows: List[dict], dataset: str):
    """Each method's rows as evaluate.py rows (ppl and top-1 agreement) for dllm.plots."""
    runs = {}
    for r in rows:
        if "val_ppl" not in r:  # a timing only (the mixed batch)
            continue
        runs.setdefault(r["method"], []).extend([
            {"dataset": dataset, "metric": "ppl", "value": r["val_ppl"], "flops_ratio": r["flops_ratio"]},
            {"dataset": dataset, "metric": "top-1 agreement", "value": r["top1_agreement"], "flops_ratio": r["flops_ratio"]}])
    return list(runs.items())


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: List[dict], meta: dict) -> str:
    lines = [f"### The compute dial on {meta['model']}, {meta['dataset']} test split", "",
             *[f"`{command}`" for command in meta["commands"]], "", f"Machine: {meta['machine']}", "",
             "| method | budget | target | exec share | share - budget | FLOPs ratio | KV ratio | val CE | val ppl | top-1 "
             "| gen tok/s | gen x dense |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {cell(r['budget'], 'g')} | {cell(r.get('target'), 'g')} | {cell(r['exec_share'], '.3f')} "
            f"| {cell(r['share_gap'], '+.3f')} | {cell(r.get('flops_ratio'), '.3f')} | {cell(r.get('kv_ratio'), '.3f')} "
            f"| {cell(r.get('val_ce'), '.3f')} | {cell(r.get('val_ppl'), '.1f')} | {cell(r.get('top1_agreement'), '.3f')} "
            f"| {cell(r.get('gen_tok_s'), '.1f')} | {cell(r.get('gen_x_dense'), '.2f')} |")
        if "budgets" in r:
            lines.append(f"| (every row at {r['uniform_budget']:.3f}) | | | | | | | | | | | {r['uniform_x_dense']:.2f} |")
    for r in rows:
        if "budgets" in r:
            lines += ["", f"Mixed batch of {r['batch']}: budget and share executed per row: " + ", ".join(
                f"{b:g} / {s:.3f}" for b, s in zip(r["budgets"], r["row_exec_shares"]))]
    return "\n".join(lines) + "\n"


def measure_rows(config: DialBenchConfig) -> List[dict]:
    bench, rows, methods = Bench(config), [], set(config.methods)
    if config.dial_adapter and "dial" in methods:
        rows += bench.dial_rows(config.dial_adapter, "dial adapter (calibrated dial)")
    if config.dial_adapter and "router_input" in methods:
        rows += bench.dial_rows(config.dial_adapter, "dial adapter (router input only)", router_input_only=True)
    if config.dial_adapter and "mixed" in methods:
        rows.append(bench.mixed_batch_row(config.dial_adapter))
    ordinary = config.ordinary_adapter or assets.default_adapter(config.llama_ckpt_dir,
                                                                          presets.CHECKOUT_DEFAULTS["shipped_adapters"])
    if ordinary and "quantile" in methods:
        rows += bench.dial_rows(ordinary, "quantile dial (ordinary D-LLM)")
    for item in config.separate if "separate" in methods else []:
        target, _, path = item.partition("=")
        row = bench.measure(bench.build(path), "D-LLM trained at the target", None, path)
        rows.append(dict(row, target=float(target)))
    if config.baselines and "baselines" in methods:
        rows += baseline_rows(config.baselines)
    return rows


def joined_rows(parts: List[str]):
    """The rows, commands and machine notes of earlier runs, in the order given."""
    rows, commands, machines = [], [], []
    for path in parts:
        with open(path) as f:
            data = json.load(f)
        rows += data["rows"]
        commands += data["meta"]["commands"]
        machines.append(data["meta"]["machine"])
    return rows, commands, machines


def main(config: DialBenchConfig):
    command = run_command()
    machine = (f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the end, this run included), "
               f"{torch.get_num_threads()} torch threads; speeds are ratios to the dense base timed in turn with "
               f"each configuration")
    if config.parts:
        rows, commands, machines = joined_rows(config.parts)
        commands.append(command)
        machine = " | ".join(machines)
    else:
        rows, commands = measure_rows(config), [command]
    meta = {"model": config.llama_ckpt_dir, "dataset": config.dataset_name, "settings": asdict(config),
            "commands": commands, "machine": machine,
            "baselines_methods": {m: baseline_label(m) for m in BASELINE_ROWS}}
    atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", config.out)
    table = markdown(rows, meta)
    atomic_write_text(table, os.path.splitext(config.out)[0] + ".md")
    print(table)
    written = f"{config.out} and {os.path.splitext(config.out)[0]}.md"
    quality = plot_rows(rows, config.dataset_name)
    if quality:
        save_png(quality_flops_figure(quality), config.png)
        written += f" and {config.png}"
    print(f"wrote {written}" + ("" if quality else " (timings only: no quality to plot)"))


if __name__ == "__main__":
    run_cli(lambda: main(DialBenchConfig.parse(description=__doc__)))
