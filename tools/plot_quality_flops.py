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
from dllm.evaluate import read_results
from dllm.plots import quality_flops_figure, save_png
from benchmarks.baselines import BASELINE_METHODS, baseline_label

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_run(text: str):
    method, sep, path = text.partition("=")
    if not sep or not method or not path:
        raise InputError(f"{text!r}: expected METHOD=RESULTS_DIR")
    return method, read_results(path)


def baseline_runs(text: str, methods=None):
    """The seed-0 runs of a baselines.py JSON (of `methods` only, if given): each row's evaluate.py
    results, in eval/ beside its adapter (paths relative to the repository), under its method's
    name, or under LABEL for a table of one method."""
    label, sep, path = text.partition("=")
    if not sep:
        label, path = "", text
    try:
        with open(path) as f:
            rows = [(row["method"], row["adapter"]) for row in json.load(f) if row["seed"] == 0]
    except FileNotFoundError:
        raise InputError(f"{path}: no such baselines file") from None
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{path}: not a benchmarks/baselines.py table ({type(e).__name__}: {e})") from None
    rows = [(method, adapter) for method, adapter in rows if methods is None or method in methods]
    if label and len({method for method, _ in rows}) > 1:
        raise InputError(f"{text}: a LABEL names one line, but the table holds "
                         f"{', '.join(sorted({m for m, _ in rows}))}; keep one with --methods")
    return [(label or baseline_label(method), read_results(os.path.join(ROOT, os.path.dirname(adapter), "eval")))
            for method, adapter in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="PNG to write")
    p.add_argument("runs", nargs="*", help="METHOD=RESULTS_DIR (or METHOD=path/to/results.json)")
    p.add_argument("--baselines", action="append", default=[], help="[LABEL=]JSON written by benchmarks/baselines.py")
    p.add_argument("--methods", default=None, help="comma-separated baselines.py methods to plot (default: all)")
    p.add_argument("--datasets", default=None, help="comma-separated datasets to plot (default: all)")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods else None
    unknown = set(methods or ()) - set(BASELINE_METHODS)
    if unknown:
        raise InputError(f"--methods: unknown {', '.join(sorted(unknown))}; known: {', '.join(BASELINE_METHODS)}")
    runs = [parse_run(r) for r in args.runs] + [run for table in args.baselines for run in baseline_runs(table, methods)]
    if not runs:
        raise InputError("nothing to plot: give METHOD=RESULTS_DIR or --baselines JSON")
    if args.datasets:
        keep = set(args.datasets.split(","))
        runs = [(method, [row for row in rows if row["dataset"] in keep]) for method, rows in runs]
    save_png(quality_flops_figure(runs), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
