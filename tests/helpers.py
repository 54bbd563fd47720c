"""Plain helpers the tests share (fixtures stay in conftest.py): tiny random models and their
configurations, generators and checkpoints built from them, the fine-tuning tests' inputs (a random
base in Meta's layout, an alpaca-layout dataset, finetuning.py's command line over them), and what a
test needs to run a child process. Imported as `from helpers import ...` (pytest.ini puts tests/ on
the path); it imports nothing beyond the run-time requirements.
"""
import contextlib
import importlib.util
import json
import os
import random
import shutil
import socket

import pytest
import torch

from dllm.atomic_io import atomic_save
from dllm.checkpoints.adapters import adapter_state_dict
from dllm.checkpoints.meta_layout import save_meta_checkpoint
from dllm.core.model import ModelArgs, Transformer, is_adapter_key
from dllm.generation import Llama
from dllm.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str):
    """A script outside the package (benchmarks/, tools/ run by path) as a module."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(relative_path))[0],
                                                  os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def subprocess_env() -> dict:
    """For a child python or torchrun: one thread, the repository importable, no inherited torchrun world."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_torch_thread():
    """Two cores shared with other jobs: more threads than that only slow tiny models down. Runs
    compared bit for bit must use the same thread count (reductions split differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32,
                dynamic_router_hdim=16, dynamic_start_layer=1, max_seq_len=64, lora_dropout=0.0)
    base.update(overrides)
    return ModelArgs(**base)


def randomize(model: Transformer, seed: int, router_scale: float = 0.0, lora_b_std: float = 0.0):
    """Weights large enough that attention is far from uniform (so layout mistakes show), norm
    weights away from 1, optionally random routers (so some tokens skip) and nonzero LoRA B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_key(name):
                continue
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name == "tok_embeddings.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        for layer in model.layers:
            if router_scale and layer.router is not None:
                layer.router.linear_2.weight.copy_(router_scale * torch.randn(2, layer.router.linear_2.in_features, generator=g))
                layer.router.linear_2.bias.zero_()
            lora = layer.attention
            if lora_b_std and lora.lora_q is not None:
                for part in (lora.lora_q, lora.lora_k, lora.lora_v):
                    part.linear_B.weight.copy_(lora_b_std * torch.randn(part.linear_B.weight.shape, generator=g))
    return model


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def small_args(**overrides) -> ModelArgs:
    base = dict(dim=8, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=10, multiple_of=4,
                dynamic_router_hdim=4, dynamic_start_layer=1)
    base.update(overrides)
    return ModelArgs(**base)


# layer 0 has no router (start layer 1): always executed.
#            position:  0  1  2  3
SMALL_EXECUTED = torch.tensor([[[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]]], dtype=torch.float32)  # [1, 4, 3]


PROMPTS = ["The quick brown fox", "She sold 48 clips in April and half as many in May. Question:", "A"]


def make_generator(tokenizer_path, seed=3, **overrides) -> Llama:
    tokenizer = Tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    args = tiny_args(vocab_size=tokenizer.n_words, max_seq_len=96, **overrides)
    model = randomize(Transformer(args), seed=seed, router_scale=3.0, lora_b_std=0.1).eval()
    return Llama(model, tokenizer)


def encode(generator, prompts):
    return [generator.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def write_demo_like(tmp_path, tokenizer_path, mp_size):
    """A base checkpoint (mp_size shards), an adapter, its model args and a tokenizer on disk."""
    generator = make_generator(tokenizer_path)
    model = generator.model
    base = tmp_path / "base"
    save_meta_checkpoint(model, str(base), dtype=torch.float32, mp_size=mp_size)
    (base / "tokenizer.model").write_bytes(open(tokenizer_path, "rb").read())
    atomic_save({"epoch": 1, "model": adapter_state_dict(model)}, str(tmp_path / "adapter.pth"))
    (tmp_path / "args.json").write_text(json.dumps(model.params.to_dict()))
    return generator, base


# kv_cache.CALL_COST_BYTES["cpu"] that forces each attention route at a routed block: tiny models'
# caches are far below the measured break-even, so without forcing they always take the batched call
ATTENTION_ROUTES = {"row_by_row": 0, "batched": float("inf")}


# The fine-tuning tests' inputs (the fixture `tiny`, tests/test_train.py and others).
# Base architecture: vocab 320 is the n_words of the fixture tokenizer_path's tokenizer; 4 heads /
# 2 KV heads split over model-parallel size 2.
BASE = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32, max_seq_len=48)
N_TRAIN, N_TEST, BATCH = 32, 8, 4

_WORDS = ("the quick brown fox jumps over lazy dog she sold 48 clips in April and half as many May "
          "which option is correct answer true false").split()
_INSTRUCTIONS = ("Continue the passage.", "Answer the question.", "Write a response.")


def make_base(directory: str, tokenizer_path: str, mp_sizes=(1,)) -> dict:
    """A random dense Llama-2 saved as `directory/mp{N}/` for each model-parallel size N."""
    torch.manual_seed(1234)
    model = Transformer(tiny_args(**BASE))
    with torch.no_grad():  # make the blocks matter: Llama's init is small for a 3-layer toy
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    out = {}
    for mp in mp_sizes:
        path = os.path.join(directory, f"mp{mp}")
        save_meta_checkpoint(model, path, dtype=torch.float32, mp_size=mp)
        shutil.copy(tokenizer_path, os.path.join(path, "tokenizer.model"))
        out[mp] = path
    return out


def records(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = lambda lo, hi: " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
        out.append({"instruction": rng.choice(_INSTRUCTIONS), "input": words(0, 4), "output": words(2, 8)})
    return out


def make_dataset(directory: str, name: str = "demo") -> str:
    """`directory/name/{train,test,prompt}.json` in the alpaca layout; returns `directory`."""
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    shutil.copy(os.path.join(ROOT, "datasets", "demo", "prompt.json"), os.path.join(directory, name, "prompt.json"))
    for split, n, seed in (("train", N_TRAIN, 1), ("test", N_TEST, 2)):
        with open(os.path.join(directory, name, f"{split}.json"), "w") as f:
            json.dump(records(n, seed), f, indent=1)
    return directory


def train_argv(base: str, data: str, out: str, *extra: str, **options) -> list:
    """finetuning.py arguments for a tiny run; keyword options override the defaults below."""
    values = dict(
        llama_ckpt_dir=base, dataset_path=data, dataset_name="demo", output_dir=out,
        max_seq_len=48, lora_rank=4, dynamic_router_hdim=16, dynamic_start_layer=1, dynamic_reserve_initials=2,
        dynamic_active_target=0.5, lambda_active=1.0, batch_size=BATCH, epochs=2, warmup_epochs=0.5,
        lr=5e-3, router_lr=2e-2, min_lr=1e-4, weight_decay=0.02, seed=0, log_freq=1,
    )
    values.update(options)
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv += [f"--{key}", str(list(value)) if isinstance(value, (list, tuple)) else str(value)]
    return argv + list(extra)


def read_log(out: str) -> list:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def one_line_error(capsys, argv: list) -> str:
    """finetuning.py's entry point in process: exit status 1 and exactly one line on stderr, no traceback."""
    import finetuning
    from dllm.errors import run_cli
    from dllm.training.loop import train

    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        run_cli(lambda: train(finetuning.parse_args(argv)))
    assert excinfo.value.code == 1
    err = capsys.readouterr().err  # progress bars may precede it
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    message = err[err.index("error: "):]
    assert message.endswith("\n") and message.count("\n") == 1, message
    return message.rstrip("\n")
