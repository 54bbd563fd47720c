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
import json
import math
import os
import sys
import typing
from typing import Any, Optional, Sequence, Tuple

from dllm.errors import InputError, speaks, wait_for_rank_0


def setting(default: Any, help: str, *, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, choices: Optional[Sequence[str]] = None, required: bool = False,
            metavar: Optional[str] = None, aliases: Sequence[str] = ()):
    """A dataclass field with its flag's help and range: low <= value <= high (low < value with
    low_open); choices for strings; lists are checked element by element. `aliases`: other flag
    names accepted for it (the paper code's other spelling)."""
    meta = dict(help=help, low=low, high=high, low_open=low_open, choices=choices, required=required, metavar=metavar,
                aliases=tuple(aliases))
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


def _or_none(convert):
    """An Optional setting also takes `none`: unset, as if never given (a preset's value dropped)."""
    def or_none(text: str):
        return None if text.lower() == "none" else convert(text)
    or_none.__name__ = convert.__name__
    return or_none


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout and appends each flag's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is not argparse.SUPPRESS and action.option_strings and "(default" not in text and not action.required:
            if isinstance(action, argparse.BooleanOptionalAction):
                text += f" (default: {'on' if default else 'off'})"
            elif default is None:
                text += " (default: none)"
            elif not (isinstance(default, (list, tuple)) and not default):
                text += f" (default: {default!r})" if isinstance(default, str) else f" (default: {default})"
        if action.required:
            text += " (required)"
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


def parser_for(cls, description: str = "", parser: Optional[argparse.ArgumentParser] = None,
               defaults: Optional[dict] = None) -> argparse.ArgumentParser:
    """The flags of a settings dataclass; `defaults` replace some of its defaults (an entry point's
    own, a preset's), and --help shows the defaults in force."""
    parser = parser or _Parser(description=description, formatter_class=_HelpFormatter, allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind, is_list, optional = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        required = meta.get("required", False) and f.name not in defaults
        default = defaults.get(f.name, default)
        flags = ["--" + f.name, *meta.get("aliases", ())]
        help_text = meta.get("help", "")
        if kind is bool:
            action = parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                         help=help_text)
        elif is_list:
            action = parser.add_argument(*flags, dest=f.name, type=_list_value(kind), default=default, help=help_text,
                                         metavar=meta.get("metavar") or "LIST")
        else:
            convert = _number(kind) if kind in (int, float) else kind
            if optional:
                convert = _or_none(convert)
            action = parser.add_argument(*flags, dest=f.name, type=convert, default=default, help=help_text,
                                         required=required, choices=meta.get("choices"), metavar=meta.get("metavar"))
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

    # settings a preset gives together: a command line that gives one of them drops the preset's others
    PRESET_GROUPS: Tuple[Tuple[str, ...], ...] = ()
    # what a preset is for (its base, its data): given another value, the run keeps the preset's recipe but is
    # not the preset's run, so `preset` is left empty (its other sections, e.g. example prompts, do not fit)
    PRESET_SCOPE: Tuple[str, ...] = ()

    @classmethod
    def parse(cls, argv: Optional[Sequence[str]] = None, description: str = "", defaults: Optional[dict] = None,
              presets: Optional["Presets"] = None):
        """argv -> a checked instance; --help lists every flag with its help and the default in force.
        `defaults`: the entry point's own defaults for some settings; `presets`: named recipes, one
        chosen with --preset NAME (a field of the class), whose values replace the defaults."""
        argv = list(sys.argv[1:] if argv is None else argv)
        defaults = dict(defaults or {})
        name, chosen = "", {}
        if presets is not None:
            first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
            first.add_argument("--preset", default="")
            name = first.parse_known_args(argv)[0].preset
            given = given_flags(cls, argv)
            if not name and presets.default and not given & set(presets.unless_given):
                name = presets.default
            if name:
                chosen = presets.values(name, {f.name for f in dataclasses.fields(cls)})
                for group in cls.PRESET_GROUPS:
                    if given & set(group):
                        chosen = {k: v for k, v in chosen.items() if k not in group}
                defaults |= chosen | {"preset": name}
        values = vars(parser_for(cls, description, defaults=defaults).parse_args(argv))
        if name and any(k in chosen and values[k] != chosen[k] for k in cls.PRESET_SCOPE):
            values["preset"] = ""
        return cls(**values)


def given_flags(cls, argv: Sequence[str]) -> set:
    """The settings a command line names (by flag or alias, with or without =value)."""
    names, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        for flag in ("--" + f.name, *f.metadata.get("aliases", ())):
            names[flag] = f.name
            if hints[f.name] is bool:
                names["--no-" + flag[2:]] = f.name
    return {names[arg.split("=", 1)[0]] for arg in argv if arg.split("=", 1)[0] in names}


@dataclasses.dataclass
class Presets:
    """Named recipes: `directory`/NAME.json holds one object per entry point (`section`), mapping
    settings to the values that replace their defaults. Paths in a preset (settings ending in _dir or
    _path) are relative to the directory above `directory`, the repository. `default` is the preset
    used when none is asked and the command line names none of `unless_given`."""

    directory: str
    section: str
    default: Optional[str] = None
    unless_given: Tuple[str, ...] = ("llama_ckpt_dir",)

    def names(self) -> list:
        return sorted(n[:-5] for n in os.listdir(self.directory) if n.endswith(".json"))

    def values(self, name: str, known: set) -> dict:
        path = name if name.endswith(".json") else os.path.join(self.directory, f"{name}.json")
        if not os.path.isfile(path):
            raise InputError(f"--preset {name}: no such preset; known: {', '.join(self.names())}")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f).get(self.section, {})
        except (OSError, ValueError, AttributeError) as e:
            raise InputError(f"{path}: not a preset (a JSON object of sections) ({e})") from None
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{path}: {self.section}.{unknown[0]} is not a setting of this entry point")
        root = os.path.dirname(os.path.abspath(self.directory))
        return {k: os.path.relpath(os.path.join(root, v)) if k.endswith(("_dir", "_path")) and isinstance(v, str) and v
                and not os.path.isabs(v) else v for k, v in values.items()}
