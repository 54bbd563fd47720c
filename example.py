"""Answer instructions with a D-LLM model: text, share of blocks executed, KV cache kept vs dense.

    python example.py
    python example.py --dynamic_ckpt_dir output/tiny-dllm --instructs "['Continue the passage.']" \
        --inputs "['In the beginning God created the heaven and the earth.']"
    python example.py --preset smollm2

With no flags it runs the demo preset (presets/demo.json): the shipped demo model
(assets/tiny-llama2) with the shipped demo adapter (assets/tiny-dllm), on an instruction and input
from the demo's test split. `--preset smollm2` runs SmolLM2 in its chat template. Another base model
(Meta or Hugging Face directory) gets the adapter shipped for it under assets/ if there is one
(assets/smollm2 for SmolLM2), else runs dense.
`--dynamic_ckpt_dir` takes your own fine-tuning output directory (bash finetuning.sh writes
output/tiny-dllm); the adapter runs with its own params.json. Prompts use the Alpaca template
(`--prompt_path` picks another prompt.json, e.g. datasets/demo/prompt.json, the one the demo
adapter was trained with); `--inputs` fills the template's Input section. `--chat` sends each
instruction as a user turn in the model's own chat template instead (for instruction-tuned models
such as SmolLM2):

    python example.py --llama_ckpt_dir models/smollm2 --dense --chat --instructs "['What is the capital of France?']"

`--html PATH` writes a page showing which blocks each token executed (open it offline, hover or
click a token); `--png PATH` draws the token x block grid. Under `torchrun --nproc_per_node N` the
base checkpoint's shards set the model-parallel size; rank 0 prints.
"""
import presets
from dllm.errors import run_cli
from dllm.instruct import InstructConfig, answer


def main(argv=None):
    answer(InstructConfig.parse(argv, description=__doc__, defaults=presets.CHECKOUT_DEFAULTS,
                                presets=presets.for_entry_point("example", default="demo")))


if __name__ == "__main__":
    run_cli(main)
