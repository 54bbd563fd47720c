"""Answer instructions with a D-LLM model: text, share of blocks executed, KV cache kept vs dense.

    torchrun --nproc_per_node 1 example.py --instructs "['Tell me about alpacas.']"

With no path flags it runs the shipped demo model (assets/tiny-llama2) with the shipped demo
adapter (assets/tiny-dllm). Prompts use the Alpaca template (`--prompt_path` picks another
prompt.json, e.g. datasets/demo/prompt.json, the one the demo adapter was trained with);
`--inputs` fills the template's Input section.
"""
import os
from typing import List, Optional

import fire

from dllm.data import Templates, instruction_prompt, read_json
from dllm.errors import InputError, run_cli
from dllm.generation import DEMO_ADAPTER, DEMO_ARGS, DEMO_BASE, DEMO_TOKENIZER, ROOT, Llama

PROMPT_PATH = os.path.join(ROOT, "datasets", "alpaca", "prompt.json")
DEFAULT_INSTRUCTS = [
    "Tell me about alpacas.",
    "Tell me about the president of Mexico in 2019.",
    "List all Canadian provinces in alphabetical order.",
    "Write a Python program that prints the first 10 Fibonacci numbers.",
]


def main(
    llama_ckpt_dir: str = DEMO_BASE,
    dynamic_ckpt_dir: Optional[str] = DEMO_ADAPTER,
    model_args_path: Optional[str] = DEMO_ARGS,
    tokenizer_path: str = DEMO_TOKENIZER,
    instructs: Optional[List[str]] = None,
    inputs: Optional[List[str]] = None,
    prompt_path: str = PROMPT_PATH,
    temperature: float = 0.1,
    top_p: float = 0.75,
    max_seq_len: int = 512,
    max_batch_size: int = 32,
    max_gen_len: int = 128,
    dense: bool = False,
    execute_threshold: Optional[float] = None,
    model_parallel_size: Optional[int] = None,
    seed: int = 1,
):
    instructs = DEFAULT_INSTRUCTS if instructs is None else instructs
    inputs = [""] * len(instructs) if inputs is None else inputs
    for flag, values in (("instructs", instructs), ("inputs", inputs)):
        if isinstance(values, str) or not all(isinstance(x, str) for x in values):
            raise InputError(f"--{flag} takes a list of strings, e.g. --{flag} \"['Tell me about alpacas.']\"")
    if len(inputs) != len(instructs):
        raise InputError(f"--inputs has {len(inputs)} entries for {len(instructs)} --instructs")
    generator = Llama.build(llama_ckpt_dir, dynamic_ckpt_dir, model_args_path, tokenizer_path, max_seq_len,
                            max_batch_size, model_parallel_size, seed, dense, execute_threshold)
    templates = Templates(prompt_path, read_json(prompt_path))
    prompts = [instruction_prompt(templates, instruct, text) for instruct, text in zip(instructs, inputs)]
    results = generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    stats = generator.last_stats
    for row, (instruct, result) in enumerate(zip(instructs, results)):
        print(f"### Instruction: {instruct}")
        print(f"### Response: {result['generation'].strip()}")
        print(
            f"[blocks executed: {100 * stats.exec_share(row):.1f}% of {stats.n_layers} per token | "
            f"KV cache kept: {stats.kv_bytes(row) / 1024:.1f} KiB of {stats.kv_bytes_dense(row) / 1024:.1f} KiB dense]\n"
        )


if __name__ == "__main__":
    run_cli(fire.Fire, main)
