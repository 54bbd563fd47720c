"""Instruction datasets for the paper's benchmarks, in the reference repo's layout.

`datasets/NAME/{train,validation,test,prompt}.json`: the splits are JSON lists of records in the
field layout of each benchmark's public release (validation.json is ours and optional: training
validates on it, else on test.json); `prompt.json` holds the Alpaca-style templates. One
handler per dataset maps a raw record to a `Record` (prompt text, target response, and for
evaluation the options and the gold answer).

Response formats (what the model is trained to produce, and what answer extraction parses):
- alpaca, demo, smol: the record's `output`; samsum: the `summary`. Scored by perplexity.
- gsm8k, mawps: the worked solution, then a last line `The answer is N`, so the response ends
  with the final number. N is the gold number normalised: commas dropped, a float with an integral
  value written as an integer ("1,200" -> "1200", "12.0" -> "12", "0.75" stays). Extract the last
  number of the generation, drop commas, and compare as floats.
- boolq, piqa, siqa, obqa, mmlu: the bare option label and nothing else: "true"/"false" (boolq),
  "1"/"2" (piqa), "1"/"2"/"3" (siqa), "A".."D" (obqa, mmlu). `option_texts` are those same labels,
  so log-likelihood scoring compares the labels the model was trained to emit.

Templates end with "### Response:\n" (the reference ends at the colon): a newline falls back to a
byte token in Llama-style tokenizers, so the prompt's tokens stay a prefix of the example's tokens
and masking the first len(prompt) tokens masks exactly the prompt.
"""
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from dllm.errors import InputError

SPLITS = ("train", "validation", "test")


def validation_split(dataset_path: str, name: str) -> str:
    """The split choices are made on: `validation.json` where the dataset has one; else `test.json`
    (the reference's layout has no validation split), which the caller must say aloud."""
    return "validation" if os.path.isfile(os.path.join(dataset_path, name, "validation.json")) else "test"


@dataclass
class Record:
    prompt: str  # the dataset's prompt.json template filled in
    response: str  # the target the model is trained to produce
    choices: Optional[List[str]] = None  # choice tasks: the option labels in order
    option_texts: Optional[List[str]] = None  # choice tasks: the response text of each option
    answer: Optional[str] = None  # gold: a label from `choices`, or the normalised final number


class RecordError(ValueError):
    """A malformed raw record; `load_records` adds the file and the record index."""


# the paper's prompt (Alpaca's, as datasets/alpaca/prompt.json holds it)
ALPACA_TEMPLATES = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}


class Templates:
    """The templates of one prompt.json; a template naming an unknown field is the file's fault.

    A prompt.json with `"format": "chat"` fills the user's message with its templates and wraps it
    in the model's own chat template (`chat`, a ChatFormat), so a chat model is fine-tuned and
    evaluated on exactly the prompts it answers in chat.
    """

    def __init__(self, path: str, templates: Dict[str, str], chat=None):
        self.path = path
        self.templates = templates
        self.chat = chat
        if self.is_chat and (chat is None or chat.template is None):
            raise InputError(f"{path}: a chat-format dataset needs a model whose tokenizer has a chat template")

    @property
    def is_chat(self) -> bool:
        return self.templates.get("format") == "chat"

    def wrap(self, text: str) -> str:
        """The prompt the model sees: the filled text, or for chat datasets that text as a user turn."""
        if not self.is_chat:
            return text
        return self.chat.render([{"role": "user", "content": text}], add_generation_prompt=True)

    def fill(self, key: str, **fields) -> str:
        if key not in self.templates:
            raise InputError(f"{self.path}: missing template {key!r}")
        try:
            return self.templates[key].format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise InputError(f"{self.path}: template {key!r} cannot be filled: {type(e).__name__} {e}") from None


def field(raw: dict, name: str):
    """raw[name]; a dotted name reaches into nested objects ("choices.text")."""
    value = raw
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RecordError(f"missing field {name!r}")
        value = value[part]
    return value


def text_field(raw: dict, name: str) -> str:
    value = field(raw, name)
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def normalise_number(text: str, name: str) -> str:
    """The canonical string of a gold number (see the module docstring)."""
    cleaned = str(text).strip().replace(",", "")
    try:
        value = float(cleaned)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RecordError(f"field {name!r} is not a number: {text!r}")
    return str(int(value)) if value.is_integer() else cleaned


def instruction_prompt(templates: Templates, instruction: str, input_text: str) -> str:
    """Alpaca's rule: the with-input template only when the input is non-empty."""
    if input_text.strip():
        return templates.wrap(templates.fill("prompt_input", instruction=instruction, input=input_text))
    return templates.wrap(templates.fill("prompt_no_input", instruction=instruction))


def math_response(solution: str, answer: str) -> str:
    solution = solution.strip()
    return f"{solution}\nThe answer is {answer}" if solution else f"The answer is {answer}"


def indexed_label(labels: List[str], value) -> Optional[str]:
    """labels[value] for an integer index in range, else None (bool is not an index)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return labels[value]
    return None


def choice_record(templates: Templates, raw: dict, gold_field: str, labels: List[str], gold: Optional[str],
                  options: Optional[List[str]] = None, **fields) -> Record:
    """Shared by the choice tasks: options are listed as "LABEL. text" lines in {options}."""
    if gold not in labels:
        raise RecordError(f"field {gold_field!r} = {field(raw, gold_field)!r} names none of the options {labels}")
    listed = "\n".join(f"{label}. {text}" for label, text in zip(labels, options or []))
    prompt = templates.fill("prompt", options=listed, **fields)
    return Record(prompt=prompt, response=gold, choices=list(labels), option_texts=list(labels), answer=gold)


def alpaca_record(raw: dict, templates: Templates) -> Record:
    prompt = instruction_prompt(templates, text_field(raw, "instruction"), text_field(raw, "input"))
    return Record(prompt=prompt, response=text_field(raw, "output"))


def samsum_record(raw: dict, templates: Templates) -> Record:
    return Record(prompt=templates.fill("prompt", dialogue=text_field(raw, "dialogue")),
                  response=text_field(raw, "summary"))


def gsm8k_record(raw: dict, templates: Templates) -> Record:
    """GSM8K's answer is the solution, calculator notes <<...>>, and a last line `#### N`."""
    solution, marker, final = text_field(raw, "answer").rpartition("####")
    if not marker:
        raise RecordError("field 'answer' has no '#### N' final line")
    answer = normalise_number(final, "answer")
    solution = re.sub(r"<<[^>]*>>", "", solution)
    return Record(prompt=templates.fill("prompt", question=text_field(raw, "question")),
                  response=math_response(solution, answer), answer=answer)


def mawps_record(raw: dict, templates: Templates) -> Record:
    """LLM-Adapters layout: `output` is the worked solution (empty in test sets); a trailing
    "The answer is ..." sentence in it is replaced by the normalised answer line."""
    answer = normalise_number(field(raw, "answer"), "answer")
    solution = re.sub(r"\s*The answer is[^\n]*$", "", text_field(raw, "output").strip())
    prompt = instruction_prompt(templates, text_field(raw, "instruction"), text_field(raw, "input"))
    return Record(prompt=prompt, response=math_response(solution, answer), answer=answer)


def boolq_record(raw: dict, templates: Templates) -> Record:
    answer = field(raw, "answer")
    gold = ("true" if answer else "false") if isinstance(answer, bool) else None
    return choice_record(templates, raw, "answer", ["true", "false"], gold,
                         question=text_field(raw, "question"), passage=text_field(raw, "passage"))


def piqa_record(raw: dict, templates: Templates) -> Record:
    labels = ["1", "2"]
    return choice_record(templates, raw, "label", labels, indexed_label(labels, field(raw, "label")),
                         options=[text_field(raw, "sol1"), text_field(raw, "sol2")], goal=text_field(raw, "goal"))


def siqa_record(raw: dict, templates: Templates) -> Record:
    options = [text_field(raw, name) for name in ("answerA", "answerB", "answerC")]
    return choice_record(templates, raw, "label", ["1", "2", "3"], str(field(raw, "label")).strip(), options=options,
                         context=text_field(raw, "context"), question=text_field(raw, "question"))


def obqa_record(raw: dict, templates: Templates) -> Record:
    texts, labels = field(raw, "choices.text"), field(raw, "choices.label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or not labels:
        raise RecordError("fields 'choices.text' and 'choices.label' must be lists of the same non-zero length")
    return choice_record(templates, raw, "answerKey", [str(label) for label in labels], field(raw, "answerKey"),
                         options=texts, question=text_field(raw, "question_stem"))


def mmlu_record(raw: dict, templates: Templates) -> Record:
    options = field(raw, "choices")
    if not isinstance(options, list) or len(options) != 4:
        raise RecordError("field 'choices' must be a list of 4 strings")
    labels = ["A", "B", "C", "D"]
    return choice_record(templates, raw, "answer", labels, indexed_label(labels, field(raw, "answer")),
                         options=options, question=text_field(raw, "question"),
                         subject=text_field(raw, "subject").replace("_", " "))


@dataclass(frozen=True)
class Task:
    """A dataset the code knows: how a raw record becomes a Record, and how evaluation scores it
    ("ppl": perplexity of the response, "math": the final number, "choice": the option label)."""

    handler: Callable[[dict, Templates], Record]
    metric: str


# the one registry of dataset names: training, evaluate.py's --datasets and the evaluator read it
TASKS: Dict[str, Task] = {
    "alpaca": Task(alpaca_record, "ppl"), "demo": Task(alpaca_record, "ppl"), "smol": Task(alpaca_record, "ppl"),
    "samsum": Task(samsum_record, "ppl"), "gsm8k": Task(gsm8k_record, "math"), "mawps": Task(mawps_record, "math"),
    "boolq": Task(boolq_record, "choice"), "piqa": Task(piqa_record, "choice"), "siqa": Task(siqa_record, "choice"),
    "obqa": Task(obqa_record, "choice"), "mmlu": Task(mmlu_record, "choice"),
}


def task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def check_text(value, where: str = ""):
    """Every string in a parsed JSON value must be valid Unicode: JSON's \\ud800 escapes parse to a
    lone surrogate that no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RecordError(f"field {where or 'value'!r} holds a lone surrogate {value[e.start]!r} at character "
                              f"{e.start} (not valid Unicode text)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{where}[{i}]")


def read_json(path: str):
    if not os.path.isfile(path):
        raise InputError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid JSON: {e}") from None


def read_templates(path: str) -> Dict[str, str]:
    """A prompt.json: a JSON object of template strings."""
    templates = read_json(path)
    if not isinstance(templates, dict) or not all(isinstance(t, str) for t in templates.values()):
        raise InputError(f"{path}: expected a JSON object of template strings")
    try:
        check_text(templates)
    except RecordError as e:
        raise InputError(f"{path}: {e}") from None
    return templates


def load_records(dataset_path: str, name: str, split: str, chat=None) -> List[Record]:
    """The records of `dataset_path/name/split.json`, prompts filled from `prompt.json` (and put in
    the model's chat template by `chat`, a ChatFormat, where prompt.json says "format": "chat")."""
    handler = task(name).handler
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    prompt_path = os.path.join(dataset_path, name, "prompt.json")
    templates = read_templates(prompt_path)
    path = os.path.join(dataset_path, name, f"{split}.json")
    raws = read_json(path)
    if not isinstance(raws, list):
        raise InputError(f"{path}: expected a JSON list of records")
    if not raws:
        raise InputError(f"{path}: no records")
    templates, records = Templates(prompt_path, templates, chat), []
    for index, raw in enumerate(raws):
        try:
            if not isinstance(raw, dict):
                raise RecordError(f"expected a JSON object, got {type(raw).__name__}")
            check_text(raw)
            records.append(handler(raw, templates))
        except RecordError as e:
            raise InputError(f"{path}: record {index}: {e}") from None
    return records


class InstructionDataset(torch.utils.data.Dataset):
    """(example, labels, example_mask, label_mask), each [max_seq_len], as the reference builds them.

    example = bos + prompt + response + eos (encoded as one string); labels = example with the
    prompt's tokens (its length encoded alone, with bos) zeroed; example_mask is 1 on real tokens,
    label_mask 1 on response tokens including eos; padding is 0 everywhere.

    Truncation (reference rule, "random"): an example longer than max_seq_len is cut to the window
    [start, start + max_seq_len), start drawn uniformly from [max(0, P - max_seq_len + 1), L - max_seq_len]
    (L tokens, P prompt tokens), so the window always holds at least one response token; the window
    may drop bos and eos. The draw comes from (seed, index): the same crop every time unless the
    caller changes `seed` (e.g. per epoch), unlike the reference's global numpy state.
    """

    def __init__(self, records: List[Record], tokenizer, max_seq_len: int, seed: int = 0):
        if max_seq_len < 1:
            raise InputError(f"max_seq_len must be positive, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.examples: List[torch.Tensor] = []
        self.prompt_lengths: List[int] = []
        for record in records:
            prompt = tokenizer.encode(record.prompt, bos=True, eos=False)
            example = tokenizer.encode(record.prompt + record.response, bos=True, eos=True)
            self.examples.append(torch.tensor(example, dtype=torch.int64))
            # eos stays a target even if the tokenizer merged the prompt's end into the response
            self.prompt_lengths.append(min(len(prompt), len(example) - 1))

    @classmethod
    def from_tokens(cls, examples: List[List[int]], prompt_lengths: List[int], max_seq_len: int) -> "InstructionDataset":
        """Examples already tokenised, each with its prompt's length: a generation's prompt and answer as
        it fed them, so the tokens are the ones it ran, not a re-encoding of its text."""
        dataset = cls([], None, max_seq_len)
        dataset.examples = [torch.tensor(example, dtype=torch.int64) for example in examples]
        dataset.prompt_lengths = [min(n, len(example) - 1) for n, example in zip(prompt_lengths, examples)]
        return dataset

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        example, prompt_length, max_len = self.examples[i], self.prompt_lengths[i], self.max_seq_len
        label_mask = torch.arange(len(example)) >= prompt_length
        if len(example) > max_len:
            rng = np.random.default_rng([self.seed, i])
            start = int(rng.integers(max(0, prompt_length - max_len + 1), len(example) - max_len + 1))
            example, label_mask = example[start : start + max_len], label_mask[start : start + max_len]
        padding = max_len - len(example)
        example_mask = torch.cat([torch.ones(len(example)), torch.zeros(padding)])
        label_mask = torch.cat([label_mask.float(), torch.zeros(padding)])
        example = torch.cat([example, torch.zeros(padding, dtype=torch.int64)])
        labels = example * label_mask.long()
        return example, labels, example_mask, label_mask
