"""Model args from a base's params.json or config.json, checked field by field, and the checks
that an adapter's args and a tokenizer belong to that base. Nothing here changes its arguments."""
import dataclasses
import json
import math
import os
import sys
import typing
from typing import Optional

from dllm.checkpoints import hf_layout
from dllm.checkpoints.layouts import params_file
from dllm.core.model import ModelArgs
from dllm.errors import InputError


# the model args that decide which tokens run which block (and how LoRA adds): an adapter routes as
# trained only with its own values
ROUTING_KEYS = ("routing", "lora_rank", "lora_scale", "dynamic_active_target", "dynamic_start_layer",
                "dynamic_router_hdim", "dynamic_reserve_initials", "execute_threshold", "static_skip_layers")


# the config.json keys config_to_params reads, as the ModelArgs types they become
HF_CONFIG_TYPES = {"hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int,
                   "num_key_value_heads": Optional[int], "vocab_size": int, "intermediate_size": int,
                   "rms_norm_eps": float, "rope_theta": float, "head_dim": Optional[int],
                   "tie_word_embeddings": bool}


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
               list: "a list", tuple: "a list"}


def _matches(value, annotation) -> bool:
    """JSON value against a ModelArgs annotation (int, float, bool, str, Optional[...], Tuple[...], dict)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return any(_matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


def _expected(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _expected(a) for a in args)
    return _TYPE_NAMES.get(origin or annotation, getattr(annotation, "__name__", str(annotation)))


def check_types(values: dict, types: dict, path: str):
    """Each known key's JSON value has its field's type, else one line naming file, key, value and type."""
    for key, annotation in types.items():
        if key in values and not _matches(values[key], annotation):
            raise InputError(f"{path}: {key} is {json.dumps(values[key])}; expected {_expected(annotation)}")


def load_params(ckpt_dir_or_file: str, **overrides) -> ModelArgs:
    """Model args from a Meta params.json or a Hugging Face config.json (a file, or found in a directory)."""
    path = params_file(ckpt_dir_or_file) if os.path.isdir(ckpt_dir_or_file) else ckpt_dir_or_file
    if not os.path.isfile(path):
        raise InputError(f"model args file not found: {path}")
    try:
        if os.path.basename(path) == "config.json":
            config = hf_layout.read_config(os.path.dirname(path))
            check_types(config, HF_CONFIG_TYPES, path)
            return args_from_dict(hf_layout.config_to_params(config, path), **overrides)
        with open(path) as f:
            params = json.load(f)
        if isinstance(params, dict):
            check_types(params, typing.get_type_hints(ModelArgs), path)
        return args_from_dict(params, **overrides)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a valid {os.path.basename(path)} ({e})") from None


def args_from_dict(params: dict, **overrides) -> ModelArgs:
    """ModelArgs.from_dict, saying on stderr which keys it ignores."""
    unknown = ModelArgs.unknown_keys(params) if isinstance(params, dict) else []
    if unknown:
        print(f"warning: ignoring unknown model args {unknown}", file=sys.stderr)
    return ModelArgs.from_dict(params, **overrides)


def read_args(path: str, **overrides) -> ModelArgs:
    """An adapter's params.json (or any Meta params.json) as model args."""
    with open(path) as f:
        return args_from_dict(json.load(f), **overrides)


def model_args(params: dict, path: str, **overrides) -> ModelArgs:
    try:
        return args_from_dict(params, **overrides)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: not valid model args ({e})") from None


# the base's architecture in its fingerprint, and the weights it samples (held by model-parallel
# rank 0 in every layout: rows 0..7 of column 0, the first row's first 8 values)
FINGERPRINT_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "head_dim",
                    "ffn_hidden_dim", "tie_word_embeddings", "rope_scaling")


# a float setting as a conversion may store it: GGUF keeps rms_norm_eps as float32, so transformers'
# save_pretrained of a GGUF writes 1e-05 as 9.999999747378752e-06
FLOAT_DIGITS = 6


def arch_value(value):
    """An architecture setting with its floats rounded to FLOAT_DIGITS significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{FLOAT_DIGITS}g}")
    if isinstance(value, dict):
        return {k: arch_value(v) for k, v in value.items()}
    return value


def check_args_match(args: ModelArgs, base: ModelArgs, args_path: str, base_path: str):
    """The adapter's model args must describe the same base architecture as the checkpoint's (floats
    to FLOAT_DIGITS significant digits)."""
    for key in FINGERPRINT_KEYS:
        if key == "vocab_size" and base.vocab_size == -1:
            continue
        if arch_value(getattr(args, key)) != arch_value(getattr(base, key)):
            raise InputError(
                f"{args_path}: {key}={getattr(args, key)} but the base model's {base_path} has {getattr(base, key)}"
            )


# embedding tables may be padded past the tokenizer's size up to a multiple of this (Qwen, Phi, GPT-NeoX)
VOCAB_PADDING = 1024


def with_vocab(args: ModelArgs, tokenizer, tokenizer_path: str) -> ModelArgs:
    """The args with their vocab_size checked against the tokenizer: every token id has an embedding
    row, and the table is the tokenizer's (at most padded to a multiple of VOCAB_PADDING). Meta
    checkpoints leave vocab_size to the tokenizer (-1): the copy returned has the tokenizer's."""
    if args.vocab_size == -1:
        args = dataclasses.replace(args, vocab_size=tokenizer.n_words)
    padded = VOCAB_PADDING * math.ceil(tokenizer.n_words / VOCAB_PADDING)
    if not tokenizer.n_words <= args.vocab_size <= max(padded, tokenizer.n_words):
        raise InputError(f"{tokenizer_path}: {tokenizer.n_words} tokens but the model's vocab_size is "
                         f"{args.vocab_size} (the tokenizer does not belong to this model)")
    return args
