"""Dataset handlers on the shipped samples, the reference's tokenisation masks, and one-line errors."""
import json
import os
import re

import pytest
import torch

from dllm.chat import ChatFormat
from dllm.data import TASKS, InstructionDataset, Record, load_records
from dllm.errors import InputError
from dllm.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(ROOT, "datasets")
LABELS = {"boolq": ["true", "false"], "piqa": ["1", "2"], "siqa": ["1", "2", "3"],
          "obqa": ["A", "B", "C", "D"], "mmlu": ["A", "B", "C", "D"]}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)


CHAT_DATASETS = ("smol",)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", sorted(set(TASKS) - set(CHAT_DATASETS)))
def test_shipped_samples_load(name, split):
    records = load_records(DATASETS, name, split)
    assert len(records) >= 8
    for record in records:
        assert record.prompt.endswith("### Response:\n") and not re.search(r"\{[a-z_]+\}", record.prompt)
        assert record.response.strip()
        metric = TASKS[name].metric
        if metric == "choice":
            assert record.choices == LABELS[name] and record.option_texts == record.choices
            assert record.answer in record.choices and record.response == record.answer
        elif metric == "math":
            float(record.answer)
            assert "," not in record.answer and record.response.endswith(f"The answer is {record.answer}")
        else:
            assert record.choices is None and record.answer is None


def test_handlers_map_fields(tmp_path):
    def one(name, raw, prompt):
        os.makedirs(tmp_path / name, exist_ok=True)
        (tmp_path / name / "prompt.json").write_text(json.dumps(prompt))
        (tmp_path / name / "train.json").write_text(json.dumps([raw]))
        return load_records(str(tmp_path), name, "train")[0]

    gsm = one("gsm8k", {"question": "Q?", "answer": "2 * 3 = <<2*3=6>>6\n3 * 400 = 1,200\n#### 1,200"}, {"prompt": "{question}|"})
    assert gsm == Record("Q?|", "2 * 3 = 6\n3 * 400 = 1,200\nThe answer is 1200", answer="1200")
    mawps = one("mawps", {"instruction": "I", "input": "", "output": "1.5 + 1 = 2.5. The answer is 2.5.", "answer": "2.50"},
                {"prompt_input": "{instruction}/{input}|", "prompt_no_input": "{instruction}|"})
    assert (mawps.prompt, mawps.response, mawps.answer) == ("I|", "1.5 + 1 = 2.5.\nThe answer is 2.50", "2.50")
    assert one("mawps", {"instruction": "I", "input": "x", "output": "", "answer": "-15.0"},
               {"prompt_input": "{instruction}/{input}|", "prompt_no_input": "{instruction}|"}).response == "The answer is -15"
    piqa = one("piqa", {"goal": "G", "sol1": "a", "sol2": "b", "label": 1}, {"prompt": "{goal}\n{options}|"})
    assert piqa == Record("G\n1. a\n2. b|", "2", ["1", "2"], ["1", "2"], "2")
    obqa = one("obqa", {"id": "1", "question_stem": "Q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"},
               {"prompt": "{question}\n{options}|"})
    assert (obqa.prompt, obqa.answer, obqa.choices) == ("Q\nA. x\nB. y|", "B", ["A", "B"])
    mmlu = one("mmlu", {"question": "Q", "subject": "high_school_physics", "choices": ["w", "x", "y", "z"], "answer": 3},
               {"prompt": "{subject}: {question}\n{options}|"})
    assert (mmlu.prompt, mmlu.answer) == ("high school physics: Q\nA. w\nB. x\nC. y\nD. z|", "D")
    boolq = one("boolq", {"question": "q", "passage": "p", "answer": False}, {"prompt": "{passage}/{question}|"})
    assert (boolq.prompt, boolq.response) == ("p/q|", "false")


def dataset_of(tokenizer, records, max_seq_len, seed=0):
    return InstructionDataset(records, tokenizer, max_seq_len, seed)


def test_masks_prompt_padding_and_eos(tokenizer):
    record = Record(prompt="Question: Which option is correct?\nAnswer: ", response="A B C")
    prompt = tokenizer.encode(record.prompt, bos=True, eos=False)
    full = tokenizer.encode(record.prompt + record.response, bos=True, eos=True)
    example, labels, example_mask, label_mask = dataset_of(tokenizer, [record], 64)[0]
    n, p = len(full), len(prompt)
    assert example.shape == labels.shape == example_mask.shape == label_mask.shape == (64,)
    assert example.dtype == labels.dtype == torch.int64 and label_mask.dtype == torch.float32
    assert example[:n].tolist() == full and example[n:].eq(0).all()
    assert example_mask[:n].eq(1).all() and example_mask[n:].eq(0).all()
    assert label_mask[:p].eq(0).all() and label_mask[p:n].eq(1).all() and label_mask[n:].eq(0).all()
    assert labels[:p].eq(0).all() and labels[p:n].tolist() == full[p:] and labels[n - 1] == tokenizer.eos_id


def test_truncation_keeps_a_response_token_and_is_seeded(tokenizer):
    long_prompt = Record(prompt="The quick brown fox jumps over the lazy dog. " * 8, response="She sold 48 clips.")
    long_response = Record(prompt="Question: ", response="The quick brown fox jumps over the lazy dog. " * 8)
    records = [long_prompt, long_response] * 20
    dataset = dataset_of(tokenizer, records, 16)
    for i, record in enumerate(records):
        example, labels, example_mask, label_mask = dataset[i]
        full = tokenizer.encode(record.prompt + record.response, bos=True, eos=True)
        assert example.shape == (16,) and example_mask.eq(1).all()
        assert any(full[start : start + 16] == example.tolist() for start in range(len(full) - 15))
        assert label_mask.sum() >= 1 and labels[label_mask.eq(0)].eq(0).all()
    starts = {tuple(dataset[i][0].tolist()) for i in range(1, len(records), 2)}
    assert len(starts) > 1, "crops should vary across records"
    assert all(torch.equal(a, b) for a, b in zip(dataset[3], dataset_of(tokenizer, records, 16)[3]))
    assert not all(torch.equal(dataset_of(tokenizer, records, 16, seed=s)[1][0], dataset[1][0]) for s in range(1, 6))


def write_dataset(root, name, prompt, records):
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "prompt.json").write_text(prompt if isinstance(prompt, str) else json.dumps(prompt))
    (directory / "train.json").write_text(records if isinstance(records, str) else json.dumps(records))
    return str(directory / "train.json")


PIQA_PROMPT = {"prompt": "{goal}\n{options}"}
PIQA = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(InputError, match=r"unknown dataset 'squad'; known: alpaca, boolq, demo, gsm8k"):
        load_records(DATASETS, "squad", "train")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match=r"file not found: .*piqa/prompt\.json"):
        load_records(str(tmp_path), "piqa", "train")
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "prompt.json").write_text(json.dumps(PIQA_PROMPT))
    with pytest.raises(InputError, match=r"file not found: .*piqa/test\.json"):
        load_records(str(tmp_path), "piqa", "test")


def test_invalid_json_names_the_path(tmp_path):
    path = write_dataset(tmp_path, "piqa", PIQA_PROMPT, '[{"goal": "g",')
    with pytest.raises(InputError, match=rf"{path}: invalid JSON"):
        load_records(str(tmp_path), "piqa", "train")


@pytest.mark.parametrize("record, problem", [
    ({k: v for k, v in PIQA.items() if k != "sol2"}, "missing field 'sol2'"),
    ({**PIQA, "label": 2}, "field 'label' = 2 names none of the options"),
    ({**PIQA, "goal": 5}, "field 'goal' must be a string"),
    ("not an object", "expected a JSON object"),
])
def test_malformed_record_names_file_index_and_field(tmp_path, record, problem):
    path = write_dataset(tmp_path, "piqa", PIQA_PROMPT, [PIQA, PIQA, PIQA, record])
    with pytest.raises(InputError, match=rf"^{path}: record 3: {problem}"):
        load_records(str(tmp_path), "piqa", "train")


@pytest.mark.parametrize("name, record, problem", [
    ("obqa", {"question_stem": "q", "choices": {"text": ["x"]}, "answerKey": "A"}, "missing field 'choices.label'"),
    ("gsm8k", {"question": "q", "answer": "no marker"}, "field 'answer' has no '#### N' final line"),
    ("gsm8k", {"question": "q", "answer": "#### many"}, "field 'answer' is not a number"),
    ("boolq", {"question": "q", "passage": "p", "answer": "yes"}, "field 'answer' = 'yes' names none"),
])
def test_malformed_record_per_handler(tmp_path, name, record, problem):
    path = write_dataset(tmp_path, name, {"prompt": "{options}"}, [record])
    with pytest.raises(InputError, match=rf"^{path}: record 0: {problem}"):
        load_records(str(tmp_path), name, "train")


def test_empty_split(tmp_path):
    path = write_dataset(tmp_path, "piqa", PIQA_PROMPT, [])
    with pytest.raises(InputError, match=rf"^{path}: no records$"):
        load_records(str(tmp_path), "piqa", "train")


def test_template_with_unknown_field(tmp_path):
    write_dataset(tmp_path, "piqa", {"prompt": "{goal} {colour}"}, [PIQA])
    with pytest.raises(InputError, match=r"prompt\.json: template 'prompt' cannot be filled: KeyError 'colour'"):
        load_records(str(tmp_path), "piqa", "train")


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_chat_dataset_prompts_are_the_models_chat_prompts(split, smollm2_tokenizer_dir):
    """datasets/smol ("format": "chat"): each prompt encodes to exactly what chat_completion sends."""
    tokenizer = Tokenizer(smollm2_tokenizer_dir)
    chat = ChatFormat(tokenizer)
    raws = json.load(open(os.path.join(DATASETS, "smol", f"{split}.json")))
    records = load_records(DATASETS, "smol", split, chat)
    assert len(records) == len(raws) >= 100
    for raw, record in zip(raws[:50], records[:50]):
        user = f"{raw['instruction']}\n\n{raw['input']}" if raw["input"] else raw["instruction"]
        assert tokenizer.encode(record.prompt, bos=True, eos=False) == chat.encode_dialog([{"role": "user", "content": user}])
        assert record.response == raw["output"]


def _raw(name: str, split: str) -> list:
    with open(os.path.join(DATASETS, name, f"{split}.json")) as f:
        return json.load(f)


def _passage_lines(records: list) -> set:
    return {line.strip() for r in records for line in r["input"].splitlines() if len(line.strip()) > 40}


@pytest.mark.parametrize("name", ["demo", "smol"])
def test_validation_shares_no_passage_with_train_or_test(name):
    """Cut from other documents: no long line of a validation passage appears in a train or test one."""
    validation = _passage_lines(_raw(name, "validation"))
    assert len(validation) >= 50
    assert not validation & (_passage_lines(_raw(name, "train")) | _passage_lines(_raw(name, "test")))


def test_smol_validation_questions_use_fill_values_of_their_own():
    questions = {split: {r["instruction"] for r in _raw("smol", split) if not r["input"]}
                 for split in ("train", "validation", "test")}
    assert len(questions["validation"]) >= 30
    assert not questions["validation"] & (questions["train"] | questions["test"])
    operands = {split: {int(n) for q in qs if q.startswith("What is ") for n in re.findall(r"\d+", q)}
                for split, qs in questions.items()}
    assert min(operands["validation"]) >= 100 > max(operands["train"] | operands["test"])


def test_chat_dataset_needs_a_chat_template(tokenizer):
    with pytest.raises(InputError, match="a chat-format dataset needs a model whose tokenizer has a chat template"):
        load_records(DATASETS, "smol", "test", ChatFormat(tokenizer))
