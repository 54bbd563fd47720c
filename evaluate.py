"""Evaluate an adapter (D-LLM or any routing policy, as its own params.json says) or the dense base
model on the paper's benchmarks.

    python evaluate.py --datasets demo,piqa --output_dir results/demo-dllm
    python evaluate.py --dense --datasets demo,piqa --output_dir results/demo-dense
    python evaluate.py --dynamic_ckpt_dir output/tiny-dllm --datasets demo --output_dir results/my-dllm

With no flags it evaluates the demo preset (presets/demo.json): the shipped demo model with the
shipped demo adapter; `--preset smollm2` evaluates SmolLM2 on its own set. Another base model
(Meta or Hugging Face directory) gets the adapter shipped for it under assets/ if there is one,
else it is evaluated dense. `--dynamic_ckpt_dir` takes your own fine-tuning output directory. Writes
results.md and results.json (the table and what produced it: base, adapter, shots, threshold,
datasets, code version, date) to --output_dir once every dataset is done; earlier results there
are kept unless --overwrite. Under `torchrun --nproc_per_node N` the base checkpoint's shards set
the model-parallel size and the other processes split the records; rank 0 prints and writes.
"""
import presets
from dllm.errors import run_cli
from dllm.evaluate import EvalConfig, evaluate


def main(argv=None):
    evaluate(EvalConfig.parse(argv, description=__doc__, defaults=presets.CHECKOUT_DEFAULTS,
                              presets=presets.for_entry_point("evaluate", default="demo")))


if __name__ == "__main__":
    run_cli(main)
