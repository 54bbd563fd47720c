"""Checkpoint loading: every bad input is one InputError line that says what is wrong; a good
base + adapter round trip reproduces the model exactly; Meta params.json files are accepted."""
import json
import os
import shutil
import re

import pytest
import torch

from dllm.core.objective import compute_loss
from dllm.atomic_io import atomic_save, atomic_write
from dllm.checkpoints.adapters import adapter_state_dict, load_adapter, read_adapter
from dllm.checkpoints.meta_layout import base_shard_path, save_meta_checkpoint
from dllm.checkpoints.base_model import load_base
from dllm.checkpoints.state_dicts import load_file
from dllm.checkpoints.model_params import args_from_dict, load_params
from dllm.assets import shipped_adapter
from dllm.errors import InputError
from dllm.core.model import ModelArgs, Transformer
from dllm.core.routing import DLLMRouting
from helpers import ROOT, randomize, tiny_args

ADAPTER_ARGS = dict(n_layers=2, lora_rank=4)


class NotATensor:
    """A custom class: weights_only loading must refuse to unpickle it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def _model(seed=40, **overrides):
    torch.manual_seed(seed)
    args = dict(ADAPTER_ARGS)
    args.update(overrides)
    return Transformer(tiny_args(**args))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random model saved as a one-shard fp32 Meta checkpoint plus an adapter file."""
    root = tmp_path_factory.mktemp("ckpt")
    model = randomize(_model(), seed=41, router_scale=2.0, lora_b_std=0.2)
    save_meta_checkpoint(model, str(root / "base"), dtype=torch.float32, mp_size=1)
    atomic_save({"epoch": 3, "model": adapter_state_dict(model)}, str(root / "adapter.pth"))
    return model, root


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _fresh(args: ModelArgs = None) -> Transformer:
    return Transformer(args or tiny_args(**ADAPTER_ARGS), init_weights=False)


# ----------------------------------------------------------------------------------------------
# bad inputs


def test_missing_checkpoint_directory(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(InputError) as e:
        load_base(_fresh(), missing)
    assert _one_line(e) == f"checkpoint directory not found: {missing}"
    with pytest.raises(InputError) as e:
        base_shard_path(missing)
    assert "checkpoint directory not found" in _one_line(e)
    with pytest.raises(InputError) as e:
        load_params(missing)
    assert missing in _one_line(e) and "not found" in str(e.value)


def test_directory_of_neither_layout(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(InputError) as e:
        load_params(str(tmp_path))
    assert _one_line(e) == (f"{tmp_path}: neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a "
                            f"Hugging Face one (config.json + *.safetensors)")


def test_missing_params_json_file(tmp_path):
    with pytest.raises(InputError) as e:
        load_params(str(tmp_path / "params.json"))
    assert _one_line(e) == f"model args file not found: {tmp_path / 'params.json'}"


def test_invalid_params_json(tmp_path):
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(InputError) as e:
        load_params(str(tmp_path))
    assert "not a valid params.json" in _one_line(e)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 320}))
    args = load_params(str(tmp_path))
    assert args.dim == 64


@pytest.mark.parametrize("text", ["[]", '"dim"', "[[\"dim\", 64]]"])
def test_params_json_that_is_not_an_object(tmp_path, text):
    """A params.json holding an array or a string is bad input, not a crash (AttributeError)."""
    (tmp_path / "params.json").write_text(text)
    with pytest.raises(InputError) as e:
        load_params(str(tmp_path))
    assert "not a valid params.json" in _one_line(e)


def test_no_consolidated_shards(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(InputError) as e:
        load_base(_fresh(), str(tmp_path))
    assert _one_line(e) == f"no consolidated.*.pth files in {tmp_path}"


def test_shard_count_differs_from_model_parallel_size(tmp_path):
    model = _model()
    save_meta_checkpoint(model, str(tmp_path), dtype=torch.float32, mp_size=2)
    with pytest.raises(InputError) as e:
        load_base(_fresh(), str(tmp_path))
    message = _one_line(e)
    assert "has 2 checkpoint shard(s) but model parallel size is 1" in message
    assert message.endswith("run it with 2 model-parallel processes (or reshard it)")


def test_params_json_not_matching_tensor_shapes(saved, tmp_path):
    _, root = saved
    params = json.loads((root / "base" / "params.json").read_text())
    params["multiple_of"] = 128  # ffn width 256 instead of 192
    (tmp_path / "params.json").write_text(json.dumps(params))
    os.symlink(root / "base" / "consolidated.00.pth", tmp_path / "consolidated.00.pth")
    args = load_params(str(tmp_path), **{k: v for k, v in tiny_args(**ADAPTER_ARGS).to_dict().items() if k not in params})
    model = _fresh(args)
    assert (tiny_args(**ADAPTER_ARGS).ffn_hidden_dim, args.ffn_hidden_dim) == (192, 256)
    with pytest.raises(InputError) as e:
        load_base(model, str(tmp_path))
    message = _one_line(e)
    assert "'layers.0.feed_forward.w1.weight'" in message
    assert "shape (192, 64) but the model expects (256, 64)" in message
    assert "params.json does not match the checkpoint" in message


def test_base_tensor_missing_or_extra(tmp_path, saved):
    model, _ = saved
    state = {k: v for k, v in model.state_dict().items() if ".router." not in k and ".lora_" not in k}
    (tmp_path / "params.json").write_text("{}")
    atomic_save({k: v for k, v in state.items() if k != "norm.weight"}, str(tmp_path / "consolidated.00.pth"))
    with pytest.raises(InputError) as e:
        load_base(_fresh(), str(tmp_path))
    assert "base tensor 'norm.weight' is missing (1 missing in all)" in _one_line(e)
    atomic_save(dict(state, **{"layers.9.attention.wq.weight": torch.zeros(2)}), str(tmp_path / "consolidated.00.pth"))
    with pytest.raises(InputError) as e:
        load_base(_fresh(), str(tmp_path))
    assert "base tensor 'layers.9.attention.wq.weight' has no place in this model" in _one_line(e)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    torch.save([torch.zeros(2), torch.ones(2)], path)
    with pytest.raises(InputError) as e:
        load_file(str(path))
    assert _one_line(e) == f"{path}: expected a state dict (name -> tensor), got list"
    with pytest.raises(InputError) as e:
        load_base(_fresh(), str(tmp_path))
    assert "expected a state dict (name -> tensor), got list" in _one_line(e)
    # a dict whose values are not tensors
    torch.save({"tok_embeddings.weight": [1, 2, 3]}, path)
    with pytest.raises(InputError) as e:
        load_base(_fresh(), str(tmp_path))
    assert "entry 'tok_embeddings.weight' is list" in _one_line(e)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(InputError) as e:
        load_file(str(path))
    assert _one_line(e).startswith(f"{path}: not a readable torch checkpoint (")
    with pytest.raises(InputError) as e:
        load_file(str(tmp_path / "missing.pth"))
    assert _one_line(e) == f"checkpoint file not found: {tmp_path / 'missing.pth'}"


@pytest.mark.parametrize("payload", ["custom-class", "function"])
def test_pickle_refused_by_weights_only(tmp_path, payload):
    path = tmp_path / "consolidated.00.pth"
    obj = NotATensor() if payload == "custom-class" else {"w": torch.zeros(2), "hook": os.system}
    torch.save(obj, path)
    with pytest.raises(InputError) as e:
        load_file(str(path))
    assert re.match(re.escape(f"{path}: refused by torch.load(weights_only=True): ") + r"\S", _one_line(e))
    # the same through the adapter loader
    with pytest.raises(InputError) as e:
        load_adapter(_model(), str(path))
    assert "refused by torch.load(weights_only=True)" in _one_line(e)


def test_adapter_tensor_of_wrong_shape(saved, tmp_path):
    model, root = saved
    state = read_adapter(str(root / "adapter.pth"))["model"]
    state = dict(state)
    state["layers.1.router.linear_1.weight"] = torch.zeros(8, 64)
    path = tmp_path / "bad.pth"
    atomic_save({"epoch": 0, "model": state}, str(path))
    with pytest.raises(InputError) as e:
        load_adapter(_model(), str(path))
    message = _one_line(e)
    assert "'layers.1.router.linear_1.weight'" in message and "(8, 64)" in message and "(16, 64)" in message


def test_adapter_with_non_adapter_key(saved, tmp_path):
    model, root = saved
    state = dict(read_adapter(str(root / "adapter.pth"))["model"])
    state["layers.0.attention.wq.weight"] = model.state_dict()["layers.0.attention.wq.weight"]
    path = tmp_path / "bad.pth"
    atomic_save({"epoch": 0, "model": state}, str(path))
    with pytest.raises(InputError) as e:
        load_adapter(_model(), str(path))
    assert _one_line(e) == f"{path}: 'layers.0.attention.wq.weight' is not a router or LoRA tensor; adapter files hold only those"


def test_adapter_for_a_different_model(saved, tmp_path):
    _, root = saved
    with pytest.raises(InputError) as e:
        load_adapter(_model(lora_rank=0), str(root / "adapter.pth"))
    assert "adapter tensor 'layers.0.attention.lora_q.linear_A.weight' has no place in this model" in _one_line(e)
    with pytest.raises(InputError) as e:
        load_adapter(_model(), str(tmp_path / "missing.pth"))
    assert _one_line(e) == f"adapter checkpoint not found: {tmp_path / 'missing.pth'}"
    with pytest.raises(InputError) as e:
        load_adapter(_model(), str(tmp_path))
    assert _one_line(e) == f"no adapter checkpoint (*.pth) in {tmp_path}"


def test_adapter_missing_router_tensors(saved, tmp_path):
    """An adapter trained with dynamic_start_layer=2 loaded into a model routed from layer 1 must
    not leave layer 1's router at its random initialisation without a word."""
    model, root = saved
    state = read_adapter(str(root / "adapter.pth"))["model"]
    partial = {k: v for k, v in state.items() if not k.startswith("layers.1.router.")}
    path = tmp_path / "partial.pth"
    atomic_save({"epoch": 0, "model": partial}, str(path))
    with pytest.raises(InputError) as e:
        load_adapter(_model(seed=44), str(path))
    assert "layers.1.router." in _one_line(e) and "missing" in str(e.value)


# ----------------------------------------------------------------------------------------------
# good inputs


@pytest.mark.slow
def test_official_adapter_layout_with_optimizer_state(saved, tmp_path):
    """{"epoch", "model", "optimizer", "scaler"} as the reference writes it loads with weights_only."""
    model, root = saved
    trainer = _model(seed=45)
    trainer.set_adapter_trainable(True)
    opt = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    trainer.train()
    tokens, ones = torch.randint(3, 320, (1, 8)), torch.ones(1, 8, dtype=torch.bool)
    c_loss, a_loss, _ = compute_loss(trainer, tokens, tokens, ones, ones)
    (c_loss + a_loss).backward()
    opt.step()
    path = tmp_path / "checkpoint-1.pth"
    atomic_save({"epoch": 1, "model": adapter_state_dict(trainer), "optimizer": opt.state_dict(), "scaler": None}, str(path))
    fresh = _model(seed=46)
    ckpt = load_adapter(fresh, str(path))
    assert ckpt["epoch"] == 1 and ckpt["scaler"] is None
    fresh.set_adapter_trainable(True)
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    opt2.load_state_dict(ckpt["optimizer"])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for name, tensor in adapter_state_dict(trainer).items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


@pytest.mark.slow
def test_round_trip_reproduces_logits_exactly(saved):
    model, root = saved
    params = json.loads((root / "base" / "params.json").read_text())
    overrides = {k: v for k, v in model.params.to_dict().items() if k not in params}
    args = load_params(str(root / "base"), **overrides)
    assert args == model.params
    fresh = _fresh(args)
    load_base(fresh, str(root / "base"))
    ckpt = load_adapter(fresh, str(root / "adapter.pth"))
    assert ckpt["epoch"] == 3
    # a directory resolves to its newest adapter file
    assert read_adapter(str(root))["epoch"] == 3

    tokens = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        for m in (model, fresh):
            m.eval()
            m.use_routing(DLLMRouting(args))
        want, want_act = model(tokens)
        got, got_act = fresh(tokens)
    assert 0 < want_act[:, 2:, 1:].mean() < 1  # the loaded routers skip some tokens
    assert torch.equal(got_act, want_act)
    assert torch.equal(got, want)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_bare_adapter_state_dict_is_accepted(saved, tmp_path):
    model, root = saved
    path = tmp_path / "bare.pth"
    atomic_save(adapter_state_dict(model), str(path))
    fresh = _model(seed=43)
    load_adapter(fresh, str(path))
    for name, tensor in adapter_state_dict(model).items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


META_LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
META_LLAMA2_70B = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                   "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
META_LLAMA3_8B = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                  "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                  "vocab_size": 128256}


@pytest.mark.parametrize("params,ffn", [(META_LLAMA2_7B, 11008), (META_LLAMA2_70B, 28672), (META_LLAMA3_8B, 14336)])
def test_model_args_accept_meta_params_json(params, ffn, capsys, tmp_path):
    args = ModelArgs.from_dict(params)
    assert args.dim == params["dim"] and args.n_layers == params["n_layers"]
    assert args.vocab_size == params["vocab_size"]
    assert args.ffn_hidden_dim == ffn
    assert args.head_dim == 128
    # D-LLM settings keep the reference defaults
    assert (args.lora_rank, args.dynamic_start_layer, args.dynamic_reserve_initials) == (8, 2, 2)
    # the tokenizer's vocabulary size replaces -1; None overrides are ignored
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    args = load_params(str(tmp_path), vocab_size=320, lora_rank=None)
    assert args.vocab_size == 320 and args.lora_rank == 8


def test_model_args_ignore_unknown_keys_with_a_warning(capsys):
    args = args_from_dict({**META_LLAMA2_70B, "moe_num_experts": 8})
    err = capsys.readouterr().err
    assert "warning: ignoring unknown model args ['moe_num_experts']" in err
    assert args.n_kv_heads == 8
    args_from_dict(META_LLAMA3_8B)
    args_from_dict(META_LLAMA2_7B)
    assert "warning" not in capsys.readouterr().err


def test_meta_use_scaled_rope_means_llama3_scaling_with_metas_constants():
    args = ModelArgs.from_dict(META_LLAMA3_8B)
    assert args.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert ModelArgs.from_dict(META_LLAMA2_7B).rope_scaling is None


def test_model_args_round_trip_through_json():
    args = tiny_args(dynamic_router_bias=(0.5, 1.5))
    again = ModelArgs.from_dict(json.loads(json.dumps(args.to_dict())))
    assert again == args and isinstance(again.dynamic_router_bias, tuple)


def test_shipped_adapter_is_found_by_the_base_it_was_trained_on(tmp_path):
    assets = os.path.join(ROOT, "assets")
    assert shipped_adapter(os.path.join(assets, "tiny-llama2"), assets) == os.path.join(assets, "tiny-dllm", "checkpoint.pth")
    save_meta_checkpoint(Transformer(tiny_args(lora_rank=0)), str(tmp_path / "other"), dtype=torch.float32)
    assert shipped_adapter(str(tmp_path / "other"), assets) is None


def test_a_base_with_two_shipped_adapters_runs_the_first_in_name_order(tmp_path):
    for name in ("tiny-b", "tiny", "tiny-a"):
        shutil.copytree(os.path.join(ROOT, "assets", "tiny-dllm"), tmp_path / name)
    assert shipped_adapter(os.path.join(ROOT, "assets", "tiny-llama2"), str(tmp_path)) == str(tmp_path / "tiny" / "checkpoint.pth")


def test_a_failed_atomic_write_keeps_the_old_file_and_says_which_file(tmp_path, monkeypatch):
    """A full disk (or any OSError) during the write: one InputError naming the file, the old
    content unchanged, no temp file left behind."""
    path = tmp_path / "results.json"
    path.write_text("old")

    def full_disk(f):
        f.write(b"new, partly")
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match=r"could not write .*results\.json: No space left on device"):
        atomic_write(str(path), full_disk)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
