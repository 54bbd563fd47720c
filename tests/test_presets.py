"""Recipes as presets (presets/NAME.json), defaults stated once, one name for the base checkpoint flag."""
import json
import os
import subprocess

import pytest

import evaluate
import example
import finetuning
import presets
from dllm.config import Presets
from dllm.dial import DialConfig, LoraStrengthConfig
from dllm.errors import InputError
from dllm.evaluate import EvalConfig
from dllm.instruct import InstructConfig
from dllm.training.config import TrainConfig

ROOT = presets.ROOT


def _fake_python(tmp_path):
    """A `python` that writes the flags finetuning.sh hands to finetuning.py, one per line."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/bash\nshift\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    return fake.parent


def _finetuning_sh_flags(tmp_path, **variables):
    out = tmp_path / "flags.txt"
    env = {"PATH": f"{_fake_python(tmp_path)}:{os.environ['PATH']}", "ARGS_OUT": str(out), **variables}
    subprocess.run(["bash", os.path.join(ROOT, "finetuning.sh")], env=env, check=True, timeout=60)
    return out.read_text().splitlines()


def test_finetuning_sh_passes_the_demo_preset_and_only_the_variables_that_are_set(tmp_path):
    assert _finetuning_sh_flags(tmp_path) == ["--preset", "demo"]
    assert _finetuning_sh_flags(tmp_path, PRESET="smollm2", EPOCHS="1", ROUTER_BIAS="0.2 1.5") == [
        "--preset", "smollm2", "--epochs", "1", "--dynamic_router_bias", "[0.2,1.5]"]
    assert _finetuning_sh_flags(tmp_path, PRESET="", MODEL_PATH="m") == ["--llama_ckpt_dir", "m"]


def test_a_preset_replaces_defaults_and_flags_replace_the_preset():
    with open(os.path.join(ROOT, "presets", "smollm2.json")) as f:
        recipe = json.load(f)["finetuning"]
    config = finetuning.parse_args(["--preset", "smollm2", "--epochs", "1"])
    assert config.preset == "smollm2" and config.epochs == 1
    assert config.batch_size == recipe["batch_size"] and config.lambda_active == recipe["lambda_active"]
    assert config.llama_ckpt_dir == os.path.relpath(os.path.join(ROOT, recipe["llama_ckpt_dir"]))
    reference = TrainConfig(llama_ckpt_dir="m")
    assert "lora_rank" not in recipe and "blr" not in recipe
    assert config.blr == reference.blr and config.lora_rank == reference.lora_rank
    assert config.dynamic_router_bias == recipe["dynamic_router_bias"]


def test_a_preset_s_recipe_on_another_base_or_dataset_is_not_the_preset_s_run():
    """finetuning.sh's default PRESET=demo with MODEL_PATH and DATASET_NAME set: the demo's recipe on
    SmolLM2's data, whose closing summary must not suggest the demo's prompts (--preset demo)."""
    demo = finetuning.parse_args(["--preset", "demo", "--epochs", "1"])
    assert demo.preset == "demo"
    assert finetuning.parse_args(["--preset", "demo", "--dataset_name", "demo"]).preset == "demo"
    for moved in (["--llama_ckpt_dir", "models/smollm2"], ["--dataset_name", "smol"]):
        other = finetuning.parse_args(["--preset", "demo", *moved])
        assert other.preset == "" and other.batch_size == demo.batch_size


def test_help_shows_the_defaults_a_preset_puts_in_force(capsys):
    with pytest.raises(SystemExit):
        finetuning.parse_args(["--preset", "smollm2", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch_size BATCH_SIZE records per step and process (default: 4)" in text
    with pytest.raises(SystemExit):
        finetuning.parse_args(["--help"])
    assert "--batch_size BATCH_SIZE records per step and process (default: 1)" in " ".join(capsys.readouterr().out.split())


def test_the_paper_s_flag_name_is_an_alias_of_the_one_base_flag():
    assert finetuning.parse_args(["--llama_model_path", "a"]).llama_ckpt_dir == "a"
    assert finetuning.parse_args(["--llama_ckpt_dir", "b"]).llama_ckpt_dir == "b"


def test_an_unknown_preset_or_setting_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"--preset nope: no such preset; known: demo, llama2-7b-alpaca, smollm2"):
        finetuning.parse_args(["--preset", "nope"])
    (tmp_path / "bad.json").write_text(json.dumps({"finetuning": {"batch_sise": 4}}))
    with pytest.raises(InputError, match=r"bad.json: finetuning.batch_sise is not a setting of this entry point"):
        TrainConfig.parse(["--preset", "bad"], presets=Presets(str(tmp_path), "finetuning"))


def test_example_defaults_to_the_demo_with_an_instruction_and_input_from_its_test_split():
    with open(os.path.join(ROOT, "datasets", "demo", "test.json")) as f:
        first = json.load(f)[0]
    config = InstructConfig.parse([], defaults=presets.CHECKOUT_DEFAULTS,
                                  presets=presets.for_entry_point("example", default="demo"))
    assert config.preset == "demo" and os.path.samefile(config.llama_ckpt_dir, os.path.join(ROOT, "assets", "tiny-llama2"))
    assert config.instructs == [first["instruction"]] and config.inputs == [first["input"]]
    assert os.path.samefile(config.prompt_path, os.path.join(ROOT, "datasets", "demo", "prompt.json"))
    assert os.path.samefile(config.adapter(), os.path.join(ROOT, "assets", "tiny-dllm", "checkpoint.pth"))


def test_instructions_given_drop_the_preset_s_inputs_and_a_named_base_drops_the_default_preset():
    config = InstructConfig.parse(["--instructs", "['Name a colour.']"], defaults=presets.CHECKOUT_DEFAULTS,
                                  presets=presets.for_entry_point("example", default="demo"))
    assert config.instructs == ["Name a colour."] and config.inputs == [""]
    base = os.path.join(ROOT, "assets", "tiny-llama2")
    config = InstructConfig.parse(["--llama_ckpt_dir", base], defaults=presets.CHECKOUT_DEFAULTS,
                                  presets=presets.for_entry_point("example", default="demo"))
    assert config.preset == "" and config.prompt_path is None and config.instructs[0] == "Tell me about alpacas."


def test_every_preset_names_only_settings_of_its_entry_points():
    sections = {"finetuning": TrainConfig, "example": InstructConfig, "evaluate": EvalConfig, "calibrate_dial": DialConfig,
                "calibrate_lora_strength": LoraStrengthConfig}
    for name in presets.for_entry_point("finetuning").names():
        with open(os.path.join(ROOT, "presets", f"{name}.json")) as f:
            recipe = json.load(f)
        assert set(recipe) <= set(sections) | {"about"}, name
        for section, cls in sections.items():
            presets.for_entry_point(section).values(name, {f for f in cls.__dataclass_fields__})


def test_entry_points_take_the_checkout_s_defaults_and_the_library_none():
    assert example.presets is presets and evaluate.presets is presets
    assert InstructConfig.__dataclass_fields__["shipped_adapters"].default is None
    assert EvalConfig.__dataclass_fields__["dataset_path"].default == "datasets"


def test_none_unsets_an_optional_setting_a_preset_gives():
    assert finetuning.parse_args(["--preset", "demo"]).router_lr == 2e-2
    assert finetuning.parse_args(["--preset", "demo", "--router_lr", "none"]).router_lr is None
