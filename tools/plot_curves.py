"""A fine-tuning run's curves as one PNG: train CE, execution ratio against its target, lambda and
lr over steps, validation points per epoch (finetuning.py writes the same picture as curves.png
at each epoch end).

    python -m tools.plot_curves assets/tiny-dllm --out docs/tiny-dllm-curves.png
"""
import argparse

from dllm.errors import run_cli
from dllm.plots import write_curves


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a fine-tuning output directory (log.jsonl and params.json)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    print(f"wrote {write_curves(args.run_dir, args.out)}")


if __name__ == "__main__":
    run_cli(main)
