"""D-LLM against its baselines at matched compute, from one harness.

    python -m benchmarks.baselines        # the demo: targets 0.4 0.5 0.7, seeds 0 1 2 at 0.5 for dllm and static
    python -m benchmarks.baselines --recipe "EPOCHS=1" --targets 0.5 --spread_seeds 0 --out /tmp/b.json   # shorter

Every method gets the same fine-tune: finetuning.sh with its defaults and the variables --recipe
sets (data, steps, LoRA rank, learning rates, ...); this script sets only ROUTING,
DYNAMIC_ACTIVE_TARGET, SEED, STATIC_SKIP_LAYERS, the paths and a free MASTER_PORT. Each fine-tune,
ranking and evaluation runs with an explicit environment (child_env), so nothing else of the
caller's shell reaches it. Then evaluate.py on the dataset's test
split (held-out CE, top-1 agreement, FLOPs and KV ratios from the routing that happened), prefill
and decode timed against the dense base model in this process (best of --repeats, interleaved, real
text), and the per-token adaptivity: blocks executed per token, its mean and its std across the
tokens of one sequence (averaged over sequences).

Methods: dense (LoRA only), dllm, mod (capacity from the target), static_ppl, static_taylor and static_kl
(tools/rank_blocks.py ranks the blocks once; round((1 - target) * n_layers) least important
pruned), early_exit (threshold fit to the target after training). The target is the share of all
(token, block) pairs executed, for every method. A run whose row.json exists is not repeated
(--retime times its speed-ups again); one stopped mid-fine-tune continues from its last checkpoint
(put SAVE_STEPS in --recipe so that there is one).
Writes --out (a JSON list of rows) and the same path with .md (the tables). With
`--fidelity_splits validation,test` every run is also measured against the base by
benchmarks/fidelity.py (KL, answer agreement, compute in generation) on each split, as
`METHOD:TARGET-sSEED` in OUT_fidelity_SPLIT.json.
"""
import argparse
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import presets
from benchmarks import command as run_command
from dllm.atomic_io import atomic_write_text
from dllm.chat import ChatFormat
from dllm.data import load_records
from dllm.errors import InputError, run_cli
from dllm.evaluate import read_results
from dllm.generation import Llama
from dllm.core.routing import POLICIES
from dllm.timing import timed
from tools.rank_blocks import blocks_to_skip



# the methods the baselines compare (benchmarks/baselines.py): a policy and, for static pruning, the
# block ranking it prunes by (tools/rank_blocks.py)
BASELINE_METHODS = {"dense": ("dense", None), "dllm": ("dllm", None), "mod": ("mod", None),
                    "static_ppl": ("static", "ppl"), "static_taylor": ("static", "taylor"), "static_kl": ("static", "kl"),
                    "early_exit": ("early_exit", None)}
# what a sweep runs unless --methods says otherwise: the paper's comparison (static_kl is ours, on request)
DEFAULT_METHODS = tuple(method for method in BASELINE_METHODS if method != "static_kl")


def baseline_label(method: str) -> str:
    policy, criterion = BASELINE_METHODS[method]
    return POLICIES[policy].label + (f" ({criterion})" if criterion else "")

def floats(text: str):
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str):
    return [int(x) for x in text.split(",") if x.strip()]


def plan(args):
    """(method, target, seed) of every run; dense has no target (1.0: every block)."""
    runs = []
    for method in args.methods.split(","):
        if method not in BASELINE_METHODS:
            raise InputError(f"unknown method {method!r}; known: {', '.join(BASELINE_METHODS)}")
        for target in [1.0] if method == "dense" else floats(args.targets):
            spread = method in args.spread_methods.split(",") and math.isclose(target, args.spread_target)
            runs += [(method, target, seed) for seed in (ints(args.spread_seeds) if spread else ints(args.seeds))]
    for run in filter(None, args.extra_runs.split(",")):
        method, _, rest = run.partition(":")
        try:
            target, *seed = rest.split(":")
            if method not in BASELINE_METHODS or len(seed) > 1:
                raise ValueError
            runs.append((method, float(target), int(seed[0]) if seed else 0))
        except ValueError:
            raise InputError(f"--extra_runs {run!r}: expected METHOD:TARGET[:SEED], METHOD one of "
                             f"{', '.join(BASELINE_METHODS)}") from None
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what a child process keeps of this one's environment: where programs are, the home directory,
# the thread counts and the visible GPUs; PYTHONPATH leads with this checkout
PASSED_ON = ("PATH", "HOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def child_env(**variables) -> Dict[str, str]:
    """The environment of a fine-tune, ranking or evaluation: PASSED_ON, this checkout first on
    PYTHONPATH, then `variables`; a stray MODEL_PATH, LR or ROUTING in the caller's shell never
    reaches a run."""
    env = {name: os.environ[name] for name in PASSED_ON if name in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return dict(env, **variables)


def run(command, env: Dict[str, str]):
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def ranking(args) -> dict:
    """tools/rank_blocks.py once per sweep, with the fine-tune's sequence length and start layer."""
    path = os.path.join(args.work_dir, "ranking.json")
    if not os.path.isfile(path):
        command = [sys.executable, "-m", "tools.rank_blocks", "--llama_ckpt_dir", args.llama_ckpt_dir,
                   "--dataset_path", args.dataset_path, "--dataset_name", args.dataset_name, "--out", path]
        for variable, flag in (("MAX_SEQ_LEN", "--max_seq_len"), ("DYNAMIC_START_LAYER", "--start_layer"),
                               ("TOKENIZER_PATH", "--tokenizer_path")):
            if args.recipe.get(variable):
                command += [flag, args.recipe[variable]]
        run(command, child_env())
    with open(path) as f:
        return json.load(f)


def fine_tune(args, method, target, seed, out_dir) -> dict:
    routing, criterion = BASELINE_METHODS[method]
    env = child_env(**args.recipe, ROUTING=routing, SEED=str(seed), MODEL_PATH=args.llama_ckpt_dir,
                    DATASET_PATH=args.dataset_path, DATASET_NAME=args.dataset_name, OUTPUT_PATH=out_dir,
                    MASTER_PORT=str(free_port()))
    extra = {}
    if method != "dense":
        env["DYNAMIC_ACTIVE_TARGET"] = str(target)
    if criterion:
        extra["static_skip_layers"] = blocks_to_skip(ranking(args), criterion, target)
        env["STATIC_SKIP_LAYERS"] = " ".join(map(str, extra["static_skip_layers"]))
    if os.path.isfile(os.path.join(out_dir, "checkpoint-last.pth")):
        env["RESUME"] = out_dir  # a sweep stopped mid-run continues it (a finished run has nothing left to do)
    elif os.path.isdir(out_dir):
        env["OVERWRITE"] = "1"  # stopped before its first checkpoint: nothing to keep
    run(["bash", "finetuning.sh"], env)
    return extra


def evaluate(args, adapter, out_dir):
    """evaluate.py on the test split, into out_dir."""
    command = [sys.executable, "evaluate.py", "--llama_ckpt_dir", args.llama_ckpt_dir, "--dynamic_ckpt_dir", adapter,
               "--dataset_path", args.dataset_path, "--datasets", args.dataset_name, "--output_dir", out_dir, "--overwrite"]
    if args.recipe.get("TOKENIZER_PATH"):
        command += ["--tokenizer_path", args.recipe["TOKENIZER_PATH"]]
    run(command, child_env())


def quality(eval_dir) -> dict:
    """A row's fields from evaluate.py's results: the FLOPs and KV ratios of the routing that
    happened, held-out CE and perplexity, top-1 agreement with the answers (None where the dataset's
    metrics lack it)."""
    results = {r["metric"]: r for r in read_results(eval_dir)}
    ppl, top1 = results["ppl"], results.get("top-1 agreement")
    return {"flops_ratio": ppl["flops_ratio"], "kv_ratio": ppl["kv_ratio"], "val_ce": math.log(ppl["value"]),
            "val_ppl": ppl["value"], "top1_agreement": top1["value"] if top1 else None}


def build(args, adapter=None) -> Llama:
    return Llama.build(args.llama_ckpt_dir, adapter, tokenizer_path=args.recipe.get("TOKENIZER_PATH") or None,
                       max_seq_len=max(args.prefill_len, args.decode_prompt_len + args.decode_steps),
                       max_batch_size=1, model_parallel_size=1, dense=adapter is None)


def test_sequences(generator: Llama, args) -> List[List[int]]:
    """Every test record's prompt and response as tokens (in the model's chat template where the
    dataset asks for it); read once, shared by the timings and the per-token counts of every run."""
    records = load_records(args.dataset_path, args.dataset_name, "test", ChatFormat(generator.tokenizer))
    return [generator.tokenizer.encode(r.prompt + r.response, bos=True, eos=True) for r in records]


def real_text(sequences: List[List[int]], args, device) -> torch.Tensor:
    """[1, n] tokens of the test sequences, one after another."""
    n = max(args.prefill_len, args.decode_prompt_len + args.decode_steps)
    ids = [token for sequence in sequences for token in sequence]
    if len(ids) < n:
        raise InputError(f"{args.dataset_name}: the test split has fewer than {n} tokens to time on")
    return torch.tensor([ids[:n]], device=device)


@torch.inference_mode()
def seconds(generator: Llama, text: torch.Tensor, args):
    """(prefill of --prefill_len tokens, --decode_steps single-token steps after --decode_prompt_len)."""
    model = generator.model
    prefill, _ = timed(lambda: model(text[:, : args.prefill_len], 0, model.new_cache(1)), generator.device)
    cache, p = model.new_cache(1), args.decode_prompt_len
    model(text[:, :p], 0, cache)

    def decode():
        for i in range(p, p + args.decode_steps):
            model(text[:, i : i + 1], i, cache)

    return prefill, timed(decode, generator.device)[0]


def speedups(dense: Llama, generator: Llama, text, args):
    best = {"dense": [math.inf, math.inf], "run": [math.inf, math.inf]}
    for _ in range(args.repeats):
        for name, g in (("dense", dense), ("run", generator)):
            best[name] = [min(a, b) for a, b in zip(best[name], seconds(g, text, args))]
    return best["dense"][0] / best["run"][0], best["dense"][1] / best["run"][1]


@torch.inference_mode()
def adaptivity(generator: Llama, sequences: List[List[int]], args):
    """Blocks executed per token over the first --adaptivity_records test records (teacher forced):
    the mean, and the std across one sequence's tokens averaged over sequences."""
    means, stds = [], []
    for ids in sequences[: args.adaptivity_records]:
        _, activation = generator.model(torch.tensor([ids[: args.prefill_len]], device=generator.device))
        blocks = activation[0].gt(0).sum(-1).float().tolist()
        means.append(statistics.fmean(blocks))
        stds.append(statistics.pstdev(blocks))
    return statistics.fmean(means), statistics.fmean(stds)


def run_dir(args, method, target, seed) -> str:
    return os.path.join(args.work_dir, f"{method}-{target:g}-s{seed}")


def finished_rows(args, runs) -> list:
    """The rows of the planned runs that are done (their row.json), in plan order: the results file
    keeps a finished run even while an earlier one is still running, or when the sweep is stopped."""
    rows = []
    for run in runs:
        path = os.path.join(run_dir(args, *run), "row.json")
        if os.path.isfile(path):
            with open(path) as f:
                rows.append(json.load(f))
    return rows


def measure(args, dense, sequences, text, method, target, seed) -> dict:
    out_dir = run_dir(args, method, target, seed)
    row_path, eval_dir = os.path.join(out_dir, "row.json"), os.path.join(out_dir, "eval")
    if os.path.isfile(row_path):
        with open(row_path) as f:
            row = json.load(f)
        row.update(quality(eval_dir))
        if args.retime:
            generator = build(args, os.path.join(ROOT, row["adapter"]))
            row["prefill_speedup"], row["decode_speedup"] = speedups(dense, generator, text, args)
    else:
        extra = fine_tune(args, method, target, seed, out_dir)
        adapter = os.path.join(out_dir, "checkpoint-last.pth")
        evaluate(args, adapter, eval_dir)
        generator = build(args, adapter)
        prefill, decode = speedups(dense, generator, text, args)
        blocks_mean, blocks_std = adaptivity(generator, sequences, args)
        row = {"method": method, "target": target, "seed": seed, **quality(eval_dir),
               "prefill_speedup": prefill, "decode_speedup": decode, "blocks_per_token": blocks_mean,
               "blocks_std_in_sequence": blocks_std, "adapter": os.path.relpath(adapter, ROOT), **extra}
    atomic_write_text(json.dumps(row, indent=2) + "\n", row_path)
    return row


def static_reference(args) -> str:
    """The static pruning the fidelity tables set every run against: the sweep's first static method."""
    static = [method for method, _, _ in plan(args) if method.startswith("static")]
    return static[0] if static else "static_ppl"


def fidelity(args, row):
    """The run measured against the base on each --fidelity_splits split (once: a label its file holds is kept)."""
    from benchmarks.fidelity import FidelityConfig, main as measure_fidelity

    label = f"{row['method']}:{row['target']:g}-s{row['seed']}"
    for split in filter(None, args.fidelity_splits.split(",")):
        out = f"{os.path.splitext(args.out)[0]}_fidelity_{split}.json"
        if os.path.isfile(out):
            with open(out) as f:
                if label in json.load(f)["runs"]:
                    continue
        config = FidelityConfig(llama_ckpt_dir=args.llama_ckpt_dir, runs=f"{label}={os.path.join(ROOT, row['adapter'])}",
                                dataset_path=args.dataset_path, dataset_name=args.dataset_name, split=split,
                                records=args.fidelity_records, reference=static_reference(args), out=out, append=True)
        measure_fidelity(config, f"python -m benchmarks.fidelity --llama_ckpt_dir {args.llama_ckpt_dir} --dataset_name "
                                 f"{args.dataset_name} --split {split} --records {args.fidelity_records} "
                                 f"--reference {config.reference} --runs {config.runs} --out {out} --append")


def top1_cell(row) -> str:
    return "-" if row.get("top1_agreement") is None else f"{row['top1_agreement']:.3f}"


def markdown(rows, args) -> str:
    lines = [f"### Baselines on {args.llama_ckpt_dir}, {args.dataset_name} test split", "", f"`{run_command()}`", "",
             "| method | target | seed | FLOPs ratio | KV ratio | val CE | val ppl | top-1 | prefill x | decode x "
             "| blocks/token | std in sequence |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['target']:g} | {r['seed']} | {r['flops_ratio']:.3f} | {r['kv_ratio']:.3f} "
                     f"| {r['val_ce']:.3f} | {r['val_ppl']:.1f} | {top1_cell(r)} | {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} "
                     f"| {r['blocks_per_token']:.2f} | {r['blocks_std_in_sequence']:.2f} |")
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    spread = [(key, group) for key, group in groups.items() if len(group) > 1]
    if spread:
        lines += ["", "| method | target | seeds | FLOPs ratio | val CE (mean ± std) |", "|---|---|---|---|---|"]
        for (method, target), group in spread:
            ce = [r["val_ce"] for r in group]
            flops = statistics.fmean(r["flops_ratio"] for r in group)
            lines.append(f"| {method} | {target:g} | {len(group)} | {flops:.3f} | "
                         f"{statistics.fmean(ce):.3f} ± {statistics.stdev(ce):.3f} |")
    return "\n".join(lines) + "\n"


# finetuning.sh's variables that shape the recipe, the ones --recipe takes
FINETUNING_VARIABLES = {"EPOCHS", "BATCH_SIZE", "LORA_RANK", "MAX_SEQ_LEN", "BLR", "LR", "ROUTER_LR", "WARMUP_EPOCHS",
                        "LAMBDA_ACTIVE", "DYNAMIC_START_LAYER", "DYNAMIC_ROUTER_HDIM", "DYNAMIC_RESERVE_INITIALS",
                        "ACCUM_ITER", "NPROC", "TOKENIZER_PATH", "ROUTER_BIAS", "DISTILL_TEACHER",
                        "DISTILL_WEIGHT", "RATE_LOSS_UNIT", "ROW_RELATIVE_LOSS", "SAVE_STEPS", "EXTRA_ARGS"}


def main(args):
    for key in ("llama_ckpt_dir", "dataset_path", "work_dir", "out"):  # finetuning.sh and evaluate.py run in ROOT
        setattr(args, key, os.path.abspath(getattr(args, key)))
    os.makedirs(args.work_dir, exist_ok=True)
    dense = build(args)
    sequences = test_sequences(dense, args)
    text = real_text(sequences, args, dense.device)
    runs, rows = plan(args), []
    for method, target, seed in runs:
        fidelity(args, measure(args, dense, sequences, text, method, target, seed))
        rows = finished_rows(args, runs)
        atomic_write_text(json.dumps(rows, indent=2) + "\n", args.out)
        atomic_write_text(markdown(rows, args), os.path.splitext(args.out)[0] + ".md")
    print(markdown(rows, args))


def parse_recipe(text: str) -> Dict[str, str]:
    """--recipe "EPOCHS=1 ROUTER_BIAS='1.0 1.0' ROUTER_LR=none": finetuning.sh variables by name."""
    recipe = {}
    for item in shlex.split(text):
        name, equals, value = item.partition("=")
        if not equals or name not in FINETUNING_VARIABLES:
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=VALUE, NAME one of finetuning.sh's "
                                             f"{', '.join(sorted(FINETUNING_VARIABLES))}")
        recipe[name] = value
    return recipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama_ckpt_dir", default=os.path.relpath(presets.DEMO_BASE), help="base model (MODEL_PATH)")
    p.add_argument("--recipe", type=parse_recipe, default="", help="finetuning.sh variables for every fine-tune, "
                   "e.g. \"EPOCHS=1 LR=1e-3\" (the others keep finetuning.sh's defaults; the environment is not read)")
    p.add_argument("--dataset_path", default="datasets")
    p.add_argument("--dataset_name", default="demo", help="fine-tuned on its train split, evaluated on its test split")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(BASELINE_METHODS)}")
    p.add_argument("--targets", default="0.4,0.5,0.7", help="shares of all blocks executed, one run each")
    p.add_argument("--seeds", default="0", help="seeds of every run")
    p.add_argument("--spread_target", type=float, default=0.5, help="the target where --spread_methods run more seeds")
    p.add_argument("--spread_seeds", default="0,1,2")
    p.add_argument("--spread_methods", default="dllm,static_ppl,static_taylor")
    p.add_argument("--extra_runs", default="", help="more runs after those, e.g. static_ppl:0.54,dllm:0.6:1 "
                   "(METHOD:TARGET[:SEED], seed 0 when left out)")
    p.add_argument("--work_dir", default=os.path.join("runs", "baselines-demo"), help="one directory per run")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "baselines_demo.json"))
    p.add_argument("--prefill_len", type=int, default=256, help="tokens of the timed prefill (batch 1)")
    p.add_argument("--decode_prompt_len", type=int, default=64)
    p.add_argument("--decode_steps", type=int, default=32, help="single-token steps timed (batch 1)")
    p.add_argument("--repeats", type=int, default=3, help="timings per run, interleaved with dense; the best kept")
    p.add_argument("--retime", action="store_true", help="time the prefill and decode of runs already done again "
                   "(their row.json keeps everything else): for one quiet pass after sweeps that shared the cores")
    p.add_argument("--adaptivity_records", type=int, default=32, help="test records the per-token counts come from")
    p.add_argument("--fidelity_splits", default="", help="also measure every run against the base on these splits "
                   "(validation,test): benchmarks/fidelity.py into OUT_fidelity_SPLIT.json")
    p.add_argument("--fidelity_records", type=int, default=0, help="the first N records of each of those splits (0: all)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
