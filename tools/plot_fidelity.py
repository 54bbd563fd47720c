"""What adapters keep of their base against their FLOPs ratio in generation, from benchmarks/fidelity.py
results: KL to the base, and agreement of greedy answers with the base's, one line per method.

    python -m tools.plot_fidelity docs/fidelity-smollm2.png benchmarks/results/fidelity_smollm2_test.json
"""
import argparse
import json

from dllm.errors import InputError, run_cli
from dllm.plots import fidelity_figure, save_png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the PNG written")
    p.add_argument("results", nargs="+", help="benchmarks/fidelity.py JSON files (their runs are drawn together)")
    args = p.parse_args(argv)
    runs = {}
    for path in args.results:
        try:
            with open(path) as f:
                runs.update(json.load(f)["runs"])
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: not a benchmarks/fidelity.py result ({e})") from None
    save_png(fidelity_figure(runs), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
