"""Settings defined once: each is a dataclass field that carries its help and its allowed range,
and the command-line flags, their --help and the range checks are generated from it.

    @dataclass
    class EvalConfig(Settings):
        batch_size: int = setting(8, "records per forward pass", low=1)

    config = EvalConfig.parse(description=__doc__)   # argv -> EvalConfig, checked

Unknown or misspelled flags stop the parser before any work (argparse's exit status 2); a value
out of range is one InputError line naming the flag, the value and what is allowed.
"""
import argparse
import ast
import dataclasses
import math
import sys
import typing
from typing import Any, Optional, Sequence

from dllm.errors import InputError, speaks, wait_for_rank_0


def setting(default: Any, help: str, *, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, choices: Optional[Sequence[str]] = None, required: bool = False,
            metavar: Optional[str] = None):
    """A dataclass field with its flag's help and range: low <= value <= high (low < value with
    low_open); choices for strings; lists are checked element by element."""
    meta = dict(help=help, low=low, high=high, low_open=low_open, choices=choices, required=required, metavar=metavar)
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(annotation):
    """(element type, is a list, is optional) of int | float | str | bool | Optional[...] | List[...]."""
    optional = False
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, optional = args[0], True
    if typing.get_origin(annotation) in (list, tuple):
        return typing.get_args(annotation)[0], True, optional
    return annotation, False, optional


def _list_value(kind):
    """A list flag takes a Python list literal, as fire did ("['a', 'b']"), or one plain value."""
    def convert(text: str):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        try:
            return [kind(v) for v in values]
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a list of {kind.__name__}, e.g. \"['a', 'b']\"; got {text!r}")
    convert.__name__ = f"list of {kind.__name__}"
    return convert


def _number(kind):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value
    convert.__name__ = kind.__name__
    return convert


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout and appends each flag's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is not argparse.SUPPRESS and action.option_strings and "(default" not in text and not action.required:
            if isinstance(action, argparse.BooleanOptionalAction):
                text += f" (default: {'on' if default else 'off'})"
            elif default is not None and not (isinstance(default, (list, tuple)) and not default):
                text += f" (default: {default!r})" if isinstance(default, str) else f" (default: {default})"
        if getattr(action, "allowed", None):
            text += f" [{action.allowed}]"
        return text


class _Parser(argparse.ArgumentParser):
    """Under torchrun every rank parses the same flags: only rank 0 prints the help; the others wait
    for rank 0 to print a bad flag's error (as run_cli does for other bad input)."""

    def _print_message(self, message, file=None):
        if speaks():
            super()._print_message(message, file)

    def error(self, message):
        wait_for_rank_0()
        sys.stderr.write(f"{self.format_usage()}{self.prog}: error: {message}\n")
        sys.exit(2)


def parser_for(cls, description: str = "", parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or _Parser(description=description, formatter_class=_HelpFormatter, allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind, is_list, _ = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = "--" + f.name
        help_text = meta.get("help", "")
        if kind is bool:
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif is_list:
            action = parser.add_argument(flag, type=_list_value(kind), default=default, help=help_text,
                                         metavar=meta.get("metavar") or "LIST")
        else:
            convert = _number(kind) if kind in (int, float) else kind
            action = parser.add_argument(flag, type=convert, default=default, help=help_text,
                                         required=meta.get("required", False), choices=meta.get("choices"),
                                         metavar=meta.get("metavar"))
        action.allowed = allowed_range(meta)
    return parser


def allowed_range(meta) -> str:
    """A numeric setting's range in words: ">= 1", "> 0.0", ">= 0.0 and <= 1.0"; "" when unbounded."""
    low, high = meta.get("low"), meta.get("high")
    allowed = [f"> {low}" if meta.get("low_open") else f">= {low}"] if low is not None else []
    allowed += [f"<= {high}"] if high is not None else []
    return " and ".join(allowed)


def check(config) -> None:
    """Every field within its declared range, else one InputError line."""
    for f in dataclasses.fields(config):
        meta, value = f.metadata, getattr(config, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None or isinstance(v, bool):
                continue
            low, high, low_open = meta.get("low"), meta.get("high"), meta.get("low_open")
            too_low = low is not None and (v <= low if low_open else v < low)
            too_high = high is not None and v > high
            if too_low or too_high:
                raise InputError(f"--{f.name} {v}: must be {allowed_range(meta)}")
            choices = meta.get("choices")
            if choices and v not in choices:
                raise InputError(f"--{f.name} {v!r}: must be one of {', '.join(choices)}")


class Settings:
    """Base of every settings dataclass: constructing one checks its ranges (so a test building a
    config directly gets the same checks as the command line); subclasses with cross-field rules
    add them in __post_init__ after calling super().__post_init__()."""

    def __post_init__(self):
        check(self)

    @classmethod
    def parse(cls, argv: Optional[Sequence[str]] = None, description: str = ""):
        """argv -> a checked instance; --help lists every flag with its help and default."""
        return cls(**vars(parser_for(cls, description).parse_args(argv)))
