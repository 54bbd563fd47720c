"""Build `datasets/demo`: a generated "continue the passage" instruction set for the demo model.

What it is: not a benchmark. Llama-2 and the paper's datasets cannot be downloaded here, so the
demo model (trained from scratch on the King James Bible and Shakespeare, tools/corpus.py) gets
an instruction set cut from that same text: the input is one to four consecutive lines or verses,
the output is the line(s) that follow. Records come from the corpus's train documents for
train.json and from its held-out documents for test.json, so test passages were never seen in
training; the text style was. validation.json comes from training documents that no train.json
record was cut from (one hash bucket of them, as for datasets/smol): disjoint from both by
document, but the demo base model was pretrained on those documents, so validation perplexity runs
lower than test perplexity; it is for choosing recipes, not for reporting. The target is memorised public-domain text, so scores measure how
well a small model continues familiar prose and verse, nothing about reasoning.

Lengths: input + output stay within `max_chars` characters (default 280); with the demo's short
Alpaca-style template the whole example is at most about 350 characters. Measured with a 4k BPE
tokenizer trained on the corpus: mean about 88 tokens, 99.5% within 128 (rare names and archaic
words run longer, up to about 145; the dataset's truncation cuts those). The output is at least `min_output_chars` long, so a bare speaker name ("PERDITA.")
is never a whole target. Same seed, same files.

    python -m tools.build_demo_dataset --out_dir datasets/demo
"""
import json
import os
import random
from typing import Dict, List, Optional, Set

import fire

from dllm.errors import run_cli
from tools.corpus import load_corpus, validation_documents

INSTRUCTION = "Continue the passage."
# Alpaca's layout without its preamble: the demo model's context is short
PROMPTS = {
    "prompt_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "prompt_no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
}


def cut_passage(lines: List[str], split: int, max_input_lines: int, max_chars: int,
                min_output_chars: int) -> Optional[Dict[str, str]]:
    """Output = lines from `split` until min_output_chars; input = as many lines before it as fit."""
    end = split
    while end < len(lines) and len("\n".join(lines[split:end])) < min_output_chars:
        end += 1
    output = "\n".join(lines[split:end])
    if len(output) < min_output_chars:
        return None
    start = split
    while (start > 0 and split - start < max_input_lines
           and len("\n".join(lines[start - 1 : split])) + len(output) <= max_chars):
        start -= 1
    if start == split:
        return None
    return {"instruction": INSTRUCTION, "input": "\n".join(lines[start:split]), "output": output}


def sample_records(documents: List[str], count: int, rng: random.Random, max_chars: int,
                   min_output_chars: int, used: Optional[Set[int]] = None) -> List[Dict[str, str]]:
    """`count` distinct passages (repeated verses are kept once): a random document and split point;
    the index of each document a record is cut from goes into `used`."""
    documents = [[line.strip() for line in doc.split("\n") if line.strip()] for doc in documents]
    records, seen = [], set()
    for _ in range(count * 20):
        if len(records) == count:
            break
        doc = rng.randrange(len(documents))
        lines = documents[doc]
        if len(lines) < 2:
            continue
        split = rng.randrange(1, len(lines))
        record = cut_passage(lines, split, rng.randint(1, 4), max_chars, min_output_chars)
        if record is not None and (record["input"], record["output"]) not in seen:
            seen.add((record["input"], record["output"]))
            records.append(record)
            if used is not None:
                used.add(doc)
    return records


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main(out_dir: str = "datasets/demo", train_records: int = 4000, validation_records: int = 200,
         test_records: int = 200, max_chars: int = 280, min_output_chars: int = 30, seed: int = 0):
    train_docs, heldout_docs = load_corpus()
    used = set()
    train = sample_records(train_docs, train_records, random.Random(f"{seed}-train"), max_chars, min_output_chars, used)
    test = sample_records(heldout_docs, test_records, random.Random(f"{seed}-test"), max_chars, min_output_chars)
    validation = sample_records(validation_documents(train_docs, used), validation_records,
                                random.Random(f"{seed}-validation"), max_chars, min_output_chars)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "train.json"), train)
    write_json(os.path.join(out_dir, "validation.json"), validation)
    write_json(os.path.join(out_dir, "test.json"), test)
    write_json(os.path.join(out_dir, "prompt.json"), PROMPTS)
    print(f"{out_dir}: {len(train)} train, {len(validation)} validation and {len(test)} test records")


if __name__ == "__main__":
    fire.Fire(lambda **kwargs: run_cli(main, **kwargs))
