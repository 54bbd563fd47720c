"""Answer instructions with a D-LLM model: text, share of blocks executed, KV cache kept vs dense.

    torchrun --nproc_per_node 1 example.py --instructs "['Tell me about alpacas.']"

With no path flags it runs the shipped demo model (assets/tiny-llama2) with the shipped demo
adapter (assets/tiny-dllm); another base model (Meta or Hugging Face directory) gets the adapter
shipped for it under assets/ if there is one (assets/smollm2-dllm for SmolLM2), else runs dense.
Prompts use the Alpaca template (`--prompt_path` picks another prompt.json, e.g.
datasets/demo/prompt.json, the one the demo adapter was trained with);
`--inputs` fills the template's Input section. `--chat` sends each instruction as a user turn in
the model's own chat template instead (for instruction-tuned models such as SmolLM2):

    torchrun --nproc_per_node 1 example.py --llama_ckpt_dir models/smollm2 --dense --chat \
        --instructs "['What is the capital of France?']"

`--html PATH` writes a page showing which blocks each token executed (open it offline, hover or
click a token); `--png PATH` draws the token x block grid.
"""
import os
import sys
from typing import List, Optional

import fire

from dllm.chat import ChatFormat
from dllm.checkpoint import shipped_adapter
from dllm.data import Templates, instruction_prompt, read_json
from dllm.errors import InputError, run_cli
from dllm.generation import Llama
from dllm.plots import routing_grid_figure, save_png
from dllm.token_view import sequences_from_generation, write_html

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_BASE = os.path.join(HERE, "assets", "tiny-llama2")
ASSETS = os.path.join(HERE, "assets")  # shipped adapters, each found by the base it was trained on
PROMPT_PATH = os.path.join(HERE, "datasets", "alpaca", "prompt.json")
DEFAULT_INSTRUCTS = [
    "Tell me about alpacas.",
    "Tell me about the president of Mexico in 2019.",
    "List all Canadian provinces in alphabetical order.",
    "Write a Python program that prints the first 10 Fibonacci numbers.",
]


def main(
    llama_ckpt_dir: str = DEMO_BASE,
    dynamic_ckpt_dir: Optional[str] = None,
    model_args_path: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    instructs: Optional[List[str]] = None,
    inputs: Optional[List[str]] = None,
    prompt_path: str = PROMPT_PATH,
    chat: bool = False,
    temperature: float = 0.1,
    top_p: float = 0.75,
    max_seq_len: int = 512,
    max_batch_size: int = 32,
    max_gen_len: int = 128,
    dense: bool = False,
    execute_threshold: Optional[float] = None,
    model_parallel_size: Optional[int] = None,
    seed: int = 1,
    html: Optional[str] = None,
    png: Optional[str] = None,
):
    instructs = DEFAULT_INSTRUCTS if instructs is None else instructs
    inputs = [""] * len(instructs) if inputs is None else inputs
    for flag, values in (("instructs", instructs), ("inputs", inputs)):
        if isinstance(values, str) or not all(isinstance(x, str) for x in values):
            raise InputError(f"--{flag} takes a list of strings, e.g. --{flag} \"['Tell me about alpacas.']\"")
    if len(inputs) != len(instructs):
        raise InputError(f"--inputs has {len(inputs)} entries for {len(instructs)} --instructs")
    if dynamic_ckpt_dir is None and not dense:
        dynamic_ckpt_dir = shipped_adapter(llama_ckpt_dir, ASSETS)
        if dynamic_ckpt_dir:
            print(f"adapter: {dynamic_ckpt_dir} (shipped for this base; --dense runs the base alone)", file=sys.stderr)
    generator = Llama.build(llama_ckpt_dir, dynamic_ckpt_dir, model_args_path, tokenizer_path, max_seq_len,
                            max_batch_size, model_parallel_size, seed, dense, execute_threshold)
    if chat:
        dialogs = [[{"role": "user", "content": f"{instruct}\n\n{text}" if text else instruct}]
                   for instruct, text in zip(instructs, inputs)]
        results = generator.chat_completion(dialogs, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        answers = [result["generation"]["content"] for result in results]
    else:
        templates = Templates(prompt_path, read_json(prompt_path), ChatFormat(generator.tokenizer))
        prompts = [instruction_prompt(templates, instruct, text) for instruct, text in zip(instructs, inputs)]
        results = generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        answers = [result["generation"] for result in results]
    stats = generator.last_stats
    for row, (instruct, answer) in enumerate(zip(instructs, answers)):
        print(f"### Instruction: {instruct}")
        print(f"### Response: {answer.strip()}")
        print(
            f"[blocks executed: {100 * stats.exec_share(row):.1f}% of {stats.n_layers} per token | "
            f"KV cache kept: {stats.kv_bytes(row) / 1024:.1f} KiB of {stats.kv_bytes_dense(row) / 1024:.1f} KiB dense]\n"
        )
    sequences = sequences_from_generation(generator) if html or png else []
    if html:
        write_html(sequences, html)
    if png:
        save_png(routing_grid_figure(sequences), png)


if __name__ == "__main__":
    run_cli(fire.Fire, main)
