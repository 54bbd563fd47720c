"""Quality against FLOPs ratio from several evaluate.py results, one line per method: a panel per
(dataset, metric), the points of a method joined in FLOPs order.

    python -m tools.plot_quality_flops quality_flops.png dense=results/demo-dense \\
        D-LLM=results/demo-dllm-t0.3 D-LLM=results/demo-dllm-t0.5 MoD=results/demo-mod

Each METHOD=PATH names a results directory (or its results.json); repeat a method for its runs.
`--baselines [LABEL=]JSON` adds the runs of a benchmarks/baselines.py table (seed 0 of each method
and target; `--methods dllm,static_ppl` keeps those methods' runs). `--datasets demo,piqa` keeps
those datasets' rows only.

    python -m tools.plot_quality_flops docs/baselines-demo.png --baselines benchmarks/results/baselines_demo.json
"""
import argparse
import json
import os

from dllm.errors import InputError, run_cli
from dllm.plots import quality_flops_figure, read_results, save_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/baselines.py's methods, as a legend names them
BASELINE_NAMES = {"dense": "dense LoRA", "dllm": "D-LLM", "mod": "MoD", "static_ppl": "static (ppl)",
                  "static_taylor": "static (Taylor)", "early_exit": "early exit"}


def parse_run(text: str):
    method, sep, path = text.partition("=")
    if not sep or not method or not path:
        raise InputError(f"{text!r}: expected METHOD=RESULTS_DIR")
    return method, read_results(path)


def baseline_runs(text: str, methods=None):
    """The seed-0 runs of a baselines.py JSON: each row's evaluate.py results, in eval/ beside its
    adapter (paths relative to the repository), under LABEL or the row's method."""
    label, sep, path = text.partition("=")
    if not sep:
        label, path = "", text
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such baselines file")
    with open(path) as f:
        rows = json.load(f)
    return [(label or BASELINE_NAMES.get(row["method"], row["method"]),
             read_results(os.path.join(ROOT, os.path.dirname(row["adapter"]), "eval")))
            for row in rows if row["seed"] == 0 and (methods is None or row["method"] in methods)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="PNG to write")
    p.add_argument("runs", nargs="*", help="METHOD=RESULTS_DIR (or METHOD=path/to/results.json)")
    p.add_argument("--baselines", action="append", default=[], help="[LABEL=]JSON written by benchmarks/baselines.py")
    p.add_argument("--methods", default=None, help="comma-separated baselines.py methods to plot (default: all)")
    p.add_argument("--datasets", default=None, help="comma-separated datasets to plot (default: all)")
    args = p.parse_args(argv)
    runs = [parse_run(r) for r in args.runs] + [
        run for table in args.baselines for run in baseline_runs(table, args.methods and args.methods.split(","))]
    if not runs:
        raise InputError("nothing to plot: give METHOD=RESULTS_DIR or --baselines JSON")
    if args.datasets:
        keep = set(args.datasets.split(","))
        runs = [(method, [row for row in rows if row["dataset"] in keep]) for method, rows in runs]
    save_png(quality_flops_figure(runs), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
