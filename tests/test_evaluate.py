"""Evaluation: answer extraction, perplexity and log-likelihood scoring against by-hand loops, FLOPs
and KV ratios from the routing that happened, results files, and evaluate.py's one-line errors."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dllm.core import flops
from dllm.data import load_records
from dllm.errors import InputError
from dllm.evaluate import Evaluator, Row, Tally, extract_choice, extract_number, numbers_match, write_results
from dllm.generation import Llama
from dllm.core.model import Transformer
from dllm.core.routing import DenseRouting
from dllm.tokenizer import Tokenizer
from helpers import ROOT, free_port, make_generator, randomize, tiny_args, write_demo_like


ALPACA = [
    {"instruction": "Name a fox.", "input": "", "output": "The quick brown fox."},
    {"instruction": "Describe the dog.", "input": "The lazy dog", "output": "It sleeps over the day and jumps over nothing at all."},
    {"instruction": "Count.", "input": "", "output": "48"},
    {"instruction": "Which option is correct?", "input": "A B C D", "output": "A"},
]
PIQA = [
    {"goal": "Clean a grater.", "sol1": "Rub a potato on it.", "sol2": "Rub butter on it.", "label": 0},
    {"goal": "Open a jar.", "sol1": "Tap the lid.", "sol2": "Freeze it for a day first.", "label": 1},
    {"goal": "Dry a phone.", "sol1": "Rice.", "sol2": "Put it in the oven.", "label": 0},
]
GSM8K = [
    {"question": "How many clips?", "answer": "48 + 24 = <<48+24=72>>72\n#### 1,200"},
    {"question": "How many crayons?", "answer": "He has 55.\n#### 55"},
    {"question": "How much?", "answer": "#### 0.75"},
    {"question": "How many dogs?", "answer": "#### 3"},
]


def long_generator(tokenizer_path, seed=3, max_seq_len=512) -> Llama:
    """make_generator with room for the real templates (the tiny tokenizer spends ~150 tokens on
    the Alpaca preamble alone)."""
    tokenizer = Tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    args = tiny_args(vocab_size=tokenizer.n_words, max_seq_len=max_seq_len)
    model = randomize(Transformer(args), seed=seed, router_scale=3.0, lora_b_std=0.1).eval()
    return Llama(model, tokenizer)


def write_dataset(root, name, records, layout=None, train=None):
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "datasets", layout or name, "prompt.json"), directory / "prompt.json")
    (directory / "test.json").write_text(json.dumps(records))
    (directory / "train.json").write_text(json.dumps(train if train is not None else records))
    return root


# ---------------------------------------------------------------- answer extraction


@pytest.mark.parametrize("text, expected", [
    ("The answer is 1,234.5", "1234.5"),
    ("-3", "-3"),
    ("12.", "12"),
    ("0.75 apples", "0.75"),
    ("no number", None),
    ("", None),
    ("First 3, then 4, so the answer is 7.", "7"),
    ("She has 48 clips.\nThe answer is 1,200", "1200"),
    ("It costs $2.50 each", "2.50"),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("predicted, gold, expected", [
    ("12", "12.0", True),
    ("12.0", "12", True),
    ("1200", "1200", True),
    ("0.75", "0.75", True),
    ("-3", "-3", True),
    ("13", "12", False),
    ("12.5", "12", False),
    (None, "12", False),
    ("abc", "12", False),
])
def test_numbers_match(predicted, gold, expected):
    assert numbers_match(predicted, gold) is expected


@pytest.mark.parametrize("text, choices, expected", [
    ("2", ["1", "2"], "2"),
    ("The answer is 1", ["1", "2"], "1"),
    ("12 apples", ["1", "2"], None),  # "12" is no label
    ("3", ["1", "2", "3"], "3"),
    ("4", ["1", "2", "3"], None),
    ("B", ["A", "B", "C", "D"], "B"),
    ("a cat ate the D", ["A", "B", "C", "D"], "D"),  # the article "a" is no answer
    ("b", ["A", "B", "C", "D"], None),
    ("True", ["true", "false"], "true"),
    ("FALSE.", ["true", "false"], "false"),
    ("it is untrue", ["true", "false"], None),  # words, not substrings
    ("nothing here", ["true", "false"], None),
])
def test_extract_choice(text, choices, expected):
    assert extract_choice(text, choices) == expected


# ---------------------------------------------------------------- perplexity and FLOPs


def by_hand_ppl(generator, records):
    """One forward per record: CE over the response tokens (eos included); the routing of every
    token for the FLOPs and KV ratios."""
    model, tok = generator.model, generator.tokenizer
    ce_sum, count, hits, num, den, kept, pairs = 0.0, 0, 0, 0.0, 0.0, 0.0, 0
    for r in records:
        tokens = tok.encode(r.prompt + r.response, bos=True, eos=True)
        start = len(tok.encode(r.prompt, bos=True, eos=False))
        assert start < len(tokens) <= model.params.max_seq_len
        with torch.inference_mode():
            logits, activation = model(torch.tensor([tokens]))
        ce = F.cross_entropy(logits[0, start - 1 : -1], torch.tensor(tokens[start:]), reduction="sum")
        ce_sum += float(ce)
        count += len(tokens) - start
        hits += int((logits[0, start - 1 : -1].argmax(-1) == torch.tensor(tokens[start:])).sum())
        num += flops.forward_flops(model.params, activation, routing=model.routing)
        den += flops.forward_flops(model.params, torch.ones_like(activation))
        kept += float(activation.sum())
        pairs += activation.shape[1] * activation.shape[2]
    return math.exp(ce_sum / count), count, hits / count, num / den, kept / pairs


@pytest.mark.slow
def test_perplexity_equals_by_hand_loop(tmp_path, tokenizer_path):
    root = write_dataset(tmp_path, "alpaca", ALPACA)
    generator = long_generator(tokenizer_path)
    evaluator = Evaluator(generator, batch_size=3, max_gen_len=4, n_shot=0, dataset_path=str(root))
    row, agreement = evaluator.evaluate("alpaca")
    ppl, count, top1, flops_ratio, kv_ratio = by_hand_ppl(generator, load_records(str(root), "alpaca", "test"))
    assert (row.dataset, row.metric, row.n) == ("alpaca", "ppl", count)
    assert row.value == pytest.approx(ppl, rel=1e-4)
    assert (agreement.metric, agreement.n, agreement.flops_ratio) == ("top-1 agreement", count, row.flops_ratio)
    assert agreement.value == pytest.approx(top1, abs=1e-12)
    assert row.flops_ratio == pytest.approx(flops_ratio, rel=1e-9)
    assert row.kv_ratio == pytest.approx(kv_ratio, rel=1e-9)
    assert 0 < row.kv_ratio < 1 and 0 < row.flops_ratio < 1, "random routers skip some tokens"


def test_flops_ratio_dense_routed_and_threshold(tmp_path, tokenizer_path):
    root = write_dataset(tmp_path, "alpaca", ALPACA)
    generator = long_generator(tokenizer_path)

    def ppl_row():
        row, _ = Evaluator(generator, 4, 4, 0, str(root)).evaluate("alpaca")
        return row

    routed = ppl_row()
    generator.model.routing.threshold = 0.3
    low = ppl_row()
    generator.model.routing.threshold = 0.7
    high = ppl_row()
    generator.model.use_routing(DenseRouting())
    dense = ppl_row()
    assert dense.flops_ratio == 1.0 and dense.kv_ratio == 1.0
    assert routed.flops_ratio < 1
    assert high.flops_ratio < routed.flops_ratio < low.flops_ratio
    assert high.kv_ratio < routed.kv_ratio < low.kv_ratio
    assert routed.n == dense.n


def test_ppl_longer_than_max_seq_len_scores_response_or_fails(tmp_path, tokenizer_path):
    """A record longer than max_seq_len must not be scored on prompt tokens: either the response is
    kept (left truncation) or the record is rejected with a one-line error. (make_generator has
    max_seq_len 96; the Alpaca preamble alone is ~150 tiny-tokenizer tokens.)"""
    root = write_dataset(tmp_path, "alpaca", ALPACA[:1])
    generator = make_generator(tokenizer_path)
    record = load_records(str(root), "alpaca", "test")[0]
    tok = generator.tokenizer
    response_tokens = len(tok.encode(record.prompt + record.response, bos=True, eos=True)) - len(tok.encode(record.prompt, bos=True, eos=False))
    assert len(tok.encode(record.prompt, bos=True, eos=False)) > generator.model.params.max_seq_len
    evaluator = Evaluator(generator, 2, 4, 0, str(root))
    try:
        row, _ = evaluator.evaluate("alpaca")
    except InputError as e:
        assert "max_seq_len" in str(e)
        return
    assert row.n == response_tokens, f"scored {row.n} tokens, the response has {response_tokens}"


def test_loglik_longer_than_max_seq_len_scores_options_or_fails(tmp_path, tokenizer_path):
    """The same for option scoring: with the prompt cut at max_seq_len, every option would get the
    score of one prompt token and argmax would always pick the first label (likely with n_shot on
    MMLU, or long BoolQ passages, at max_seq_len 512)."""
    root = write_dataset(tmp_path, "piqa", PIQA[:1])
    generator = make_generator(tokenizer_path)
    record = load_records(str(root), "piqa", "test")[0]
    assert len(generator.tokenizer.encode(record.prompt, bos=True, eos=False)) > generator.model.params.max_seq_len
    evaluator = Evaluator(generator, 2, 2, 0, str(root))
    try:
        scores, counts, _ = evaluator._score([record.prompt] * 2, record.option_texts, Tally())
    except InputError as e:
        assert "max_seq_len" in str(e)
        return
    label_tokens = [len(generator.tokenizer.encode(record.prompt + o, bos=True, eos=True))
                    - len(generator.tokenizer.encode(record.prompt, bos=True, eos=False)) for o in record.option_texts]
    assert counts == label_tokens, f"scored {counts} tokens per option, the options have {label_tokens}"
    assert scores[0] != scores[1]


# ---------------------------------------------------------------- choice and math


@pytest.mark.slow
def test_choice_rows_and_loglik_by_hand(tmp_path, tokenizer_path):
    root = write_dataset(tmp_path, "piqa", PIQA)
    generator = long_generator(tokenizer_path)
    evaluator = Evaluator(generator, batch_size=2, max_gen_len=3, n_shot=0, dataset_path=str(root))
    rows = evaluator.evaluate("piqa")
    assert [(r.dataset, r.metric, r.n) for r in rows] == [("piqa", "acc (generate)", 3), ("piqa", "acc (loglik)", 3)]
    for r in rows:
        assert 0 <= r.value <= 1 and 0 < r.flops_ratio < 1.2 and 0 < r.kv_ratio <= 1

    tok, model = generator.tokenizer, generator.model
    correct = 0
    for record in load_records(str(root), "piqa", "test"):
        scores = []
        for option in record.option_texts:
            tokens = tok.encode(record.prompt + option, bos=True, eos=True)
            start = len(tok.encode(record.prompt, bos=True, eos=False))
            with torch.inference_mode():
                logits, _ = model(torch.tensor([tokens]))
            scores.append(-float(F.cross_entropy(logits[0, start - 1 : -1], torch.tensor(tokens[start:]), reduction="sum")))
        assert abs(scores[0] - scores[1]) > 1e-3, "a tie would make argmax order-dependent"
        correct += record.choices[scores.index(max(scores))] == record.answer
    assert rows[1].value == pytest.approx(correct / 3)


def test_math_runs_and_scores_final_number(tmp_path, tokenizer_path, monkeypatch):
    root = write_dataset(tmp_path, "gsm8k", GSM8K)
    generator = long_generator(tokenizer_path)
    (row,) = Evaluator(generator, 2, 3, 0, str(root)).evaluate("gsm8k")
    assert (row.dataset, row.metric, row.n) == ("gsm8k", "acc (generate)", 4)
    assert 0 <= row.value <= 1 and 0 < row.flops_ratio < 1 and 0 < row.kv_ratio < 1

    answers = {
        "How many clips?": "48 + 24 = 72 ... The answer is 1,200",  # gold "1,200" -> "1200": correct
        "How many crayons?": "The answer is 54",  # wrong
        "How much?": "So it is 0.75.",  # correct
        "How many dogs?": "I do not know",  # no number: wrong
    }

    def fake_generate(self, prompts, tally):
        return [next(text for q, text in answers.items() if q in p) for p in prompts]

    monkeypatch.setattr(Evaluator, "_generate", fake_generate)
    (row,) = Evaluator(generator, 3, 3, 0, str(root)).evaluate("gsm8k")
    assert row.value == pytest.approx(0.5) and row.n == 4


# ---------------------------------------------------------------- output and reproducibility


def test_write_results(tmp_path):
    rows = [Row("alpaca", "ppl", 12.3456, 0.61, 0.58, 40, "tokens"), Row("piqa", "acc (loglik)", 0.5, 0.55, 0.5, 2, "records")]
    out = tmp_path / "nested" / "out"
    write_results(rows, str(out), "D-LLM, 0-shot", {"n_shot": 0})
    data = json.loads((out / "results.json").read_text())
    assert data["provenance"] == {"n_shot": 0} and len(data["rows"]) == 2
    assert data["rows"][0] == {"dataset": "alpaca", "metric": "ppl", "value": 12.3456, "flops_ratio": 0.61,
                               "kv_ratio": 0.58, "n": 40, "n_unit": "tokens"}
    md = (out / "results.md").read_text()
    assert "### D-LLM, 0-shot" in md and "- n_shot: 0" in md
    assert "| alpaca | ppl | 12.35 | 0.610 | 0.580 | 40 tokens |" in md
    assert "| piqa | acc (loglik) | 50.0% | 0.550 | 0.500 | 2 records |" in md
    assert sorted(os.listdir(out)) == ["results.json", "results.md"]  # no temporary files left


@pytest.mark.slow
def test_two_runs_with_the_same_seed_are_identical(tmp_path, tokenizer_path):
    _, base = write_demo_like(tmp_path, tokenizer_path, mp_size=1)
    root = write_dataset(tmp_path / "data", "alpaca", ALPACA[:3])
    write_dataset(root, "piqa", PIQA[:2])
    runs = []
    for _ in range(2):
        generator = Llama.build(str(base), str(tmp_path / "adapter.pth"), str(tmp_path / "args.json"),
                                str(base / "tokenizer.model"), max_seq_len=512, max_batch_size=8, seed=7)
        evaluator = Evaluator(generator, 2, 3, 0, str(root))
        runs.append([r for name in ("alpaca", "piqa") for r in evaluator.evaluate(name)])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 4


def run_evaluate(tmp_path, base, dataset_path, datasets, out, *extra, launcher=()):
    cmd = [sys.executable, *launcher, os.path.join(ROOT, "evaluate.py"), "--llama_ckpt_dir", str(base),
           "--dynamic_ckpt_dir", str(tmp_path / "adapter.pth"), "--model_args_path", str(tmp_path / "args.json"),
           "--tokenizer_path", str(base / "tokenizer.model"), "--dataset_path", str(dataset_path),
           "--datasets", datasets, "--output_dir", str(out), "--batch_size", "2", "--max_gen_len", "3", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


@pytest.mark.slow
def test_evaluate_py_writes_results_and_reports_bad_input(tmp_path, tokenizer_path):
    _, base = write_demo_like(tmp_path, tokenizer_path, mp_size=1)
    data = tmp_path / "data"
    write_dataset(data, "alpaca", ALPACA[:2])
    write_dataset(data, "piqa", PIQA[:2])
    write_dataset(data, "boolq", [])  # empty test split

    out = tmp_path / "ok"
    ok = run_evaluate(tmp_path, base, data, "alpaca,piqa", out)
    assert ok.returncode == 0, ok.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["dataset"], r["metric"]) for r in rows] == [("alpaca", "ppl"), ("alpaca", "top-1 agreement"),
                                                           ("piqa", "acc (generate)"), ("piqa", "acc (loglik)")]
    assert (out / "results.md").read_text().count("\n| ") == 5  # header + 4 rows

    def fails(datasets, *message):
        target = tmp_path / f"out-{datasets.replace(',', '-')}"
        target.mkdir()
        result = run_evaluate(tmp_path, base, data, datasets, target)
        assert result.returncode == 1, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
        for part in message:
            assert part in lines[-1], lines[-1]
        assert os.listdir(target) == [], "nothing may be written on failure"

    fails("nosuch", "--datasets 'nosuch': must be one of")
    fails("alpaca,boolq", os.path.join(str(data), "boolq", "test.json"), "no records")
    # a piqa record whose label names no option: named by file and index
    (data / "piqa" / "test.json").write_text(json.dumps([PIQA[0], dict(PIQA[1], label=5)]))
    fails("piqa", os.path.join(str(data), "piqa", "test.json"), "record 1")


@pytest.mark.slow
def test_data_parallel_evaluation_equals_one_process(tmp_path, tokenizer_path):
    """torchrun with 2 processes on a 1-shard checkpoint: model parallel 1, records split over 2
    data-parallel ranks, sums all-reduced; the table equals the one-process table."""
    _, base = write_demo_like(tmp_path, tokenizer_path, mp_size=1)
    data = tmp_path / "data"
    write_dataset(data, "alpaca", ALPACA[:3])
    write_dataset(data, "piqa", PIQA[:3])
    single = run_evaluate(tmp_path, base, data, "alpaca,piqa", tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()))
    double = run_evaluate(tmp_path, base, data, "alpaca,piqa", tmp_path / "two", launcher=launcher)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("| dataset | metric |") == 1, "the table is printed once, by rank 0"
    one = json.loads((tmp_path / "one" / "results.json").read_text())["rows"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    assert [(r["dataset"], r["metric"], r["n"]) for r in two] == [(r["dataset"], r["metric"], r["n"]) for r in one]
    for a, b in zip(one, two):
        for key in ("value", "flops_ratio", "kv_ratio"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a, b)
