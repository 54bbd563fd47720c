"""Build `datasets/smol`: instructions answered by the dense SmolLM2-135M-Instruct (self-distillation).

Why: no instruction dataset can be downloaded here, and for a compute-reduction method the honest
target is the dense model itself. Fine-tuning D-LLM on the dense model's own greedy answers asks it
to reproduce that model with fewer blocks, so held-out CE against these answers and top-1
agreement with them measure exactly what skipping loses.

Instructions: tasks on public-domain passages (King James Bible and Shakespeare, tools/corpus.py:
summarise, continue, explain, main idea, list names, rewrite, title, who acts) and short general
questions from templates (capitals, tips, definitions, poems, arithmetic, lists, translation,
code). Test passages come from the corpus's held-out documents and test questions from fill
values never used in training. Validation passages come from training documents that no training
record was cut from (a hash bucket of them, `validation_documents`), validation questions from fill
values of their own (`VALIDATION_FILLS`, operands 100 to 149): disjoint from both other splits by
source document and by fill value, and built after them, so train and test do not change with it. The dense model answers each through its chat template, greedy,
at most `max_gen_len` tokens; an answer that does not end within that is dropped (its end would
be a false end-of-turn target), and the count is recorded. Same arguments, same files; `--splits`
builds only the named splits into a directory that lacks them.

    python -m tools.build_smol_dataset --llama_ckpt_dir models/smollm2 --out_dir datasets/smol   # about 35 minutes on 2 cores
"""
import json
import os
import random
from typing import Dict, List, Optional, Set, Tuple

import fire
import torch
from tqdm import tqdm

from dllm.chat import ChatFormat
from dllm.atomic_io import atomic_write_text
from dllm.data import Templates, instruction_prompt
from dllm.errors import InputError, run_cli
from dllm.generation import Llama
from tools.corpus import load_corpus, validation_documents

PASSAGE_TASKS = [
    "Summarize the following passage in one sentence.",
    "Continue the passage with one or two more lines in the same style.",
    "Explain in simple modern English what this passage says, in two sentences.",
    "What is the main idea of this passage? Answer in one sentence.",
    "List the people, places or things named in this passage.",
    "Rewrite the first sentence of this passage in plain modern English.",
    "Give this passage a short title.",
    "Who is speaking or acting in this passage? Answer briefly.",
]
COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "Kenya", "Norway", "Peru", "India", "Spain", "Italy",
             "Mexico", "Chile", "Greece", "Turkey", "Poland", "Sweden", "Vietnam", "Morocco", "Ireland", "Germany",
             "Australia", "Argentina", "Portugal", "Thailand", "Nigeria", "Austria", "Finland", "Cuba", "Nepal"]
ACTIVITIES = ["staying healthy", "learning a language", "saving money", "sleeping better", "studying for exams",
              "running a marathon", "growing tomatoes", "writing an essay", "making friends", "cooking rice",
              "public speaking", "reducing stress", "learning to swim", "keeping a plant alive", "packing for a trip",
              "reading more books", "staying focused", "training a puppy", "drinking more water", "baking bread"]
CONCEPTS = ["photosynthesis", "gravity", "inflation", "a black hole", "democracy", "an atom", "evolution",
            "a volcano", "the internet", "a vaccine", "electricity", "a rainbow", "an eclipse", "recycling",
            "a glacier", "friction", "a prime number", "the water cycle", "an algorithm", "a metaphor",
            "a tsunami", "oxygen", "a hurricane", "a noun", "a fraction", "the moon's phases", "a fossil", "a compass"]
TOPICS = ["the sea", "autumn leaves", "a quiet morning", "the stars", "a lost cat", "the city at night", "rain",
          "a mountain", "friendship", "the first snow", "a candle", "an old tree", "the desert", "a river", "spring",
          "the wind", "a lighthouse", "a garden", "the harvest moon", "a train journey"]
CATEGORIES = ["fruits", "planets", "musical instruments", "birds", "programming languages", "rivers in Europe",
              "primary colors", "farm animals", "vegetables", "board games", "types of clouds", "sports",
              "kitchen tools", "flowers", "ocean animals", "metals", "currencies", "insects", "trees", "dances"]
PHRASES = ["good morning", "thank you very much", "where is the library", "I like apples", "the cat is sleeping",
           "see you tomorrow", "how are you", "it is raining", "I am hungry", "happy birthday", "what time is it",
           "the book is on the table", "I love music", "good night", "my name is Anna", "the sky is blue"]
CODE_TASKS = ["reverses a string", "checks whether a number is even", "returns the largest item of a list",
              "counts the vowels in a word", "adds two numbers", "returns the square of a number",
              "checks whether a word is a palindrome", "sums a list of numbers", "converts Celsius to Fahrenheit",
              "returns the first character of a string", "removes spaces from a string", "doubles every list item"]
QUESTION_TEMPLATES = [
    ("What is the capital of {}?", COUNTRIES), ("Give me three short tips for {}.", ACTIVITIES),
    ("Explain what {} is in one sentence.", CONCEPTS), ("Write a four-line poem about {}.", TOPICS),
    ("Name three {}.", CATEGORIES), ("Translate '{}' into French.", PHRASES),
    ("Write a short Python function that {}.", CODE_TASKS),
]


# validation questions' own fill values, none of them in the lists above
VALIDATION_FILLS = {
    "What is the capital of {}?": ["Belgium", "Denmark", "Hungary", "Colombia", "Ghana", "Indonesia", "Iceland",
                                   "Switzerland"],
    "Give me three short tips for {}.": ["learning to draw", "waking up early", "writing a letter", "riding a bike",
                                         "organising a desk", "planning a picnic"],
    "Explain what {} is in one sentence.": ["a magnet", "an earthquake", "a cell", "a telescope", "a verb",
                                            "a desert", "a battery", "an ocean current"],
    "Write a four-line poem about {}.": ["a sunflower", "the ocean at dawn", "a village bell", "winter roads",
                                         "a kite", "the evening sky"],
    "Name three {}.": ["desserts", "continents", "reptiles", "gemstones", "breakfast foods", "constellations"],
    "Translate '{}' into French.": ["the door is open", "I need water", "we are friends", "the dog is running",
                                    "thank you for dinner", "the train is late"],
    "Write a short Python function that {}.": ["returns the length of a list", "checks whether a list is empty",
                                              "returns the last item of a list", "multiplies two numbers"],
}
ARITHMETIC_OPERANDS = {"train": (2, 49), "test": (50, 99), "validation": (100, 149)}


def split_values(values: List[str]) -> Tuple[List[str], List[str]]:
    """Every fourth value is held out for test questions."""
    return [v for i, v in enumerate(values) if i % 4], values[::4]


def fill_values(template: str, values: List[str], split: str) -> List[str]:
    if split == "validation":
        return VALIDATION_FILLS[template]
    train_values, test_values = split_values(values)
    return test_values if split == "test" else train_values


def passage(document: str, rng: random.Random, max_chars: int) -> str:
    lines = [line.strip() for line in document.splitlines() if line.strip()]
    start = rng.randrange(len(lines))
    out = []
    for line in lines[start : start + rng.randint(2, 5)]:
        if out and len("\n".join(out + [line])) > max_chars:
            break
        out.append(line[:max_chars])
    return "\n".join(out)


def instructions(documents: List[str], split: str, n: int, rng: random.Random, max_chars: int,
                 used: Optional[Set[int]] = None) -> List[dict]:
    """n records {"instruction", "input"}: about 60% passage tasks, the rest general questions;
    the index of each document a passage is cut from goes into `used`."""
    records = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.6:
            task = rng.choice(PASSAGE_TASKS)
            doc = rng.randrange(len(documents))
            if used is not None:
                used.add(doc)
            records.append({"instruction": task, "input": passage(documents[doc], rng, max_chars)})
        elif kind < 0.67:
            a, b = rng.randint(*ARITHMETIC_OPERANDS[split]), rng.randint(*ARITHMETIC_OPERANDS[split])
            op = rng.choice(["plus", "times", "minus"])
            records.append({"instruction": f"What is {a} {op} {b}? Answer with the number.", "input": ""})
        else:
            template, values = rng.choice(QUESTION_TEMPLATES)
            records.append({"instruction": template.format(rng.choice(fill_values(template, values, split))), "input": ""})
    return records



# the user's message; "format": "chat" puts it in the model's chat template (dllm/data.py)
PROMPT = {"format": "chat", "prompt_input": "{instruction}\n\n{input}", "prompt_no_input": "{instruction}"}


@torch.inference_mode()
def answer(generator: Llama, records: List[dict], batch_size: int, max_gen_len: int, desc: str) -> List[dict]:
    """Greedy answers to the prompts fine-tuning will use, batched by prompt length; unfinished
    answers dropped."""
    chat = ChatFormat(generator.tokenizer)
    templates = Templates("prompt.json", PROMPT, chat)
    prompts = [generator.tokenizer.encode(instruction_prompt(templates, r["instruction"], r["input"]), bos=True, eos=False)
               for r in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    answers = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc):
        batch = order[start : start + batch_size]
        generation = generator.generate([prompts[i] for i in batch], max_gen_len, temperature=0.0,
                                        actprobs=False, stop_ids=chat.stop_ids)
        for i, out in zip(batch, generation.tokens):
            if len(out) < max_gen_len and out:  # ended at its end-of-turn token within the budget
                answers[i] = generator.tokenizer.decode(out).strip()
    return [{**records[i], "output": answers[i]} for i in range(len(records)) if i in answers and answers[i]]


def questions(n_train: int, n_test: int, n_validation: int, max_passage_chars: int, seed: int) -> Dict[str, List[dict]]:
    """Every split's instructions; train and test draw from one stream in that order, validation
    from its own, so adding it changed neither."""
    train_docs, heldout_docs = load_corpus()
    rng, used = random.Random(seed), set()
    train = instructions(train_docs, "train", n_train, rng, max_passage_chars, used)
    test = instructions(heldout_docs, "test", n_test, rng, max_passage_chars)
    validation = instructions(validation_documents(train_docs, used), "validation", n_validation,
                              random.Random(f"{seed}-validation"), max_passage_chars)
    return {"train": train, "validation": validation, "test": test}


def main(llama_ckpt_dir: str = "models/smollm2", out_dir: str = "datasets/smol", n_train: int = 640, n_test: int = 140,
         n_validation: int = 140, max_gen_len: int = 96, max_passage_chars: int = 300, batch_size: int = 16,
         seed: int = 0, splits: Tuple[str, ...] = ("train", "validation", "test")):
    splits = [splits] if isinstance(splits, str) else list(splits)
    unknown = sorted(set(splits) - {"train", "validation", "test"})
    if unknown:
        raise InputError(f"--splits {unknown}: known splits are train, validation, test")
    present = [s for s in splits if os.path.exists(os.path.join(out_dir, f"{s}.json"))]
    if present:
        raise InputError(f"{out_dir} already holds {', '.join(s + '.json' for s in present)}; build into a new "
                         f"directory or name only the missing --splits")
    torch.manual_seed(seed)
    generator = Llama.build(llama_ckpt_dir, max_seq_len=512, max_batch_size=batch_size, model_parallel_size=1)
    asked = questions(n_train, n_test, n_validation, max_passage_chars, seed)
    info_path = os.path.join(out_dir, "build_info.json")
    info = {"llama_ckpt_dir": llama_ckpt_dir, "n_train": n_train, "n_test": n_test, "n_validation": n_validation,
            "max_gen_len": max_gen_len, "max_passage_chars": max_passage_chars, "batch_size": batch_size, "seed": seed,
            "decoding": "greedy, the model's chat template, stop at its end-of-turn token", "kept": {}}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info["kept"] = json.load(f)["kept"]
    os.makedirs(out_dir, exist_ok=True)
    for split in splits:
        answered = answer(generator, asked[split], batch_size, max_gen_len, f"answer {split}")
        info["kept"][split] = {"asked": len(asked[split]), "kept": len(answered)}
        atomic_write_text(json.dumps(answered, indent=1, ensure_ascii=False) + "\n", os.path.join(out_dir, f"{split}.json"))
    atomic_write_text(json.dumps(PROMPT, indent=1) + "\n", os.path.join(out_dir, "prompt.json"))
    atomic_write_text(json.dumps(info, indent=1) + "\n", info_path)
    print(json.dumps(info["kept"]))


if __name__ == "__main__":
    run_cli(fire.Fire, main)
