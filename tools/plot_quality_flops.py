"""Quality against FLOPs ratio from several evaluate.py results, one line per method: a panel per
(dataset, metric), the points of a method joined in FLOPs order.

    python -m tools.plot_quality_flops quality_flops.png dense=results/demo-dense \\
        D-LLM=results/demo-dllm-t0.3 D-LLM=results/demo-dllm-t0.5 MoD=results/demo-mod

Each METHOD=PATH names a results directory (or its results.json); repeat a method for its runs.
`--datasets demo,piqa` keeps those datasets' rows only.
"""
import argparse

from dllm.errors import InputError, run_cli
from dllm.plots import quality_flops_figure, read_results, save_png


def parse_run(text: str):
    method, sep, path = text.partition("=")
    if not sep or not method or not path:
        raise InputError(f"{text!r}: expected METHOD=RESULTS_DIR")
    return method, read_results(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="PNG to write")
    p.add_argument("runs", nargs="+", help="METHOD=RESULTS_DIR (or METHOD=path/to/results.json)")
    p.add_argument("--datasets", default=None, help="comma-separated datasets to plot (default: all)")
    args = p.parse_args(argv)
    runs = [parse_run(r) for r in args.runs]
    if args.datasets:
        keep = set(args.datasets.split(","))
        runs = [(method, [row for row in rows if row["dataset"] in keep]) for method, rows in runs]
    save_png(quality_flops_figure(runs), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
