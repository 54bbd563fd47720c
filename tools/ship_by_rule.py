"""Ship the adapter the shipping rule picks from validation results: the lowest generation FLOPs whose
greedy answers match the base's first ten words on at least half of the validation prompts. Writes the
pick and every candidate to a results file, then copies the pick into the shipped directory.

    python -m tools.ship_by_rule assets/smollm2 benchmarks/results/shipped_smollm2.json \
        benchmarks/results/curve_smollm2_static_fidelity_validation.json ... --base models/smollm2

The rule reads validation results only: the test split is for reporting the pick, not choosing it.
"""
import argparse
import json
import os
import shlex
import sys

from dllm.atomic_io import atomic_write_text
from dllm.checkpoints.adapters import read_adapter
from dllm.curves import shipping_pick
from dllm.errors import InputError, run_cli
from tools import ship_adapter

RULE = ("the lowest generation FLOPs whose greedy answers match the base's first 10 words on at least "
        "{:.0%} of the validation prompts")
CANDIDATE_FIELDS = ("flops_generation", "gen_first_words", "kl", "top1_agreement", "gen_rouge_l")


def validation_candidates(paths) -> dict:
    """Every run of the files by "FILE:LABEL" (two sweeps may share a label); a file measured on another
    split, or on another dataset than the first, is an error."""
    candidates, dataset = {}, None
    for path in paths:
        try:
            with open(path) as f:
                results = json.load(f)
            meta, runs = results["meta"], results["runs"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: not a benchmarks/fidelity.py result ({e})") from None
        if meta["split"] != "validation":
            raise InputError(f"{path}: measured on the {meta['split']} split; the rule chooses on validation only")
        dataset = dataset or meta["dataset"]
        if meta["dataset"] != dataset:
            raise InputError(f"{path}: dataset {meta['dataset']!r}, the other files' is {dataset!r}")
        for label, run in runs.items():
            candidates[f"{os.path.relpath(path)}:{label}"] = {"adapter": run["adapter"], "budget": run.get("budget"),
                                                            "records": meta["records"],
                                                            **{k: run[k] for k in CANDIDATE_FIELDS}}
    return candidates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="the shipped adapter's directory (replaced only once the pick is known)")
    p.add_argument("out", help="the results file: the rule, every candidate and the pick")
    p.add_argument("results", nargs="+", help="benchmarks/fidelity.py results on the validation split")
    p.add_argument("--min_first_words", type=float, default=0.5)
    p.add_argument("--base", default=None, help="the base, for adapters older than base fingerprints")
    args = p.parse_args(argv)
    if not 0 < args.min_first_words <= 1:
        raise InputError(f"--min_first_words {args.min_first_words}: a share of the prompts, in (0, 1]")
    candidates = validation_candidates(args.results)
    pick = shipping_pick(candidates, args.min_first_words)
    if pick is None:
        raise InputError(f"no run meets the rule ({RULE.format(args.min_first_words)}); nothing shipped")
    adapter, budget = candidates[pick]["adapter"], candidates[pick]["budget"]
    if budget is not None:
        raise InputError(f"{pick}: a point of the dial (budget {budget}); ship its adapter with "
                         "tools/ship_adapter.py and say the budget to run it at")
    if not os.path.isfile(adapter):
        raise InputError(f"{pick}: its adapter {adapter} is not here (a run directory since removed)")
    ship_adapter.main(os.path.dirname(adapter), args.out_dir, os.path.basename(adapter), base=args.base)
    shipped = read_adapter(os.path.join(args.out_dir, "checkpoint.pth"))["adapter_sha256"]
    command = "python -m tools.ship_by_rule " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = {"command": command, "rule": RULE.format(args.min_first_words), "min_first_words": args.min_first_words,
              "pick": {"candidate": pick, **candidates[pick], "adapter_sha256": shipped,
                       "shipped_to": os.path.relpath(args.out_dir)},
              "candidates": candidates}
    atomic_write_text(json.dumps(record, indent=2) + "\n", args.out)
    print(f"the rule picks {pick}: generation FLOPs {candidates[pick]['flops_generation']:.3f}, first ten words "
          f"{candidates[pick]['gen_first_words']:.2f}; shipped to {args.out_dir}, wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
