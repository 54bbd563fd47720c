"""D-LLM's attempts to beat static pruning on the demo, from one command.

    python -m benchmarks.dllm_attempts    # runs each attempt's missing rows under runs/dllm-attempts

Each attempt is a `benchmarks/baselines.py` run (the same harness: fine-tune, evaluate.py on the
test split, timings, blocks per token) with some finetuning.sh variables changed from the sweep's
recipe (EPOCHS=1 WARMUP_EPOCHS=0.2, seed 0, target 0.5; three epochs where the attempt says so).
The distillation teacher is the attempt `dense` (LoRA only, the same recipe), so it runs first.
D-LLM with the reference's per-token rate loss at three epochs is the quick start itself
(`bash finetuning.sh`, README "Fine-tuning the demo"), so it is not repeated here.
Writes benchmarks/results/dllm_attempts_demo.json (baselines.py's rows plus `attempt` and
`variables`) and .md, where each one-epoch D-LLM row is set against static pruning (perplexity
ranking) at the same FLOPs ratio, interpolated along the sweep's one-epoch curve
(baselines_demo.json), or along static pruning distilled from the same teacher for distilled rows.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dllm.atomic_io import atomic_write_text
from dllm.errors import run_cli

ONE_EPOCH = {"EPOCHS": "1", "WARMUP_EPOCHS": "0.2"}
TEACHER = os.path.join("runs", "dllm-attempts", "dense", "dense-1-s0")


@dataclass
class Attempt:
    name: str
    why: str
    variables: Dict[str, str] = field(default_factory=dict)
    methods: str = "dllm"
    targets: str = "0.5"
    spread_seeds: str = ""  # seeds at target 0.5 (default: seed 0 only)
    extra_runs: str = ""  # baselines.py --extra_runs
    epochs: int = 1

    def finetuning_variables(self) -> Dict[str, str]:
        """What the attempt sets in finetuning.sh: one epoch unless it says three, and its own variables."""
        return dict(ONE_EPOCH if self.epochs == 1 else {}, **self.variables)


ATTEMPTS = [
    Attempt("dense", "the distillation teacher: LoRA only, the same recipe", methods="dense"),
    Attempt("router_lr_reference", "routers at the LoRA learning rate (the reference; 5.6e-4 here)", {"ROUTER_LR": "none"}),
    Attempt("router_lr_5e-3", "a router learning rate between that and the demo's 2e-2", {"ROUTER_LR": "5e-3"}),
    Attempt("lambda_2", "a weaker rate loss", {"LAMBDA_ACTIVE": "2"}),
    Attempt("lambda_10", "a stronger rate loss", {"LAMBDA_ACTIVE": "10"}),
    Attempt("bias_neutral", "routers that start undecided", {"ROUTER_BIAS": "1.0 1.0"}),
    Attempt("reserve_0", "no reserved initial tokens", {"DYNAMIC_RESERVE_INITIALS": "0"}),
    Attempt("distill_dense", "distillation from the dense LoRA run, for D-LLM and for static pruning",
            {"DISTILL_TEACHER": TEACHER}, methods="dllm,static_ppl", extra_runs="static_ppl:0.7"),
    Attempt("distill_base", "distillation from the base model", {"DISTILL_TEACHER": "base"}),
    Attempt("rate_per_sequence", "the rate loss on each sequence's mean: its tokens free to differ",
            {"RATE_LOSS_UNIT": "sequence"}, targets="0.45,0.5", spread_seeds="0,1,2"),
    Attempt("rate_per_sequence_distill", "both", {"RATE_LOSS_UNIT": "sequence", "DISTILL_TEACHER": TEACHER},
            spread_seeds="0,1,2"),
    Attempt("epochs3_static", "static pruning at three epochs", methods="static_ppl", epochs=3),
    Attempt("epochs3_sequence", "the per-sequence rate loss at three epochs", {"RATE_LOSS_UNIT": "sequence"}, epochs=3),
]


def run_attempt(attempt: Attempt, work_dir: str) -> list:
    out = os.path.join(work_dir, f"{attempt.name}.json")
    variables = {k: (os.path.join(ROOT, v) if v == TEACHER else v) for k, v in attempt.finetuning_variables().items()}
    spread = (["--spread_methods", attempt.methods, "--spread_target", "0.5", "--spread_seeds", attempt.spread_seeds]
              if attempt.spread_seeds else ["--spread_methods", "none"])
    command = [sys.executable, "-m", "benchmarks.baselines", "--methods", attempt.methods, "--targets",
               attempt.targets, *spread, "--extra_runs", attempt.extra_runs,
               "--work_dir", os.path.join(work_dir, attempt.name), "--out", out,
               "--recipe", " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())]
    print(f"=== {attempt.name}: {attempt.why}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    with open(out) as f:
        return [dict(row, attempt=attempt.name, variables=recipe(attempt), epochs=attempt.epochs) for row in json.load(f)]


def recipe(attempt: Attempt) -> str:
    """The finetuning.sh variables the attempt sets, as a command prefix."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in attempt.finetuning_variables().items())


def static_curve(sweep_rows: list) -> list:
    """(FLOPs ratio, CE) of static pruning by perplexity in the one-epoch sweep, seeds averaged."""
    by_target = {}
    for r in sweep_rows:
        if r["method"] == "static_ppl":
            by_target.setdefault(r["target"], []).append(r)
    return sorted((statistics.fmean(r["flops_ratio"] for r in rows), statistics.fmean(r["val_ce"] for r in rows))
                  for rows in by_target.values())


def interpolate(curve: list, x: float) -> Optional[float]:
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def static_curves(sweep: list, rows: list) -> dict:
    """The static curve each D-LLM row is set against: the sweep's, or for rows distilled from the
    dense run, static pruning distilled from it too (attempt distill_dense)."""
    distilled = static_curve([r for r in rows if r["attempt"] == "distill_dense"])
    by_name = {a.name: a for a in ATTEMPTS}
    return {r["attempt"]: distilled if by_name[r["attempt"]].variables.get("DISTILL_TEACHER") == TEACHER
            else static_curve(sweep) for r in rows}


def markdown(rows: list, curves: dict, reference: list) -> str:
    lines = ["### D-LLM attempts on the demo", "", "`python -m benchmarks.dllm_attempts`", "",
             "Reference, one epoch (`benchmarks/results/baselines_demo.json`): "
             + "; ".join(f"{name} {flops:.3f} / {ce:.3f}" for name, flops, ce in reference)
             + " (FLOPs ratio / val CE, mean of seeds 0-2 at target 0.5).", "",
             "| attempt | finetuning.sh variables | method | target | seed | FLOPs ratio | KV ratio | val CE "
             "| static (ppl, same teacher) at this FLOPs | CE - static | blocks/token | std in sequence |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        static = interpolate(curves[r["attempt"]], r["flops_ratio"]) if r["epochs"] == 1 and r["method"] == "dllm" else None
        versus = ("", "") if static is None else (f"{static:.3f}", f"{r['val_ce'] - static:+.3f}")
        lines.append(f"| {r['attempt']} | `{r['variables']}` | {r['method']} | {r['target']:g} | {r['seed']} "
                     f"| {r['flops_ratio']:.3f} | {r['kv_ratio']:.3f} | {r['val_ce']:.3f} | {versus[0]} | {versus[1]} "
                     f"| {r['blocks_per_token']:.2f} | {r['blocks_std_in_sequence']:.2f} |")
    return "\n".join(lines) + "\n"


def main(args):
    work_dir, out = os.path.abspath(args.work_dir), os.path.abspath(args.out)
    with open(os.path.abspath(args.sweep)) as f:
        sweep = json.load(f)
    reference = []
    for method in ("dllm", "static_ppl"):
        rows = [r for r in sweep if r["method"] == method and r["target"] == 0.5]
        reference.append((method, statistics.fmean(r["flops_ratio"] for r in rows),
                          statistics.fmean(r["val_ce"] for r in rows)))
    rows = []
    for attempt in ATTEMPTS:
        if not args.only or attempt.name in args.only.split(","):
            rows += run_attempt(attempt, work_dir)
            atomic_write_text(json.dumps(rows, indent=2) + "\n", out)
            atomic_write_text(markdown(rows, static_curves(sweep, rows), reference), os.path.splitext(out)[0] + ".md")
    print(markdown(rows, static_curves(sweep, rows), reference))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", default=os.path.join("runs", "dllm-attempts"), help="one directory per attempt")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "dllm_attempts_demo.json"))
    p.add_argument("--sweep", default=os.path.join("benchmarks", "results", "baselines_demo.json"),
                   help="the one-epoch sweep the rows are set against")
    p.add_argument("--only", default="", help="comma-separated attempt names (default: all)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
