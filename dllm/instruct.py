"""example.py: answer instructions with a D-LLM model and show what each answer executed and kept."""
import os
from dataclasses import dataclass
from typing import List, Optional

from dllm import distributed
from dllm.atomic_io import check_writable_dir
from dllm.chat import ChatFormat
from dllm.config import setting
from dllm.data import ALPACA_TEMPLATES, RecordError, Templates, check_text, instruction_prompt, read_templates
from dllm.errors import InputError
from dllm.generation import ModelSettings
from dllm.plots import routing_grid_figure, save_png
from dllm.token_view import sequences_from_generation, write_html

DEFAULT_INSTRUCTS = [
    "Tell me about alpacas.",
    "Tell me about the president of Mexico in 2019.",
    "List all Canadian provinces in alphabetical order.",
    "Write a Python program that prints the first 10 Fibonacci numbers.",
]


@dataclass
class InstructConfig(ModelSettings):
    PRESET_GROUPS = (("instructs", "inputs"),)

    instructs: List[str] = setting(DEFAULT_INSTRUCTS, "the instructions, a Python list: --instructs "
                                   "\"['Tell me about alpacas.', 'Name three colours.']\" (one plain string is one "
                                   "instruction)")
    inputs: Optional[List[str]] = setting(None, "the Input section of each instruction's prompt, a list as long as "
                                          "--instructs, '' for none (default: no input)")
    prompt_path: Optional[str] = setting(None, "prompt.json with the templates prompt_input and prompt_no_input, e.g. "
                                         "datasets/demo/prompt.json, the demo adapter's (default: Alpaca's, the paper's)")
    chat: bool = setting(False, "send each instruction as a user turn in the model's own chat template instead")
    temperature: float = setting(0.1, "sampling temperature; 0 is greedy", low=0.0)
    top_p: float = setting(0.75, "nucleus sampling: sample among the most likely tokens that make up this "
                           "probability", low=0.0, low_open=True, high=1.0)
    max_batch_size: int = setting(32, "most instructions answered at once", low=1)
    max_gen_len: int = setting(128, "most tokens generated per answer", low=1)
    html: Optional[str] = setting(None, "also write a page showing which blocks each token executed to this "
                                  "path (default: none)")
    png: Optional[str] = setting(None, "also draw the token x block grid to this PNG (default: none)")

    def __post_init__(self):
        super().__post_init__()
        if not self.instructs:
            raise InputError("--instructs: no instruction given")
        if self.inputs is None:
            self.inputs = [""] * len(self.instructs)
        if len(self.inputs) != len(self.instructs):
            raise InputError(f"--inputs has {len(self.inputs)} entries for {len(self.instructs)} --instructs")
        for flag, values in (("instructs", self.instructs), ("inputs", self.inputs)):
            try:
                check_text(values, f"--{flag}")
            except RecordError as e:
                raise InputError(str(e)) from None


def answer(config: InstructConfig):
    """Generate for every instruction; rank 0 prints each with its input, answer, the share of blocks it
    executed and the KV cache it kept (every data-parallel rank generates the same answers)."""
    for flag, path in (("--html", config.html), ("--png", config.png)):
        if path:
            check_writable_dir(os.path.dirname(os.path.abspath(path)), f"{flag} {path}")
    templates = None
    if not config.chat:
        templates = read_templates(config.prompt_path) if config.prompt_path else ALPACA_TEMPLATES
    generator = config.build(config.adapter(), config.max_batch_size)
    pairs = list(zip(config.instructs, config.inputs))
    sampling = dict(temperature=config.temperature, top_p=config.top_p, max_gen_len=config.max_gen_len)
    if config.chat:
        dialogs = [[{"role": "user", "content": f"{instruct}\n\n{text}" if text else instruct}] for instruct, text in pairs]
        completions, stats = generator.chat_completion(dialogs, **sampling, return_routing=True)
        answers = [r["generation"]["content"] for r in completions]
    else:
        filled = Templates(config.prompt_path or "Alpaca's templates", templates, ChatFormat(generator.tokenizer))
        prompts = [instruction_prompt(filled, instruct, text) for instruct, text in pairs]
        completions, stats = generator.text_completion(prompts, **sampling, return_routing=True)
        answers = [r["generation"] for r in completions]
    if not distributed.is_main():
        return
    for row, ((instruct, text), reply) in enumerate(zip(pairs, answers)):
        if config.chat:  # a dialogue, as Meta's chat example prints it
            print(f"User: {instruct}\n\n{text}" if text else f"User: {instruct}")
            print(f"\n> Assistant: {reply.strip()}")
        else:
            print(f"### Instruction: {instruct}")
            if text:
                print(f"### Input: {text}")
            print(f"### Response: {reply.strip()}")
        print(
            f"[blocks executed: {100 * stats.exec_share(row):.1f}% of {stats.n_layers} per token | "
            f"KV cache kept: {stats.kv_bytes(row) / 1024:.1f} KiB of {stats.kv_bytes_dense(row) / 1024:.1f} KiB dense]\n"
        )
    sequences = sequences_from_generation(generator, stats) if config.html or config.png else []
    if config.html:
        write_html(sequences, config.html)
    if config.png:
        save_png(routing_grid_figure(sequences), config.png)
