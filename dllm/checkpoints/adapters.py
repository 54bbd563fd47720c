"""Adapter checkpoints (the official layout: {"epoch", "model": {router and LoRA tensors}, ...}),
with a checksum of their tensors and a fingerprint of the base they were trained on."""
import glob
import hashlib
import json
import os
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from dllm import distributed
from dllm.atomic_io import atomic_save
from dllm.checkpoints.state_dicts import load_into
from dllm.checkpoints.model_params import FINGERPRINT_KEYS, ROUTING_KEYS, arch_value, load_params, model_args
from dllm.checkpoints.sharding import shard_dim, shard_state_dict
from dllm.checkpoints.state_dicts import check_state_dict, load_file
from dllm.core.model import ModelArgs, Transformer, is_adapter_key
from dllm.errors import InputError


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


def adapter_args(adapter: str, model_args_path: Optional[str] = None, **overrides) -> Tuple[ModelArgs, str]:
    """The model args an adapter runs with and where they came from: its own (adapter_own_args); an
    explicit `model_args_path` must agree with them on every routing key, so an adapter always
    routes as it was trained."""
    own, own_path = adapter_own_args(adapter)
    if model_args_path is None:
        if own is None:
            raise InputError(f"{adapter}: the checkpoint records no model_args and there is no params.json next to "
                             f"it; give its model args with --model_args_path")
        return model_args(own, own_path, **overrides), own_path
    args = load_params(model_args_path, **overrides)
    if own is not None:
        trained = model_args(own, own_path, **overrides)  # the same overrides: they cannot conflict
        differing = [f"{key} {getattr(args, key)!r} vs {getattr(trained, key)!r}" for key in ROUTING_KEYS
                     if getattr(args, key) != getattr(trained, key)]
        if differing:
            raise InputError(f"{model_args_path} conflicts with the adapter's own model args in {own_path}: "
                             f"{'; '.join(differing)} (leave out --model_args_path to route as trained)")
    return args, model_args_path


def tensors_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """A content checksum of named tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


FINGERPRINT_SAMPLES = (("tok_embeddings.weight", lambda w: w[:8, 0]), ("layers.0.attention.wq.weight", lambda w: w[0, :8]))


FINGERPRINT_RTOL = 1e-2  # the same base in bf16 or fp32 agrees; another base's weights do not


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
        return {"model": check_state_dict(obj, path)}
    check_state_dict(obj["model"], path)
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
