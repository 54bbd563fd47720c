"""The shipped SmolLM2 adapters (trained on the project's fp32 conversion of the GGUF: the default one,
dense LoRA, and the D-LLM one at the paper's budget) load and route the same on every other conversion of that base: bf16, the Meta layout, and transformers'
save_pretrained of the GGUF (whose config stores rms_norm_eps as float32 rounds it:
9.999999747378752e-06)."""
import json
import os

import pytest
import torch

from dllm.checkpoints.conversion import convert
from dllm.generation import Llama

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["<|im_start|>user\nWhat is the capital of Norway?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nGive this passage a short title.\n\nAnd God said, Let there be light: and there was "
           "light.<|im_end|>\n<|im_start|>assistant\nThe"]


@pytest.fixture(scope="module", params=["smollm2", "smollm2-dllm"])
def adapter(request) -> str:
    return os.path.join(ROOT, "assets", request.param, "checkpoint.pth")


def routed(base_dir: str, adapter: str):
    """(logits, activation) of the shipped adapter on PROMPTS over the base in `base_dir`."""
    generator = Llama.build(base_dir, adapter, max_seq_len=128, max_batch_size=2, model_parallel_size=1)
    ids = [generator.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    width = min(len(i) for i in ids)
    with torch.inference_mode():
        return generator.model(torch.tensor([i[:width] for i in ids]))


@pytest.fixture(scope="module")
def on_own_fp32(smollm2_dir, adapter):
    return routed(smollm2_dir, adapter)


@pytest.fixture(scope="module")
def transformers_saved(transformers_smollm2, tmp_path_factory) -> str:
    """transformers' save_pretrained of its own GGUF loading (a plain LlamaForCausalLM: the
    GGUF-quantized object refuses to save)."""
    from transformers import LlamaForCausalLM

    loaded, tokenizer = transformers_smollm2
    config = loaded.config
    config.quantization_config = None
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    directory = str(tmp_path_factory.mktemp("smollm2-transformers"))
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_transformers_conversion_stores_the_float32_eps(transformers_saved):
    with open(os.path.join(transformers_saved, "config.json")) as f:
        assert json.load(f)["rms_norm_eps"] != 1e-05


@pytest.mark.parametrize("layout", ["transformers", "meta"])
def test_routes_identically_on_an_fp32_conversion(layout, adapter, on_own_fp32, smollm2_dir, transformers_saved, tmp_path):
    if layout == "meta":
        base_dir = str(tmp_path / "meta")
        convert(smollm2_dir, base_dir, "meta", dtype=torch.float32)
    else:
        base_dir = transformers_saved
    logits, activation = routed(base_dir, adapter)
    own_logits, own_activation = on_own_fp32
    assert torch.equal(activation, own_activation)
    assert (logits - own_logits).abs().max().item() < 1e-3


def test_routes_alike_on_the_bf16_conversion(adapter, on_own_fp32, smollm2_dir, tmp_path):
    """bf16 weights move the router's inputs a little: the same decisions almost everywhere."""
    base_dir = str(tmp_path / "bf16")
    convert(smollm2_dir, base_dir, "hf", dtype=torch.bfloat16)
    _, activation = routed(base_dir, adapter)
    _, own_activation = on_own_fp32
    assert (activation == own_activation).float().mean().item() >= 0.95
