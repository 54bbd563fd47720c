"""Real checkpoints: SmolLM2-135M-Instruct from its GGUF, Hugging Face layouts, conversion, against transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm.checkpoints.adapters import adapter_state_dict
from dllm.checkpoints.model_params import load_params
from dllm.atomic_io import atomic_save
from dllm.chat import ChatFormat
from dllm.checkpoints.conversion import convert
from dllm.errors import InputError
from dllm.generation import Llama
from dllm.core.model import Transformer
from helpers import ROOT, free_port, make_dataset, read_log, subprocess_env, train_argv

pytestmark = pytest.mark.slow


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In 1969, Neil Armstrong became the first person to",
    "Les élèves ont appris que 12 × 12 = 144 et",
]
QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in one sentence.",
]


def padded_batch(tokenizer, texts):
    """Right-padded ids and the lengths: rows compared only on their real tokens."""
    ids = [tokenizer.encode(t, bos=True, eos=False) for t in texts]
    width = max(len(x) for x in ids)
    return torch.tensor([x + [0] * (width - len(x)) for x in ids]), [len(x) for x in ids]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return Llama.build(smollm2_dir, max_seq_len=256, max_batch_size=4, model_parallel_size=1)


def test_smollm2_args_come_from_the_gguf(smollm2):
    p = smollm2.model.params
    assert (p.dim, p.n_layers, p.n_heads, p.n_kv_heads, p.head_dim, p.ffn_hidden_dim) == (576, 30, 9, 3, 64, 1536)
    assert (p.vocab_size, p.rope_theta, p.norm_eps, p.tie_word_embeddings) == (49152, 100000.0, 1e-5, True)
    # tied: the output projection is the embedding tensor itself, not a copy
    assert smollm2.model.output is None
    assert "output.weight" not in smollm2.model.state_dict()


def test_smollm2_logits_equal_transformers_gguf_loading(smollm2, transformers_smollm2):
    """Max abs difference within 1e-4 (logits reach about 40), or within transformers' own
    rounding noise where that is larger: its sdpa and eager attention disagree by up to 4.4e-4 on
    these prompts (measured), more than we disagree with its sdpa (at most 1.2e-4)."""
    reference, _ = transformers_smollm2
    tokens, lengths = padded_batch(smollm2.tokenizer, PROMPTS)
    with torch.no_grad():
        ours, _ = smollm2.model(tokens)
        theirs = reference(tokens).logits
        reference.set_attn_implementation("eager")
        try:
            theirs_eager = reference(tokens).logits
        finally:
            reference.set_attn_implementation("sdpa")
    for row, n in enumerate(lengths):
        diff = (ours[row, :n] - theirs[row, :n]).abs().max().item()
        oracle_noise = (theirs_eager[row, :n] - theirs[row, :n]).abs().max().item()
        assert diff <= max(1e-4, oracle_noise), f"prompt {row}: max abs logit difference {diff} (transformers' own: {oracle_noise})"


def _transformers_greedy(reference, prompt_tokens, n_new):
    out = []
    for tokens in prompt_tokens:
        ids = reference.generate(torch.tensor([tokens]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(tokens):].tolist())
    return out


def write_all_executing_adapter(base_dir, out_dir):
    """A D-LLM adapter for the base whose routers execute every block (skip logit -20, execute +20)
    and whose LoRA is zero: the routed code path, with the plain model's function."""
    args = load_params(base_dir, lora_rank=4, dynamic_router_hdim=8, dynamic_router_bias=(-20.0, 20.0), max_seq_len=64)
    model = Transformer(args)
    os.makedirs(out_dir)
    atomic_save({"epoch": 0, "model": adapter_state_dict(model)}, os.path.join(out_dir, "checkpoint.pth"))
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(args.to_dict(), f)
    return os.path.join(out_dir, "checkpoint.pth")


@torch.no_grad()
def transformers_greedy(reference, tokens, n_new):
    """transformers' incremental decoding with its own KV cache, argmax, not stopping at eos."""
    out = reference(torch.tensor([tokens]), use_cache=True)
    generated = [int(out.logits[0, -1].argmax())]
    for _ in range(n_new - 1):
        out = reference(torch.tensor([generated[-1:]]), cache=out.cache, use_cache=True)
        generated.append(int(out.logits[0, -1].argmax()))
    return generated


def test_smollm2_greedy_chat_equals_transformers(smollm2, smollm2_dir, transformers_smollm2, tmp_path):
    """32 new tokens on 4 chat prompts, no early stop: the incremental evicting cache under D-LLM
    routing (an adapter that executes everything) and the dense model give transformers' tokens."""
    reference, _ = transformers_smollm2
    chat = ChatFormat(smollm2.tokenizer)
    prompts = [chat.encode_dialog([{"role": "user", "content": q}]) for q in QUESTIONS]
    expected = [transformers_greedy(reference, tokens, 32) for tokens in prompts]
    adapter = write_all_executing_adapter(smollm2_dir, str(tmp_path / "adapter"))
    routed = Llama.build(smollm2_dir, adapter, max_seq_len=256, max_batch_size=4, model_parallel_size=1)
    assert routed.model.layers[-1].router is not None
    tokens, _, actprobs, _ = routed.generate(prompts, 32, temperature=0.0, stop_ids=())
    assert tokens == expected
    assert all(share == 1.0 for row in actprobs for share in row)
    dense = Llama.build(smollm2_dir, adapter, max_seq_len=256, max_batch_size=4, model_parallel_size=1, dense=True)
    assert dense.generate(prompts, 32, temperature=0.0, stop_ids=())[0] == expected


def test_smollm2_chat_completion_stops_at_end_of_turn(smollm2):
    out = smollm2.chat_completion([[{"role": "user", "content": QUESTIONS[0]}]], temperature=0.0, max_gen_len=48)
    assert out[0]["generation"]["content"] == "The capital of France is Paris."


def _tensors(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def test_hf_meta_hf_round_trip_is_bit_exact(smollm2_dir, tmp_path):
    hf = str(tmp_path / "hf-bf16")
    convert(smollm2_dir, hf, "hf", max_shard_bytes=100 * 2**20)  # bf16, sharded with an index
    assert os.path.isfile(os.path.join(hf, "model.safetensors.index.json"))
    meta = str(tmp_path / "meta-mp3")
    convert(hf, meta, "meta", model_parallel_size=3)
    assert sorted(n for n in os.listdir(meta) if n.endswith(".pth")) == [f"consolidated.0{i}.pth" for i in range(3)]
    meta1 = str(tmp_path / "meta-mp1")
    convert(meta, meta1, "meta")  # resharding 3 -> 1
    back = str(tmp_path / "hf-again")
    convert(meta1, back, "hf")
    before, after = _tensors(hf), _tensors(back)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, after[name]), name
    assert load_params(back) == load_params(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert open(os.path.join(back, name)).read() == open(os.path.join(smollm2_dir, name)).read(), name


def test_convert_refuses_an_existing_directory(smollm2_dir, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists; convert into a new directory"):
        convert(smollm2_dir, str(target), "meta")
    assert os.listdir(target) == ["keep.txt"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


@pytest.fixture(scope="module")
def smollm2_4_layers(smollm2_dir, tmp_path_factory):
    """SmolLM2 cut to its first 4 blocks (Hugging Face layout): the model-parallel test's model."""
    directory = tmp_path_factory.mktemp("smollm2-4") / "hf"
    directory.mkdir()
    config = json.load(open(os.path.join(smollm2_dir, "config.json")))
    config["num_hidden_layers"] = 4
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in _tensors(smollm2_dir).items()
               if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4}
    save_file(tensors, str(directory / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / name).write_bytes(open(os.path.join(smollm2_dir, name), "rb").read())
    return str(directory)


MP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from dllm.errors import run_cli
from dllm.generation import Llama
def main():
    g = Llama.build(sys.argv[1], max_seq_len=64, max_batch_size=4, model_parallel_size=int(os.environ["WORLD_SIZE"]))
    logits, _ = g.model(torch.load(sys.argv[2]))
    if dist.get_rank() == 0:
        torch.save(logits, sys.argv[3])
run_cli(main)
"""


def _run_model_parallel(tmp_path, nproc, ckpt, tokens):
    script, inputs, out = tmp_path / "mp.py", tmp_path / "tokens.pth", tmp_path / "logits.pth"
    script.write_text(MP_SCRIPT)
    torch.save(tokens, inputs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(script), ckpt, str(inputs), str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300), out


def test_smollm2_model_parallel_3_equals_one_process(smollm2_4_layers, tmp_path):
    generator = Llama.build(smollm2_4_layers, max_seq_len=64, max_batch_size=4, model_parallel_size=1)
    tokens, _ = padded_batch(generator.tokenizer, PROMPTS[:2])
    with torch.no_grad():
        expected, _ = generator.model(tokens)
    proc, out = _run_model_parallel(tmp_path, 3, smollm2_4_layers, tokens)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = (torch.load(out) - expected).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"


def test_kv_heads_that_do_not_split_are_one_line(smollm2_4_layers, tmp_path):
    tokens = torch.tensor([[1, 2, 3]])
    proc, _ = _run_model_parallel(tmp_path, 2, smollm2_4_layers, tokens)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines and lines[0] == ("error: n_heads=9 and n_kv_heads=3 do not divide by the model-parallel size 2; "
                                  "use a model-parallel size that divides it")


def test_fine_tune_on_a_hugging_face_base_keeps_embeddings_tied(smollm2_4_layers, tmp_path):
    """finetuning.py takes a Hugging Face directory as it is (tokenizer.json, config.json); the adapter
    it writes loads with Llama.build; the tied embedding is frozen and stays one tensor."""
    import finetuning
    from dllm.training.loop import Trainer

    out = tmp_path / "run"
    trainer = Trainer(finetuning.parse_args(train_argv(smollm2_4_layers, make_dataset(str(tmp_path / "data")),
                                                       str(out), epochs=1, dynamic_router_hdim=8)))
    embedding = trainer.model.tok_embeddings.weight
    before = embedding.detach().clone()
    assert trainer.model.output is None and not embedding.requires_grad
    trainer.train()
    assert torch.equal(embedding, before)
    assert all(torch.isfinite(torch.tensor(r["c_loss"])) for r in read_log(str(out)) if "c_loss" in r)
    generator = Llama.build(smollm2_4_layers, str(out / "checkpoint-0.pth"), max_seq_len=64, max_batch_size=2)
    assert generator.model.layers[-1].router is not None
    tokens = generator.generate([generator.tokenizer.encode("Once upon a time", bos=True, eos=False)], 4,
                                temperature=0.0, stop_ids=()).tokens
    assert len(tokens[0]) == 4
