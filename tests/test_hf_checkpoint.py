"""Hugging Face layout: configs (Llama-3 style, old and new forms), weight files, and what is refused."""
import json
import os

import pytest
import torch

from dllm.checkpoints import base_model, meta_layout, model_params
from dllm.errors import InputError
from dllm.generation import Llama
from dllm.core.model import ModelArgs, Transformer
from helpers import tiny_args


# Llama-3.1's shape in miniature: a 128k vocabulary, GQA 4:1, rope_theta 5e5 and "llama3" rope scaling
# whose context (1024) puts the head's four frequencies in all three bands (kept, smoothed, divided)
LLAMA3_STYLE = dict(
    vocab_size=128256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
)


def save_random_llama(directory, **config_overrides):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**LLAMA3_STYLE, **config_overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    for name, p in model.named_parameters():
        # norms away from 1, so a wrong norm placement shows; large q/k, so attention (and RoPE) matters
        std = 0.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.05 if p.ndim > 1 else 0.3
        torch.nn.init.normal_(p, std=std)
    model.save_pretrained(str(directory), max_shard_size="8MB")
    return model


def our_logits(directory, tokens):
    args = model_params.load_params(str(directory), lora_rank=0, max_seq_len=512)
    model = base_model.build_model(args, str(directory)).eval()
    with torch.no_grad():
        return model(tokens)[0]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama3-style")
    return directory, save_random_llama(directory)


@pytest.mark.slow
def test_llama3_style_logits_equal_transformers(llama3_dir):
    directory, reference = llama3_dir
    assert os.path.isfile(directory / "model.safetensors.index.json"), "the checkpoint should be sharded"
    args = model_params.load_params(str(directory))
    assert args.rope_scaling["rope_type"] == "llama3" and args.rope_theta == 500000.0
    assert (args.n_heads, args.n_kv_heads, args.vocab_size) == (8, 2, 128256)
    tokens = torch.randint(0, 128256, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
    diff = (our_logits(directory, tokens) - expected).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"


@pytest.mark.slow
def test_without_rope_scaling_the_logits_differ(llama3_dir, tmp_path):
    """The scaling is really applied: dropping it from the config changes the logits."""
    directory, reference = llama3_dir
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    for name in os.listdir(directory):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = torch.randint(0, 128256, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert (our_logits(tmp_path, tokens) - expected).abs().max().item() > 1e-2


@pytest.mark.slow
def test_transformers_4_config_form_reads_the_same(llama3_dir, tmp_path):
    """Older config.json files carry a top-level rope_theta and `rope_scaling` with a "type" key."""
    directory, _ = llama3_dir
    config = json.loads((directory / "config.json").read_text())
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters.pop("rope_theta")
    config["rope_scaling"] = {**parameters, "type": parameters.pop("rope_type")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_params.load_params(str(tmp_path)) == model_params.load_params(str(directory))


@pytest.mark.slow
def test_legacy_pytorch_model_bin_loads(llama3_dir, tmp_path):
    directory, reference = llama3_dir
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    tokens = torch.randint(0, 128256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert (our_logits(tmp_path, tokens) - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_missing_shard_is_one_line(llama3_dir, tmp_path):
    directory, _ = llama3_dir
    shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    for name in os.listdir(directory):
        if name != shards[-1]:
            (tmp_path / name).write_bytes((directory / name).read_bytes())
    with pytest.raises(InputError) as e:
        base_model.check_base(str(tmp_path))
    assert str(e.value) == (f"{tmp_path / 'model.safetensors.index.json'}: shard {shards[-1]} is missing "
                            f"(1 of {len(shards)} missing)")


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096 is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"model_type": "qwen2"}, "model_type 'qwen2' is not a Llama-family model this code runs"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn' is not supported"),
])
def test_unsupported_architectures_are_refused(tmp_path, change, message):
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
              "vocab_size": 320, "intermediate_size": 176}
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InputError) as e:
        model_params.load_params(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: {message}")


def test_meta_params_keep_what_a_meta_params_json_cannot_derive():
    """head_dim, FFN width, tying and rope scaling survive a Meta params.json; Llama-2's stays plain."""
    args = ModelArgs(dim=576, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=320, head_dim=32, hidden_dim=1000,
                     tie_word_embeddings=True, rope_scaling=dict(LLAMA3_STYLE["rope_parameters"], rope_theta=None))
    params = meta_layout.meta_params(args)
    assert (params["head_dim"], params["hidden_dim"], params["tie_word_embeddings"]) == (32, 1000, True)
    again = ModelArgs.from_dict(params)
    assert (again.head_dim, again.ffn_hidden_dim, again.tie_word_embeddings) == (32, 1000, True)
    assert set(meta_layout.meta_params(tiny_args())) <= set(meta_layout.BASE_PARAM_KEYS)


@pytest.mark.slow
def test_tokenizer_larger_than_the_embedding_is_refused(smollm2_tokenizer_dir, tmp_path):
    model = Transformer(tiny_args(lora_rank=0))
    meta_layout.save_meta_checkpoint(model, str(tmp_path), dtype=torch.float32)
    with pytest.raises(InputError) as e:
        Llama.build(str(tmp_path), tokenizer_path=smollm2_tokenizer_dir, max_seq_len=32, max_batch_size=1)
    assert str(e.value) == (f"{smollm2_tokenizer_dir}: 49152 tokens but the model's vocab_size is 320 "
                            f"(the tokenizer does not belong to this model)")


def test_random_weights_keep_the_shape_and_load_in_both_libraries(llama3_dir, tmp_path):
    """The stand-in base a GPU machine times on: the source's architecture and files, not its weights."""
    import transformers
    from dllm.checkpoints.conversion import convert

    directory, _ = llama3_dir
    out = tmp_path / "random"
    convert(str(directory), str(out), "hf", dtype=torch.float32, random_weights=True)
    assert model_params.load_params(str(out)) == model_params.load_params(str(directory))
    source = base_model.read_base(str(directory), model_params.load_params(str(directory)))
    stand_in = base_model.read_base(str(out), model_params.load_params(str(out)))
    assert {k: v.shape for k, v in stand_in.items()} == {k: v.shape for k, v in source.items()}
    assert not any(torch.equal(stand_in[k], v) for k, v in source.items() if v.ndim == 2)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = torch.randint(0, LLAMA3_STYLE["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(our_logits(out, tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
