"""Bad inputs and faults against example.py, evaluate.py and the library's inference side: each case
exits non-zero with one clear last line and no traceback, and leaves every file of the workspace
(base model, adapter, datasets, earlier results) as it was. Cases marked `before_model` must fail
before any weights load. The scripts' main runs in process under run_cli, as `python script.py` runs it.
"""
import json
import os
import shutil

import pytest
import torch

from dllm import errors
from dllm.checkpoints import adapters, base_model
from dllm.atomic_io import atomic_save
from dllm.errors import InputError, run_cli
from dllm.generation import Llama
from dllm.core.model import Transformer
from helpers import BASE, ROOT, load_script, make_base, make_dataset, tiny_args

EXAMPLE = load_script("example.py")
EVALUATE = load_script("evaluate.py")
ADAPTER_ARGS = dict(BASE, lora_rank=4, dynamic_router_hdim=16, dynamic_start_layer=1, dynamic_reserve_initials=3)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer_path):
    """A tiny base model, an adapter directory as fine-tuning writes it, a dataset, earlier results."""
    root = tmp_path_factory.mktemp("bad_inputs")
    base = make_base(str(root / "base"), tokenizer_path)[1]
    data = make_dataset(str(root / "data"))
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = Transformer(tiny_args(**ADAPTER_ARGS))
    args = model.params.to_dict()
    atomic_save({"epoch": 1, "model": adapters.adapter_state_dict(model), "model_args": args},
                str(run / "checkpoint-last.pth"))
    (run / "params.json").write_text(json.dumps(args))
    (root / "results").mkdir()
    (root / "results" / "results.json").write_text('{"rows": []}\n')
    (root / "results" / "results.md").write_text("earlier table\n")
    (root / "blocker").write_text("a file where a directory is wanted\n")
    (root / "text_tokenizer").mkdir()
    (root / "text_tokenizer" / "tokenizer.model").write_text("this is a text file, not a SentencePiece model\n")
    (root / "empty_dir").mkdir()
    conflicting = dict(args, dynamic_reserve_initials=2)
    (root / "conflicting.json").write_text(json.dumps(conflicting))
    (root / "garbage.pth").write_bytes(b"\x00\x01 not a checkpoint")
    return {"root": root, "base": base, "data": data, "run": str(run)}


def snapshot(root) -> dict:
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def example_argv(ws, *extra):
    return ["--llama_ckpt_dir", ws["base"], "--dynamic_ckpt_dir", ws["run"], "--max_gen_len", "2",
            "--prompt_path", os.path.join(ROOT, "datasets", "demo", "prompt.json"), *extra]


def evaluate_argv(ws, *extra, output_dir=None):
    return ["--llama_ckpt_dir", ws["base"], "--dynamic_ckpt_dir", ws["run"], "--dataset_path", ws["data"],
            "--datasets", "demo", "--output_dir", output_dir or str(ws["root"] / "fresh"), "--batch_size", "4",
            "--max_gen_len", "2", *extra]


def with_data(ws, name, records=None, train=None, text=None):
    """A copy of the demo dataset under another root whose test split is `records` (or raw `text`)."""
    data = ws["root"] / f"data_{name}"
    if not data.exists():
        shutil.copytree(os.path.join(ws["data"], "demo"), data / "demo")
        if text is not None:
            (data / "demo" / "test.json").write_text(text)
        elif records is None:
            os.remove(data / "demo" / "test.json")
        else:
            (data / "demo" / "test.json").write_text(json.dumps(records))
        if train is not None:
            (data / "demo" / "train.json").write_text(json.dumps(train))
    return str(data)


RECORD = {"instruction": "Continue the passage.", "input": "the quick", "output": "brown fox"}

# (id, script, argv(ws), exit code, parts of the last line, fails before the model loads)
CASES = [
    ("example-misspelled-flag", EXAMPLE, lambda ws: example_argv(ws, "--tempreature", "0"), 2,
     ["unrecognized arguments: --tempreature"], True),
    ("example-abbreviated-flag", EXAMPLE, lambda ws: example_argv(ws, "--temp", "0"), 2, ["--temp"], True),
    ("example-not-a-number", EXAMPLE, lambda ws: example_argv(ws, "--max_gen_len", "ten"), 2,
     ["--max_gen_len", "expected an integer, got 'ten'"], True),
    ("example-negative-temperature", EXAMPLE, lambda ws: example_argv(ws, "--temperature", "-0.5"), 1,
     ["--temperature -0.5: must be >= 0.0"], True),
    ("example-top-p-zero", EXAMPLE, lambda ws: example_argv(ws, "--top_p", "0"), 1, ["--top_p 0.0: must be > 0.0 and <= 1.0"], True),
    ("example-top-p-above-one", EXAMPLE, lambda ws: example_argv(ws, "--top_p", "1.5"), 1, ["--top_p 1.5"], True),
    ("example-max-gen-len-zero", EXAMPLE, lambda ws: example_argv(ws, "--max_gen_len", "0"), 1, ["--max_gen_len 0: must be >= 1"], True),
    ("example-batch-size-zero", EXAMPLE, lambda ws: example_argv(ws, "--max_batch_size", "0"), 1, ["--max_batch_size 0: must be >= 1"], True),
    ("example-threshold-above-one", EXAMPLE, lambda ws: example_argv(ws, "--execute_threshold", "1.5"), 1,
     ["--execute_threshold 1.5: must be >= 0.0 and <= 1.0"], True),
    ("example-inputs-count", EXAMPLE, lambda ws: example_argv(ws, "--instructs", "['a', 'b']", "--inputs", "['x']"), 1,
     ["--inputs has 1 entries for 2 --instructs"], True),
    ("example-no-instruction", EXAMPLE, lambda ws: example_argv(ws, "--instructs", "[]"), 1, ["--instructs: no instruction"], True),
    ("example-undecodable-argv", EXAMPLE, lambda ws: example_argv(ws, "--instructs", "caf\udce9"), 1,
     ["--instructs[0]", "lone surrogate"], True),
    ("example-missing-adapter", EXAMPLE, lambda ws: example_argv(ws, "--dynamic_ckpt_dir", str(ws["root"] / "nope.pth")), 1,
     ["adapter checkpoint not found", "nope.pth"], True),
    ("example-adapter-dir-without-checkpoint", EXAMPLE,
     lambda ws: example_argv(ws, "--dynamic_ckpt_dir", str(ws["root"] / "empty_dir")), 1, ["no adapter checkpoint (*.pth) in"], True),
    ("example-adapter-not-a-checkpoint", EXAMPLE,
     lambda ws: example_argv(ws, "--dynamic_ckpt_dir", str(ws["root"] / "garbage.pth")), 1, ["garbage.pth", "not a"], True),
    ("example-conflicting-model-args", EXAMPLE,
     lambda ws: example_argv(ws, "--model_args_path", str(ws["root"] / "conflicting.json")), 1,
     ["conflicting.json conflicts with the adapter's own model args in", "checkpoint-last.pth",
      "dynamic_reserve_initials 2 vs 3"], True),
    ("example-missing-prompt-file", EXAMPLE, lambda ws: example_argv(ws, "--prompt_path", str(ws["root"] / "none.json")), 1,
     ["file not found", "none.json"], True),
    ("example-prompt-json-not-templates", EXAMPLE,
     lambda ws: example_argv(ws, "--prompt_path", os.path.join(ws["data"], "demo", "test.json")), 1,
     ["test.json: expected a JSON object of template strings"], True),
    ("example-text-tokenizer-model", EXAMPLE,
     lambda ws: example_argv(ws, "--tokenizer_path", str(ws["root"] / "text_tokenizer")), 1,
     ["tokenizer.model: not a SentencePiece model"], True),
    ("example-missing-base", EXAMPLE, lambda ws: example_argv(ws, "--llama_ckpt_dir", str(ws["root"] / "no_base")), 1,
     ["no_base"], True),
    ("example-model-parallel-beyond-world", EXAMPLE, lambda ws: example_argv(ws, "--model_parallel_size", "2"), 1,
     ["model", "parallel", "2"], True),
    ("example-more-prompts-than-batch", EXAMPLE,
     lambda ws: example_argv(ws, "--max_batch_size", "1", "--instructs", "['a', 'b']"), 1, ["2 prompts but max_batch_size is 1"], False),
    ("example-html-blocked", EXAMPLE, lambda ws: example_argv(ws, "--instructs", "['a']", "--html", str(ws["root"] / "blocker" / "x.html")), 1,
     ["--html", "blocker is a file, not a directory"], True),
    ("evaluate-misspelled-flag", EVALUATE, lambda ws: evaluate_argv(ws, "--dnese"), 2, ["unrecognized arguments: --dnese"], True),
    ("evaluate-negative-n-shot", EVALUATE, lambda ws: evaluate_argv(ws, "--n_shot", "-1"), 1, ["--n_shot -1: must be >= 0"], True),
    ("evaluate-batch-size-zero", EVALUATE, lambda ws: evaluate_argv(ws, "--batch_size", "0"), 1, ["--batch_size 0: must be >= 1"], True),
    ("evaluate-threshold-negative", EVALUATE, lambda ws: evaluate_argv(ws, "--execute_threshold", "-0.1"), 1,
     ["--execute_threshold -0.1: must be >= 0.0 and <= 1.0"], True),
    ("evaluate-max-gen-len-zero", EVALUATE, lambda ws: evaluate_argv(ws, "--max_gen_len", "0"), 1, ["--max_gen_len 0: must be >= 1"], True),
    ("evaluate-unknown-dataset", EVALUATE, lambda ws: evaluate_argv(ws, "--datasets", "demo,nosuch"), 1,
     ["--datasets 'nosuch': must be one of", "piqa"], True),
    ("evaluate-no-dataset", EVALUATE, lambda ws: evaluate_argv(ws, "--datasets", ","), 1, ["--datasets: no dataset named"], True),
    ("evaluate-earlier-results", EVALUATE, lambda ws: evaluate_argv(ws, output_dir=str(ws["root"] / "results")), 1,
     ["already holds results.json and results.md", "--overwrite"], True),
    ("evaluate-output-dir-blocked", EVALUATE, lambda ws: evaluate_argv(ws, output_dir=str(ws["root"] / "blocker" / "out")), 1,
     ["--output_dir", "blocker is a file, not a directory; nothing was run"], True),
    ("evaluate-output-dir-is-a-file", EVALUATE, lambda ws: evaluate_argv(ws, output_dir=str(ws["root"] / "blocker")), 1,
     ["blocker is a file, not a directory"], True),
    ("evaluate-conflicting-model-args", EVALUATE,
     lambda ws: evaluate_argv(ws, "--model_args_path", str(ws["root"] / "conflicting.json")), 1,
     ["conflicts with the adapter's own model args", "dynamic_reserve_initials 2 vs 3"], True),
    ("evaluate-missing-dataset-path", EVALUATE, lambda ws: evaluate_argv(ws, "--dataset_path", str(ws["root"] / "no_data")), 1,
     ["no_data/demo/prompt.json"], True),
    ("evaluate-lone-surrogate-record", EVALUATE,
     lambda ws: evaluate_argv(ws, "--dataset_path", with_data(ws, "surrogate", text=json.dumps([RECORD]).replace("brown", "\\ud800"))), 1,
     ["demo/test.json: record 0: field 'output' holds a lone surrogate"], True),
    ("evaluate-missing-split", EVALUATE, lambda ws: evaluate_argv(ws, "--dataset_path", with_data(ws, "missing")), 1,
     ["file not found: ", "data_missing/demo/test.json"], True),
    ("evaluate-empty-split", EVALUATE, lambda ws: evaluate_argv(ws, "--dataset_path", with_data(ws, "empty", records=[])), 1,
     ["demo/test.json: no records"], True),
    ("evaluate-more-shots-than-train", EVALUATE,
     lambda ws: evaluate_argv(ws, "--n_shot", "3", "--dataset_path", with_data(ws, "few", [RECORD], train=[RECORD])), 1,
     ["train.json: 1 records, fewer than --n_shot 3"], True),
    ("evaluate-record-not-an-object", EVALUATE,
     lambda ws: evaluate_argv(ws, "--dataset_path", with_data(ws, "list", records=[RECORD, ["x"]])), 1,
     ["record 1: expected a JSON object, got list"], True),
    ("evaluate-text-tokenizer-model", EVALUATE,
     lambda ws: evaluate_argv(ws, "--tokenizer_path", str(ws["root"] / "text_tokenizer" / "tokenizer.model")), 1,
     ["not a SentencePiece model"], True),
]


@pytest.mark.parametrize("script, make_argv, code, parts, before_model", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_loses_nothing(ws, script, make_argv, code, parts, before_model, capsys, monkeypatch):
    if before_model:
        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before the bad input was found")
        monkeypatch.setattr(base_model, "build_model", no_model)
    argv = make_argv(ws)
    before = snapshot(ws["root"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "error: " in last, err
    for part in parts:
        assert part in last, last
    assert err.count("error: ") == 1, err
    assert snapshot(ws["root"]) == before, "a failed run changed, removed or wrote a file"


def test_explicit_model_args_are_checked_against_the_adapters_own(ws):
    """The library's side of example-conflicting-model-args: Llama.build names both files and every key."""
    with pytest.raises(InputError) as e:
        Llama.build(ws["base"], ws["run"], str(ws["root"] / "conflicting.json"))
    assert str(e.value).startswith(str(ws["root"] / "conflicting.json"))
    assert "dynamic_reserve_initials 2 vs 3" in str(e.value)


@pytest.mark.parametrize("rank, waits", [("0", False), ("1", True)])
def test_a_rank_other_than_0_waits_for_rank_0_to_report_before_it_exits(rank, waits, capsys, monkeypatch):
    """torchrun stops every rank once one exits: a quiet rank that exited at once could stop rank 0
    before it says the error they share. If the wait runs out, the quiet rank says its own error."""
    monkeypatch.setenv("RANK", rank)
    slept = []
    monkeypatch.setattr(errors.time, "sleep", slept.append)

    def fails():
        raise InputError("data.json: record 3 has no 'output'")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(fails)
    assert exit_info.value.code == 1
    assert slept == ([errors.QUIET_RANK_WAIT_S] if waits else [])
    assert capsys.readouterr().err == "error: data.json: record 3 has no 'output'\n"
