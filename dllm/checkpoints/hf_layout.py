"""Hugging Face Llama checkpoints: `config.json` <-> ModelArgs, weight names, and the RoPE row order.

Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face's rotates the two
halves of each head. The same model therefore stores the rows of wq and wk in a different order,
and a checkpoint is converted by permuting those rows (exact, no arithmetic). Everything else is a
rename. Weights are read with the `safetensors` library (one file or an index of shards), or from
legacy `pytorch_model*.bin` files with `torch.load(weights_only=True)` (base_model.read_hf_weights).
"""
import glob
import json
import os
from typing import Dict, List, Optional

import torch
from dllm.errors import InputError
from dllm.core.model import ModelArgs

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Meta name -> Hugging Face name; "{}" is the layer index
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
# buffers some exporters write; the model recomputes them
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def read_config(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable config.json ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object")
    return config


def _rope_scaling(config: dict, path: str) -> Optional[dict]:
    """`rope_scaling` (transformers 4) or `rope_parameters` (5); None for plain RoPE."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise InputError(f"{path}: rope type {rope_type!r} is not supported (supported: default, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise InputError(f"{path}: llama3 rope scaling lacks {missing}")
    return {"rope_type": "llama3", **{k: scaling[k] for k in keys}}


def config_to_params(config: dict, path: str) -> dict:
    """A Llama `config.json` as ModelArgs fields; architectures this model cannot run are refused."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"{path}: model_type {model_type!r} is not a Llama-family model this code runs "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    unsupported = {
        "attention_bias": config.get("attention_bias", False), "mlp_bias": config.get("mlp_bias", False),
        "sliding_window": config.get("sliding_window"),
    }
    for key, value in unsupported.items():
        if value:
            raise InputError(f"{path}: {key}={value} is not supported (Llama blocks have no biases and full attention)")
    if config.get("hidden_act", "silu") != "silu":
        raise InputError(f"{path}: hidden_act={config['hidden_act']!r} is not supported (Llama uses silu)")
    try:
        rope_theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        params = {
            "dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "vocab_size": config["vocab_size"], "hidden_dim": config["intermediate_size"],
            "norm_eps": config.get("rms_norm_eps", 1e-6), "rope_theta": float(rope_theta),
            "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
            "rope_scaling": _rope_scaling(config, path),
        }
    except KeyError as e:
        raise InputError(f"{path}: missing {e.args[0]!r}") from None
    return params


def params_to_config(args: ModelArgs, dtype: torch.dtype, extra: Optional[dict] = None) -> dict:
    """The `config.json` transformers' LlamaForCausalLM reads; `extra` adds token ids and context."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "head_dim": args.head_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
        "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    config.update(extra or {})
    return config


def rope_permutation(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order taking Meta's interleaved-pair RoPE layout to Hugging Face's half-split layout."""
    return torch.arange(n_heads * head_dim).view(n_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def _permuted_heads(args: ModelArgs, meta_name: str) -> Optional[int]:
    if meta_name.endswith("attention.wq.weight"):
        return args.n_heads
    if meta_name.endswith("attention.wk.weight"):
        return args.n_kv_heads or args.n_heads
    return None


def meta_to_hf_name(meta_name: str) -> str:
    if meta_name in TOP_NAMES:
        return TOP_NAMES[meta_name]
    _, layer, rest = meta_name.split(".", 2)
    return f"model.layers.{layer}.{LAYER_NAMES[rest]}"


def hf_to_meta_names(n_layers: int) -> Dict[str, str]:
    names = {hf: meta for meta, hf in TOP_NAMES.items()}
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{hf}": f"layers.{i}.{meta}" for meta, hf in LAYER_NAMES.items()})
    return names


def hf_to_meta(state_dict: Dict[str, torch.Tensor], args: ModelArgs, path: str) -> Dict[str, torch.Tensor]:
    """Hugging Face names and RoPE rows -> this model's; a tensor with no place is one error line."""
    names = hf_to_meta_names(args.n_layers)
    out = {}
    for hf_name, tensor in state_dict.items():
        if hf_name.endswith(RECOMPUTED_SUFFIXES) or (hf_name == "lm_head.weight" and args.tie_word_embeddings):
            continue
        if hf_name not in names:
            raise InputError(f"{path}: tensor {hf_name!r} has no place in a Llama model")
        meta_name = names[hf_name]
        heads = _permuted_heads(args, meta_name)
        if heads is not None:
            tensor = tensor[rope_permutation(heads, args.head_dim).argsort()]
        out[meta_name] = tensor
    return out


def meta_to_hf(state_dict: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    out = {}
    for meta_name, tensor in state_dict.items():
        heads = _permuted_heads(args, meta_name)
        if heads is not None:
            tensor = tensor[rope_permutation(heads, args.head_dim)]
        out[meta_to_hf_name(meta_name)] = tensor
    return out


def weight_files(ckpt_dir: str) -> List[str]:
    """The checkpoint's weight files: the index's shards, else every *.safetensors, else *.bin."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = os.path.join(ckpt_dir, index_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
                raise InputError(f"{index}: not a readable weight index ({e})") from None
            missing = [s for s in shards if not os.path.isfile(os.path.join(ckpt_dir, s))]
            if missing:
                raise InputError(f"{index}: shard {missing[0]} is missing ({len(missing)} of {len(shards)} missing)")
            return [os.path.join(ckpt_dir, s) for s in shards]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(glob.glob(os.path.join(ckpt_dir, pattern)))
        if files:
            return files
    raise InputError(f"{ckpt_dir}: config.json but no weights (*.safetensors or pytorch_model*.bin)")

