"""What adapters keep of their base against their FLOPs ratio in generation, from benchmarks/fidelity.py
results: KL to the base, and agreement of greedy answers with the base's, one line per method.

    python -m tools.plot_fidelity docs/fidelity-smollm2.png benchmarks/results/fidelity_smollm2_test.json
    python -m tools.plot_fidelity docs/curve.png static.json dllm.json "dllm_response.json=dllm, response loss"

`FILE=METHOD` draws that file's runs as METHOD (their labels' prefix replaced): two sweeps of one
method with different recipes get a line each.
"""
import argparse
import json

from dllm.errors import InputError, run_cli
from dllm.plots import fidelity_figure, save_png


def load_runs(results) -> dict:
    """Every file's runs by label, each `FILE=METHOD`'s relabelled; a label two files share is an error."""
    runs = {}
    for item in results:
        path, _, method = item.partition("=")
        try:
            with open(path) as f:
                file_runs = json.load(f)["runs"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: not a benchmarks/fidelity.py result ({e})") from None
        for label, run in file_runs.items():
            if method:
                label = f"{method}:{label.partition(':')[2]}"
            if label in runs:
                raise InputError(f"{path}: run {label!r} is in an earlier file too; draw one of them as another "
                                 f"method with {path}=METHOD")
            runs[label] = run
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the PNG written")
    p.add_argument("results", nargs="+", help="benchmarks/fidelity.py JSON files, FILE or FILE=METHOD (their runs "
                                              "are drawn together)")
    args = p.parse_args(argv)
    save_png(fidelity_figure(load_runs(args.results)), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
