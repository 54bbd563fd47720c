"""The settings mechanism: flags, help and range checks generated from one dataclass."""
from dataclasses import dataclass
from typing import List, Optional

import pytest

from dllm import errors
from dllm.config import Settings, setting
from dllm.errors import InputError


@dataclass
class Example(Settings):
    batch_size: int = setting(8, "records per forward pass", low=1)
    threshold: Optional[float] = setting(None, "p(execute) at or above which a block runs", low=0.0, high=1.0)
    temperature: float = setting(0.1, "sampling temperature; 0 is greedy", low=0.0)
    lr: float = setting(1e-3, "learning rate", low=0.0, low_open=True)
    layers: List[int] = setting([], "blocks to prune", low=0)
    instructs: List[str] = setting(["Hi."], "instructions")
    routing: str = setting("dllm", "routing policy", choices=["dllm", "dense"])
    dense: bool = setting(False, "run the base model alone")


def test_flags_parse_to_typed_values():
    c = Example.parse(["--batch_size", "2", "--threshold", "0.3", "--layers", "[3, 5]",
                       "--instructs", "['Tell me about alpacas.', 'List three colours.']", "--dense"])
    assert (c.batch_size, c.threshold, c.layers, c.dense) == (2, 0.3, [3, 5], True)
    assert c.instructs == ["Tell me about alpacas.", "List three colours."]
    assert Example.parse(["--instructs", "one plain instruction"]).instructs == ["one plain instruction"]
    assert Example.parse([]) == Example()


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--threshold", "1.5"], "--threshold 1.5: must be >= 0.0 and <= 1.0"),
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0.0"),
    (["--lr", "0"], "--lr 0.0: must be > 0.0"),
    (["--layers", "[2, -1]"], "--layers -1: must be >= 0"),
])
def test_a_value_out_of_range_is_one_line_naming_flag_value_and_range(argv, message):
    with pytest.raises(InputError) as e:
        Example.parse(argv)
    assert str(e.value) == message


def test_building_a_config_directly_checks_it_too():
    with pytest.raises(InputError, match="--batch_size 0: must be >= 1"):
        Example(batch_size=0)


@pytest.mark.parametrize("argv", [["--dnese"], ["--batch", "2"], ["--batch_size", "two"], ["--routing", "mod"],
                                  ["--lr", "nan"]])
def test_unknown_abbreviated_or_mistyped_flags_exit_2_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as e:
        Example.parse(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in last and argv[0] in last, last


def test_help_describes_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        Example.parse(["--help"])
    text = capsys.readouterr().out
    for phrase in ("records per forward pass (default: 8)", "sampling temperature; 0 is greedy (default: 0.1)",
                   "--dense, --no-dense", "(default: ['Hi.'])", "routing policy (default: 'dllm')"):
        assert phrase in text, phrase


@pytest.mark.parametrize("rank, waits", [("0", False), ("1", True)])
def test_under_torchrun_a_rank_other_than_0_waits_for_rank_0_to_say_a_bad_flag(rank, waits, capsys, monkeypatch):
    """Every rank parses the same flags; one that exited at once could let torchrun stop rank 0
    before it speaks. If the wait runs out, the rank says the error itself."""
    monkeypatch.setenv("RANK", rank)
    slept = []
    monkeypatch.setattr(errors.time, "sleep", slept.append)
    with pytest.raises(SystemExit) as exit_info:
        Example.parse(["--bogus"])
    assert exit_info.value.code == 2
    assert slept == ([errors.QUIET_RANK_WAIT_S] if waits else [])
    assert capsys.readouterr().err.endswith("error: unrecognized arguments: --bogus\n")
