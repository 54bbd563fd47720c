"""Base checkpoints (Meta or Hugging Face layout), D-LLM adapter checkpoints, and their checks.

Base, Meta layout: `params.json` + `consolidated.NN.pth` (one shard per model-parallel rank) +
`tokenizer.model`. Base, Hugging Face layout: `config.json` + `*.safetensors` (or legacy
`pytorch_model*.bin`) + `tokenizer.json`, renamed and RoPE-permuted on load (hf_checkpoint.py).
Adapter (official layout): a file holding {"epoch", "model": {router and LoRA tensors}, ...}.
Every file goes through `torch.load(weights_only=True)`: a checkpoint cannot run code.
"""
import glob
import hashlib
import json
import math
import os
import pickle
import sys
import typing
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from dllm import distributed, hf_checkpoint
from dllm.atomic_io import atomic_save, atomic_write_text
from dllm.errors import InputError, speaks
from dllm.model import META_LLAMA3_ROPE_SCALING, ModelArgs, Transformer, is_adapter_key

# what the repository ships: the demo base model and, per base, the adapter trained on it
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEMO_BASE = os.path.join(ASSETS, "tiny-llama2")
# tensors that Meta's checkpoints carry but the model recomputes
IGNORED_KEYS = {"rope.freqs"}
COLUMN_PARALLEL = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight", "linear_B.weight")
ROW_PARALLEL = ("wo.weight", "w2.weight", "tok_embeddings.weight")
# the model args that decide which tokens run which block (and how LoRA adds): an adapter routes as
# trained only with its own values
ROUTING_KEYS = ("routing", "lora_rank", "lora_scale", "dynamic_active_target", "dynamic_start_layer",
                "dynamic_router_hdim", "dynamic_reserve_initials", "execute_threshold", "static_skip_layers")
# the keys a Meta params.json carries
BASE_PARAM_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                   "ffn_dim_multiplier", "norm_eps", "rope_theta")


def shard_dim(name: str, tied_embeddings: bool = False):
    """The dimension a tensor is split along across model-parallel ranks, or None if replicated.

    A tied embedding is split by vocabulary, like the output projection it doubles as."""
    if name == "tok_embeddings.weight" and tied_embeddings:
        return 0
    if name.endswith(COLUMN_PARALLEL):
        return 0
    if name.endswith(ROW_PARALLEL):
        return 1
    return None


def shard_state_dict(state_dict: Dict[str, torch.Tensor], mp_size: int, rank: int,
                     tied_embeddings: bool = False) -> Dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        dim = shard_dim(name, tied_embeddings)
        out[name] = tensor if dim is None else tensor.chunk(mp_size, dim)[rank].clone()
    return out


def unshard_state_dict(shards: List[Dict[str, torch.Tensor]], tied_embeddings: bool = False) -> Dict[str, torch.Tensor]:
    """The inverse of shard_state_dict: model-parallel shards concatenated into full tensors."""
    out = {}
    for name, tensor in shards[0].items():
        dim = shard_dim(name, tied_embeddings)
        out[name] = tensor if dim is None or len(shards) == 1 else torch.cat([s[name] for s in shards], dim)
    return out


def load_file(path: str) -> Dict[str, torch.Tensor]:
    """torch.load with weights_only; every refusal becomes one line naming the file."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: refused by torch.load(weights_only=True): {first}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InputError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def _check_state_dict(obj: dict, path: str) -> Dict[str, torch.Tensor]:
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path}: expected a state dict (name -> tensor), entry {bad[0]!r} is {type(obj[bad[0]]).__name__}")
    return obj


def checkpoint_layout(ckpt_dir: str) -> str:
    """"meta" or "hf", from the files the directory holds."""
    if not os.path.isdir(ckpt_dir):
        raise InputError(f"checkpoint directory not found: {ckpt_dir}")
    if os.path.isfile(os.path.join(ckpt_dir, "params.json")) or shard_files(ckpt_dir):
        return "meta"
    if hf_checkpoint.is_hf_dir(ckpt_dir):
        return "hf"
    raise InputError(f"{ckpt_dir}: neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a "
                     f"Hugging Face one (config.json + *.safetensors)")


def params_file(ckpt_dir: str) -> str:
    """Where a base checkpoint keeps its model args: params.json (Meta) or config.json (Hugging Face)."""
    return os.path.join(ckpt_dir, "params.json" if checkpoint_layout(ckpt_dir) == "meta" else "config.json")


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
            config = hf_checkpoint.read_config(os.path.dirname(path))
            check_types(config, HF_CONFIG_TYPES, path)
            return ModelArgs.from_dict(hf_checkpoint.config_to_params(config, path), **overrides)
        with open(path) as f:
            params = json.load(f)
        if isinstance(params, dict):
            check_types(params, typing.get_type_hints(ModelArgs), path)
        return ModelArgs.from_dict(params, **overrides)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a valid {os.path.basename(path)} ({e})") from None


def meta_params(args: ModelArgs) -> dict:
    """The params.json of a Meta-layout base: Meta's keys, plus the others where not the default."""
    params = {k: v for k, v in args.to_dict().items() if k in BASE_PARAM_KEYS}
    derived = ModelArgs(**{k: params[k] for k in BASE_PARAM_KEYS})
    if args.head_dim != derived.head_dim:
        params["head_dim"] = args.head_dim
    if args.ffn_hidden_dim != derived.ffn_hidden_dim:
        params["hidden_dim"] = args.ffn_hidden_dim
    if args.tie_word_embeddings:
        params["tie_word_embeddings"] = True
    if args.rope_scaling == META_LLAMA3_ROPE_SCALING:
        params["use_scaled_rope"] = True
    elif args.rope_scaling is not None:
        params["rope_scaling"] = args.rope_scaling
    return params


def shard_files(ckpt_dir: str) -> List[str]:
    """A Meta checkpoint directory's consolidated.NN.pth shards, in rank order."""
    return sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))


def default_model_parallel_size(ckpt_dir: str) -> int:
    """A Meta checkpoint runs with one rank per shard; a Hugging Face one is split on load, so 1."""
    return max(1, len(shard_files(ckpt_dir))) if checkpoint_layout(ckpt_dir) == "meta" else 1


def _shard_hint(n_shards: int) -> str:
    """How to match the shard count, in the words of the script the user started."""
    if os.environ.get("DLLM_LAUNCHER") == "finetuning.sh":
        return f"set MODEL_PARALLEL_SIZE={n_shards} and NPROC to a multiple of it"
    return f"run with --nproc_per_node {n_shards} (or reshard)"


def base_shard_path(ckpt_dir: str) -> str:
    """The consolidated.NN.pth of this model-parallel rank; the shard count must equal the MP size."""
    if not os.path.isdir(ckpt_dir):
        raise InputError(f"checkpoint directory not found: {ckpt_dir}")
    shards = shard_files(ckpt_dir)
    if not shards:
        raise InputError(f"no consolidated.*.pth files in {ckpt_dir}")
    if len(shards) != distributed.mp_size():
        raise InputError(
            f"{ckpt_dir} has {len(shards)} checkpoint shard(s) but model parallel size is "
            f"{distributed.mp_size()}; {_shard_hint(len(shards))}"
        )
    return shards[distributed.mp_rank()]


def load_into(model: Transformer, state_dict: Dict[str, torch.Tensor], path: str, adapter: bool):
    """Copy tensors into the model after checking names and shapes (this rank's shard)."""
    own = model.state_dict()
    for name, tensor in state_dict.items():
        if name in IGNORED_KEYS:
            continue
        if name not in own:
            kind = "adapter" if adapter else "base"
            raise InputError(f"{path}: {kind} tensor {name!r} has no place in this model (check params.json / --lora_rank)")
        if adapter and not is_adapter_key(name):
            raise InputError(f"{path}: {name!r} is not a router or LoRA tensor; adapter files hold only those")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise InputError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(own[name].shape)} (params.json does not match the checkpoint)"
            )
    missing = [k for k in own if is_adapter_key(k) == adapter and k not in state_dict]
    if missing:
        kind = "adapter" if adapter else "base"
        raise InputError(f"{path}: {kind} tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if name not in IGNORED_KEYS:
                own[name].copy_(tensor)


def check_base(ckpt_dir: str):
    """The base weights exist for this rank: a missing model says so before anything else loads."""
    if checkpoint_layout(ckpt_dir) == "meta":
        base_shard_path(ckpt_dir)
    else:
        hf_checkpoint.weight_files(ckpt_dir)


def read_hf_weights(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint, under its Hugging Face name."""
    state_dict = {}
    for path in hf_checkpoint.weight_files(ckpt_dir):
        if path.endswith(".safetensors"):
            try:
                state_dict.update(load_safetensors(path))
            except (SafetensorError, OSError) as e:
                raise InputError(f"{path}: not a readable safetensors file ({e})") from None
        else:
            state_dict.update(_check_state_dict(load_file(path), path))
    return state_dict


def read_base(ckpt_dir: str, args: ModelArgs) -> Dict[str, torch.Tensor]:
    """The whole base model in this code's names and layout, from either checkpoint layout."""
    if checkpoint_layout(ckpt_dir) == "hf":
        return hf_checkpoint.hf_to_meta(read_hf_weights(ckpt_dir), args, ckpt_dir)
    shards = [_check_state_dict(load_file(path), path) for path in shard_files(ckpt_dir)]
    if not shards:
        raise InputError(f"no consolidated.*.pth files in {ckpt_dir}")
    return unshard_state_dict(shards, args.tie_word_embeddings)


def load_base(model: Transformer, ckpt_dir: str):
    if checkpoint_layout(ckpt_dir) == "meta":
        path = base_shard_path(ckpt_dir)
        load_into(model, _check_state_dict(load_file(path), path), path, adapter=False)
        return
    full = read_base(ckpt_dir, model.params)
    local = shard_state_dict(full, distributed.mp_size(), distributed.mp_rank(), model.params.tie_word_embeddings)
    load_into(model, local, ckpt_dir, adapter=False)


def adapter_file(path: str) -> str:
    """An adapter directory (a fine-tuning run's output) resolves to its NAME-last.pth, else to its
    newest checkpoint file; a file is used as is."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.pth")), key=os.path.getmtime)
        if not files:
            raise InputError(f"no adapter checkpoint (*.pth) in {path}")
        last = [f for f in files if f.endswith("-last.pth")]
        return (last or files)[-1]
    if not os.path.isfile(path):
        raise InputError(f"adapter checkpoint not found: {path}")
    return path


def adapter_own_args(adapter: str) -> Tuple[Optional[dict], Optional[str]]:
    """The model args an adapter was trained with, and the file that holds them: those its checkpoint
    records (a fine-tuning checkpoint carries `model_args`, exactly as that file was trained and
    calibrated), else the params.json next to it; (None, None) if it has neither."""
    file = adapter_file(adapter)
    recorded = read_adapter(file).get("model_args")
    if isinstance(recorded, dict):
        return recorded, file
    path = os.path.join(os.path.dirname(os.path.abspath(file)), "params.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f), path
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a valid params.json ({e})") from None
    return None, None


def _model_args(params: dict, path: str, **overrides) -> ModelArgs:
    try:
        return ModelArgs.from_dict(params, **overrides)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: not valid model args ({e})") from None


def adapter_args(adapter: str, model_args_path: Optional[str] = None, **overrides) -> Tuple[ModelArgs, str]:
    """The model args an adapter runs with and where they came from: its own (adapter_own_args); an
    explicit `model_args_path` must agree with them on every routing key, so an adapter always
    routes as it was trained."""
    own, own_path = adapter_own_args(adapter)
    if model_args_path is None:
        if own is None:
            raise InputError(f"{adapter}: the checkpoint records no model_args and there is no params.json next to "
                             f"it; give its model args with --model_args_path")
        return _model_args(own, own_path, **overrides), own_path
    args = load_params(model_args_path, **overrides)
    if own is not None:
        trained = _model_args(own, own_path, **overrides)  # the same overrides: they cannot conflict
        differing = [f"{key} {getattr(args, key)!r} vs {getattr(trained, key)!r}" for key in ROUTING_KEYS
                     if getattr(args, key) != getattr(trained, key)]
        if differing:
            raise InputError(f"{model_args_path} conflicts with the adapter's own model args in {own_path}: "
                             f"{'; '.join(differing)} (leave out --model_args_path to route as trained)")
    return args, model_args_path


def shipped_adapter(base_dir: str, assets_dir: str) -> Optional[str]:
    """The checkpoint.pth of the first adapter directory under `assets_dir` whose params.json
    describes this base's architecture, so a shipped adapter comes with its base and no other."""
    base = load_params(base_dir)
    for directory in sorted(glob.glob(os.path.join(assets_dir, "*"))):
        params, ckpt = os.path.join(directory, "params.json"), os.path.join(directory, "checkpoint.pth")
        if not (os.path.isfile(params) and os.path.isfile(ckpt)):
            continue
        try:
            check_args_match(load_params(params), base, params, base_dir)
        except InputError:
            continue
        return ckpt
    return None


def default_adapter(base_dir: str, assets_dir: str = ASSETS) -> Optional[str]:
    """The adapter shipped for this base, if any, said once on stderr (example.py and evaluate.py
    run it when no --dynamic_ckpt_dir is given)."""
    adapter = shipped_adapter(base_dir, assets_dir)
    if adapter and speaks():
        print(f"adapter: {adapter} (shipped for this base; --dense runs the base alone)", file=sys.stderr)
    return adapter


def tensors_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """A content checksum of named tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# the base's architecture in its fingerprint, and the weights it samples (held by model-parallel
# rank 0 in every layout: rows 0..7 of column 0, the first row's first 8 values)
FINGERPRINT_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "head_dim",
                    "ffn_hidden_dim", "tie_word_embeddings", "rope_scaling")
FINGERPRINT_SAMPLES = (("tok_embeddings.weight", lambda w: w[:8, 0]), ("layers.0.attention.wq.weight", lambda w: w[0, :8]))
FINGERPRINT_RTOL = 1e-2  # the same base in bf16 or fp32 agrees; another base's weights do not


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


def base_fingerprint(model: Transformer) -> dict:
    """Which base an adapter was trained on: a hash of its architecture (floats rounded, so every
    conversion of one base hashes alike) and a sample of its weights."""
    arch = {key: arch_value(getattr(model.params, key)) for key in FINGERPRINT_KEYS}
    own = model.state_dict()
    sample = torch.cat([take(own[name].detach()).float() for name, take in FINGERPRINT_SAMPLES])
    if distributed.mp_size() > 1:  # every rank reports model-parallel rank 0's values
        sample = sample.to(distributed.default_device())
        dist.broadcast(sample, src=distributed.mp_src_rank(), group=distributed.mp_group())
    return {"params_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest(),
            "weights": [round(v, 6) for v in sample.cpu().tolist()]}


def fingerprint_text(fingerprint: dict) -> str:
    weights = ", ".join(f"{v:.4g}" for v in fingerprint["weights"][:3])
    return f"params {fingerprint['params_sha256'][:12]}, weights [{weights}, ...]"


def check_fingerprint(saved: Optional[dict], model: Transformer, path: str):
    """An adapter loads only on the base it was trained on (files older than fingerprints load as before)."""
    if saved is None:
        return
    own = base_fingerprint(model)
    same = saved["params_sha256"] == own["params_sha256"] and len(saved["weights"]) == len(own["weights"]) and all(
        abs(a - b) <= FINGERPRINT_RTOL * max(abs(a), abs(b)) + 1e-6 for a, b in zip(saved["weights"], own["weights"]))
    if not same:
        raise InputError(f"{path}: trained on another base model ({fingerprint_text(saved)}) than the one loaded "
                         f"({fingerprint_text(own)})")


class NonFiniteTensor(InputError):
    """A checkpoint about to be written holds NaN or inf."""


def _float_tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _float_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _float_tensors(value, f"{prefix}[{i}]")


def write_adapter(path: str, adapter: Dict[str, torch.Tensor], fingerprint: Optional[dict], **extra):
    """An adapter checkpoint (official layout: the tensors under "model") with their checksum and the
    base's fingerprint, written atomically; one holding NaN or inf is refused, the old file kept."""
    ckpt = {**extra, "model": adapter, "adapter_sha256": tensors_sha256(adapter)}
    if fingerprint is not None:
        ckpt["base_fingerprint"] = fingerprint
    for name, tensor in _float_tensors(ckpt):
        if not torch.isfinite(tensor).all():
            raise NonFiniteTensor(f"{path} not written: {name} holds non-finite values")
    atomic_save(ckpt, path)


def read_adapter(path: str) -> dict:
    """The whole adapter checkpoint; official files nest the tensors under "model". A file with a
    checksum must still match it."""
    path = adapter_file(path)
    obj = load_file(path)
    if not ("model" in obj and isinstance(obj["model"], dict)):
        return {"model": _check_state_dict(obj, path)}
    _check_state_dict(obj["model"], path)
    if "adapter_sha256" in obj and tensors_sha256(obj["model"]) != obj["adapter_sha256"]:
        raise InputError(f"checksum mismatch in {path}: its tensors changed after it was written (a damaged copy)")
    return obj


def load_adapter(model: Transformer, path: str, ckpt: Optional[dict] = None) -> dict:
    """Load routers and LoRA (full tensors, sliced here for this MP rank) into a model holding its
    base weights; returns the checkpoint (`ckpt`: the file, already read with read_adapter)."""
    ckpt = ckpt if ckpt is not None else read_adapter(path)
    check_fingerprint(ckpt.get("base_fingerprint"), model, adapter_file(path))
    local = shard_state_dict(ckpt["model"], distributed.mp_size(), distributed.mp_rank())
    load_into(model, local, adapter_file(path), adapter=True)
    return ckpt


def adapter_state_dict(model: Transformer) -> Dict[str, torch.Tensor]:
    """Full (unsharded) router and LoRA tensors; a collective over the model-parallel group."""
    out = {}
    for name, p in model.state_dict().items():
        if not is_adapter_key(name):
            continue
        tensor = p.detach()
        dim = shard_dim(name)
        if dim is not None and distributed.mp_size() > 1:
            parts = [torch.empty_like(tensor) for _ in range(distributed.mp_size())]
            dist.all_gather(parts, tensor.contiguous(), group=distributed.mp_group())
            tensor = torch.cat(parts, dim)
        out[name] = tensor.cpu().clone()
    return out


def save_meta_checkpoint(model: Transformer, out_dir: str, dtype: torch.dtype = torch.bfloat16, mp_size: int = 1):
    """Write the base model (no routers, no LoRA) in Meta's layout, split into `mp_size` shards.

    Takes a model built with model-parallel size 1 (the full tensors)."""
    full = {k: v.detach().to(dtype).cpu() for k, v in model.state_dict().items() if not is_adapter_key(k)}
    write_meta_shards(full, model.params, out_dir, mp_size)


def write_meta_shards(full: Dict[str, torch.Tensor], args: ModelArgs, out_dir: str, mp_size: int = 1):
    """Full base tensors -> `consolidated.NN.pth` for `mp_size` ranks and the params.json."""
    for rank in range(mp_size):
        shard = shard_state_dict(full, mp_size, rank, args.tie_word_embeddings)
        atomic_save(shard, os.path.join(out_dir, f"consolidated.{rank:02d}.pth"))
    atomic_write_text(json.dumps(meta_params(args), indent=2) + "\n", os.path.join(out_dir, "params.json"))



def build_model(args: ModelArgs, llama_ckpt_dir: str, adapter_path: str = None, device=None,
                dtype: torch.dtype = torch.float32) -> Transformer:
    """The base model in `dtype` (routers and LoRA stay fp32) with its checkpoint and optional adapter.

    Built on the CPU without random initialisation (fairscale allocates with the legacy
    constructor, which ignores device contexts), then moved to `device`.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Transformer(args, init_weights=False)
    finally:
        torch.set_default_dtype(previous)
    load_base(model, llama_ckpt_dir)
    if adapter_path:
        load_adapter(model, adapter_path)
    return model.to(device or distributed.default_device())


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


def check_vocab(args: ModelArgs, tokenizer, tokenizer_path: str):
    """Every token id has an embedding row, and the table is the tokenizer's (at most padded to a
    multiple of VOCAB_PADDING); Meta checkpoints leave vocab_size to the tokenizer."""
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    padded = VOCAB_PADDING * math.ceil(tokenizer.n_words / VOCAB_PADDING)
    if not tokenizer.n_words <= args.vocab_size <= max(padded, tokenizer.n_words):
        raise InputError(f"{tokenizer_path}: {tokenizer.n_words} tokens but the model's vocab_size is "
                         f"{args.vocab_size} (the tokenizer does not belong to this model)")
