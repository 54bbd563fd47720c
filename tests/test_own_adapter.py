"""The newcomer's path: an adapter fine-tuned with routing settings of its own, then example.py and
evaluate.py pointed only at its output directory route exactly as its params.json says; their
--help describes every flag; results.json says what produced it."""
import ast
import datetime
import json
import os
import re
import subprocess
import sys

import pytest

from dllm.checkpoints import adapters, base_model
from dllm.chat import ChatFormat
from dllm.config import parser_for
from dllm.data import Templates, instruction_prompt, read_templates
from dllm.errors import run_cli
from dllm.evaluate import EvalConfig, Evaluator
from dllm.generation import Llama
from dllm.instruct import InstructConfig
from dllm.core.model import ModelArgs
from dllm.tokenizer import Tokenizer
from helpers import ROOT, load_script, make_base, make_dataset, subprocess_env, train_argv

EXAMPLE = load_script("example.py")
EVALUATE = load_script("evaluate.py")
RESERVE = 6  # helpers.train_argv's runs and the shipped adapters reserve 2 initial tokens
PROMPT = os.path.join(ROOT, "datasets", "demo", "prompt.json")
INSTRUCTS = "['Continue the passage.', 'Answer the question.']"
INPUTS = "['the quick brown fox', 'which option is correct']"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_path):
    """finetuning.py on the tiny base, 1 epoch, reserving RESERVE initial tokens: its output directory."""
    root = tmp_path_factory.mktemp("own_adapter")
    base = make_base(str(root / "base"), tokenizer_path)[1]
    data = make_dataset(str(root / "data"))
    out = str(root / "output" / "tiny-dllm")
    argv = train_argv(base, data, out, epochs=1, dynamic_reserve_initials=RESERVE)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "finetuning.py"), *argv], capture_output=True,
                            text=True, timeout=600, cwd=ROOT, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "base": base, "data": data, "out": out}


def build_from_params_json(trained, reserve=None) -> Llama:
    """The model as its params.json describes it, assembled by hand (no adapter-args resolution)."""
    with open(os.path.join(trained["out"], "params.json")) as f:
        params = json.load(f)
    args = ModelArgs.from_dict(params, max_seq_len=512, max_batch_size=8, dynamic_reserve_initials=reserve)
    model = base_model.build_model(args, trained["base"], os.path.join(trained["out"], "checkpoint-last.pth"))
    model.merge_lora()
    return Llama(model.eval(), Tokenizer(trained["base"]))


def shares_printed(stdout: str):
    return re.findall(r"blocks executed: ([\d.]+)%", stdout)


@pytest.mark.slow
def test_example_py_runs_the_adapter_as_its_params_json_says(trained, capsys):
    with open(os.path.join(trained["out"], "params.json")) as f:
        assert json.load(f)["dynamic_reserve_initials"] == RESERVE
    argv = ["--llama_ckpt_dir", trained["base"], "--dynamic_ckpt_dir", trained["out"], "--prompt_path", PROMPT,
            "--instructs", INSTRUCTS, "--inputs", INPUTS, "--temperature", "0", "--max_gen_len", "6"]
    capsys.readouterr()
    run_cli(EXAMPLE.main, argv)
    out = capsys.readouterr().out
    assert "### Input: the quick brown fox" in out  # each input echoed beside its instruction

    def shares(generator):
        templates = Templates(PROMPT, read_templates(PROMPT), ChatFormat(generator.tokenizer))
        prompts = [instruction_prompt(templates, i, t) for i, t in zip(ast.literal_eval(INSTRUCTS), ast.literal_eval(INPUTS))]
        _, stats = generator.text_completion(prompts, temperature=0.0, max_gen_len=6, return_routing=True)
        return [f"{100 * stats.exec_share(row):.1f}" for row in range(len(prompts))]

    assert shares_printed(out) == shares(build_from_params_json(trained))
    # the setting matters: routed with the shipped adapters' 2 reserved tokens, the shares differ
    assert shares_printed(out) != shares(build_from_params_json(trained, reserve=2))


@pytest.mark.slow
def test_evaluate_py_runs_the_adapter_as_its_params_json_says_and_records_provenance(trained, capsys):
    out_dir = trained["root"] / "results"
    argv = ["--llama_ckpt_dir", trained["base"], "--dynamic_ckpt_dir", trained["out"], "--dataset_path",
            trained["data"], "--datasets", "demo", "--output_dir", str(out_dir), "--batch_size", "4", "--n_shot", "1"]
    run_cli(EVALUATE.main, argv)
    results = json.loads((out_dir / "results.json").read_text())
    expected = Evaluator(build_from_params_json(trained), 4, 32, 1, trained["data"]).evaluate("demo")
    assert [(r["metric"], r["n"], r["n_unit"]) for r in results["rows"]] == [
        (r.metric, r.n, "tokens") for r in expected]
    for got, want in zip(results["rows"], expected):
        assert got["flops_ratio"] == pytest.approx(want.flops_ratio, abs=1e-9)
        assert got["value"] == pytest.approx(want.value, rel=1e-6)

    provenance = results["provenance"]
    assert provenance["base_model"] == os.path.abspath(trained["base"])
    assert provenance["adapter"] == os.path.join(os.path.abspath(trained["out"]), "checkpoint-last.pth")
    assert (provenance["n_shot"], provenance["datasets"], provenance["routing"]) == (1, ["demo"], "D-LLM")
    with open(os.path.join(trained["out"], "params.json")) as f:
        assert provenance["execute_threshold"] == json.load(f)["execute_threshold"]
    assert re.fullmatch(r"git [0-9a-f]{40}( with uncommitted changes)?|dllm \S+", provenance["code_version"])
    assert datetime.datetime.fromisoformat(provenance["date"]).tzinfo is not None
    # a second run into the same directory refuses; --overwrite replaces
    with pytest.raises(SystemExit):
        run_cli(EVALUATE.main, argv)
    assert json.loads((out_dir / "results.json").read_text()) == results
    run_cli(EVALUATE.main, argv + ["--overwrite"])
    assert json.loads((out_dir / "results.json").read_text())["rows"] == results["rows"]


@pytest.mark.slow
def test_the_adapter_directory_resolves_to_its_last_checkpoint(trained):
    files = sorted(os.listdir(trained["out"]))
    assert "checkpoint-0.pth" in files and "checkpoint-last.pth" in files
    os.utime(os.path.join(trained["out"], "checkpoint-0.pth"))  # newest by time, still not the last
    assert adapters.adapter_file(trained["out"]) == os.path.join(trained["out"], "checkpoint-last.pth")


@pytest.mark.parametrize("script, config", [(EXAMPLE, InstructConfig), (EVALUATE, EvalConfig)], ids=["example", "evaluate"])
def test_help_describes_every_flag_with_its_default(script, config, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = parser_for(config)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        described = " ".join(formatter._get_help_string(action).split())
        assert len(described) > 20 and ("(default" in described or "(required)" in described), (
            action.option_strings, described)
        assert action.option_strings[0] in text and described[:30] in text, action.option_strings
    if script is EXAMPLE:
        assert "--instructs \"['Tell me about alpacas.', 'Name three colours.']\"" in text
