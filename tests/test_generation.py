"""Generation with real skipping: incremental decoding equals teacher forcing, the cache keeps only
executed pairs and starts fresh every call, dense mode is the plain model, MP 2 equals MP 1."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dllm.atomic_io import atomic_save
from dllm.errors import InputError
from dllm.generation import Llama
from dllm.core.routing import DenseRouting
from dllm.chat import ChatFormat
from helpers import PROMPTS, ROOT, encode, free_port, make_generator, write_demo_like



def teacher_forced(model, tokens):
    with torch.inference_mode():
        return model(torch.tensor([tokens]))


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "ragged"])
def test_incremental_logits_equal_teacher_forcing(tokenizer_path, prompts):
    """Meta's loop (prefill to the shortest prompt, then one position at a time for every row)
    through the evicting cache gives each row the logits and routing of one full forward."""
    generator = make_generator(tokenizer_path)
    model = generator.model
    prompt_tokens = encode(generator, prompts)
    out, logprobs, _, stats = generator.generate(prompt_tokens, max_gen_len=12, temperature=0.0, logprobs=True)
    assert 0 < stats.activation[..., model.params.dynamic_start_layer:].mean() < 1, "routers must skip some tokens"

    # the same positions, stepped by hand, keeping every step's full logits
    seqs = [p + o for p, o in zip(prompt_tokens, out)]
    width = min(len(s) for s in seqs)
    cache = model.new_cache(len(seqs))
    tokens = torch.tensor([s[:width] for s in seqs])
    start = min(len(p) for p in prompt_tokens)
    step_logits = []
    with torch.inference_mode():
        logits, _ = model(tokens[:, :start], 0, cache)
        step_logits.append(logits)
        for pos in range(start, width):
            logits, _ = model(tokens[:, pos : pos + 1], pos, cache)
            step_logits.append(logits)
    incremental = torch.cat(step_logits, 1)

    for row, seq in enumerate(seqs):
        full_logits, full_activation = teacher_forced(model, seq)
        assert (incremental[row] - full_logits[0, :width]).abs().max() <= 1e-4
        n = len(seq)
        assert torch.equal(stats.activation[row, : n - 0][: stats.lengths[row]], full_activation[0, : stats.lengths[row]])
        expected = -F.cross_entropy(full_logits[0, :-1], torch.tensor(seq[1:]), reduction="none")[len(prompt_tokens[row]) - 1 :]
        assert (torch.tensor(logprobs[row]) - expected).abs().max() <= 1e-4


def test_cache_keeps_only_executed_pairs(tokenizer_path):
    generator = make_generator(tokenizer_path)
    model = generator.model
    tokens = torch.tensor([encode(generator, [PROMPTS[1]])[0][:16]] * 2)
    tokens[1, 5:] = 7  # rows differ, so they route differently
    cache = model.new_cache(2)
    with torch.inference_mode():
        _, activation = model(tokens, 0, cache)
        _, step = model(tokens[:, :1] + 1, tokens.shape[1], cache)
    activation = torch.cat([activation, step], 1)
    executed = activation > 0.5
    assert 0 < executed.float().mean() < 1
    assert torch.equal(cache.tokens_kept(), executed.sum(1).T.long())
    assert cache.bytes_kept() == int(executed.sum()) * cache.pair_bytes()
    attn = model.layers[0].attention
    assert cache.pair_bytes() == 2 * attn.n_local_kv_heads * attn.head_dim * 4
    # memory is allocated for what is kept (in chunks), not max_seq_len per block
    for layer, kv in enumerate(cache.layers):
        assert kv.capacity == -(-int(executed[:, :, layer].sum(1).max()) // kv.chunk) * kv.chunk
    # and the cache generate() used holds exactly the executed pairs of every token it fed
    stats = generator.generate(encode(generator, PROMPTS), max_gen_len=6, temperature=0.0).routing
    assert stats.cache_bytes_kept == int(stats.activation.sum()) * stats.pair_bytes


@pytest.mark.slow
def test_reused_generator_equals_fresh_ones(tokenizer_path):
    reused = make_generator(tokenizer_path)
    first = encode(reused, PROMPTS)
    second = encode(reused, ["Which option is correct?", "The lazy dog"])
    a = reused.generate(first, 10, temperature=0.0, logprobs=True)
    b = reused.generate(second, 10, temperature=0.0, logprobs=True)
    assert a == make_generator(tokenizer_path).generate(first, 10, temperature=0.0, logprobs=True)
    assert b == make_generator(tokenizer_path).generate(second, 10, temperature=0.0, logprobs=True)


@pytest.mark.slow
def test_dense_mode_is_the_plain_model(tokenizer_path):
    """DenseRouting on a model with routers equals a model that has no routers at all."""
    routed = make_generator(tokenizer_path)
    routed.model.use_routing(DenseRouting())
    plain = make_generator(tokenizer_path, dynamic_start_layer=routed.model.n_layers)
    plain.model.load_state_dict({k: v for k, v in routed.model.state_dict().items() if ".router." not in k})
    prompts = encode(routed, PROMPTS)
    out_routed = routed.generate(prompts, 10, temperature=0.0, logprobs=True)
    out_plain = plain.generate(prompts, 10, temperature=0.0, logprobs=True)
    assert out_routed[0] == out_plain[0]
    assert max(abs(x - y) for a, b in zip(out_routed[1], out_plain[1]) for x, y in zip(a, b)) <= 1e-5
    assert out_routed.routing.activation.min() == 1


@pytest.mark.slow
def test_sampling_is_seeded_and_top_p_bounded(tokenizer_path):
    generator = make_generator(tokenizer_path)
    prompts = encode(generator, PROMPTS)
    torch.manual_seed(5)
    a = generator.generate(prompts, 8, temperature=0.8, top_p=0.9)
    torch.manual_seed(5)
    assert generator.generate(prompts, 8, temperature=0.8, top_p=0.9) == a
    actprobs = a[2]
    assert all(0 < x <= 1 for row in actprobs for x in row)


def test_batch_and_length_limits(tokenizer_path):
    generator = make_generator(tokenizer_path, max_batch_size=2)
    with pytest.raises(InputError, match="3 prompts but max_batch_size is 2"):
        generator.generate(encode(generator, PROMPTS), 4)
    with pytest.raises(InputError, match="prompt 0 has 100 tokens, longer than max_seq_len 96"):
        generator.generate([[1] * 100], 4)


def build_from(tmp_path, base, **kwargs):
    return Llama.build(str(base), str(tmp_path / "adapter.pth"), str(tmp_path / "args.json"),
                       str(base / "tokenizer.model"), max_seq_len=96, max_batch_size=4, **kwargs)


@pytest.mark.slow
def test_build_loads_adapter_and_merges_lora(tmp_path, tokenizer_path):
    generator, base = write_demo_like(tmp_path, tokenizer_path, mp_size=1)
    built = build_from(tmp_path, base)
    assert built.model.layers[0].attention.lora_q is None, "LoRA is merged at build time"
    prompts = encode(generator, PROMPTS)
    expected = generator.generate(prompts, 10, temperature=0.0, logprobs=True)
    got = built.generate(prompts, 10, temperature=0.0, logprobs=True)
    assert got[0] == expected[0]
    assert max(abs(x - y) for a, b in zip(got[1], expected[1]) for x, y in zip(a, b)) <= 1e-4


def test_build_rejects_adapter_that_does_not_fit(tmp_path, tokenizer_path):
    _, base = write_demo_like(tmp_path, tokenizer_path, mp_size=1)
    args = json.loads((tmp_path / "args.json").read_text())
    args["dynamic_router_hdim"] = 8
    (tmp_path / "args.json").write_text(json.dumps(args))
    with pytest.raises(InputError, match=r"tensor 'layers.1.router.linear_1.weight' has shape \(16, 64\) but the model expects \(8, 64\)"):
        build_from(tmp_path, base)
    args["dim"] = 32
    (tmp_path / "args.json").write_text(json.dumps(args))
    with pytest.raises(InputError, match="dim=32 but the base model's .*params.json has 64"):
        build_from(tmp_path, base)


def test_build_runs_an_adapter_with_its_own_model_args(tmp_path, tokenizer_path):
    """Those its checkpoint records, else the params.json next to it, else one line asking for them."""
    generator, base = write_demo_like(tmp_path, tokenizer_path, mp_size=1)
    args = generator.model.params.to_dict()
    adapter = torch.load(tmp_path / "adapter.pth", weights_only=True)
    run = tmp_path / "run"
    run.mkdir()
    atomic_save(adapter, str(run / "checkpoint-last.pth"))
    (run / "params.json").write_text(json.dumps(dict(args, execute_threshold=0.7)))
    build = lambda path: Llama.build(str(base), path, max_seq_len=96, max_batch_size=4)  # noqa: E731
    assert build(str(run)).model.params.execute_threshold == 0.7
    atomic_save(dict(adapter, model_args=dict(args, execute_threshold=0.3)), str(run / "checkpoint-last.pth"))
    assert build(str(run)).model.params.execute_threshold == 0.3
    with pytest.raises(InputError, match="records no model_args and there is no params.json next to it"):
        build(str(tmp_path / "adapter.pth"))


@pytest.mark.slow
def test_model_parallel_2_generates_the_same_tokens(tmp_path, tokenizer_path):
    generator, base = write_demo_like(tmp_path, tokenizer_path, mp_size=2)
    prompts = encode(generator, PROMPTS)
    expected, _, expected_act, _ = generator.generate(prompts, 10, temperature=0.0)
    out = tmp_path / "mp_tokens.json"
    script = (
        "import json, sys; sys.path.insert(0, {root!r}); from dllm.generation import Llama;"
        "g = Llama.build({base!r}, {adapter!r}, {args!r}, {tok!r}, max_seq_len=96, max_batch_size=4);"
        "r = g.generate({prompts!r}, 10, temperature=0.0);"
        "import torch.distributed as d; d.get_rank() == 0 and json.dump([r[0], r[2]], open({out!r}, 'w'))"
    ).format(root=ROOT, base=str(base), adapter=str(tmp_path / "adapter.pth"), args=str(tmp_path / "args.json"),
             tok=str(base / "tokenizer.model"), prompts=prompts, out=str(out))
    worker = tmp_path / "worker.py"
    worker.write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(worker)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens, actprobs = json.loads(out.read_text())
    assert tokens == expected
    assert max(abs(x - y) for a, b in zip(actprobs, expected_act) for x, y in zip(a, b)) <= 1e-6


@pytest.mark.slow
def test_example_py_under_torchrun_2_on_one_shard_answers_once(tmp_path, tokenizer_path):
    """The model-parallel size defaults to the shard count (1), so two processes are data parallel:
    the answers are printed once, by rank 0, and a bad input is one line, also once."""
    _, base = write_demo_like(tmp_path, tokenizer_path, mp_size=1)
    common = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
              os.path.join(ROOT, "example.py"), "--llama_ckpt_dir", str(base),
              "--dynamic_ckpt_dir", str(tmp_path / "adapter.pth"), "--model_args_path", str(tmp_path / "args.json"),
              "--max_seq_len", "96", "--max_gen_len", "4", "--prompt_path", os.path.join(ROOT, "datasets", "demo", "prompt.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run(common + ["--instructs", "['The quick brown fox', 'A']", "--temperature", "0"],
                        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.count("### Instruction: ") == 2 and ok.stdout.count("blocks executed:") == 2, ok.stdout
    bad = subprocess.run(common + ["--instructs", "['a', 'b']", "--inputs", "['x']"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert bad.returncode != 0
    assert bad.stderr.count("error: --inputs has 1 entries for 2 --instructs") == 1, bad.stderr[-3000:]


@pytest.mark.slow
def test_chat_completion_formats_dialogs(tokenizer_path):
    generator = make_generator(tokenizer_path)
    dialogs = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "The quick brown fox"}],
               [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]]
    out = generator.chat_completion(dialogs, temperature=0.0, max_gen_len=4)
    assert [o["generation"]["role"] for o in out] == ["assistant", "assistant"]
    chat = ChatFormat(generator.tokenizer)
    tokens = generator.generate([chat.encode_dialog(d) for d in dialogs], 4, temperature=0.0, stop_ids=chat.stop_ids).tokens
    assert [o["generation"]["content"] for o in out] == [generator.tokenizer.decode(t) for t in tokens]
    with pytest.raises(InputError, match="last message of a dialog must be from the user"):
        generator.chat_completion([[{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]])


@pytest.mark.slow
def test_example_chat_prints_a_dialogue(tmp_path, tokenizer_path, capsys):
    from dllm.instruct import InstructConfig, answer

    _, base = write_demo_like(tmp_path, tokenizer_path, mp_size=1)
    config = InstructConfig(llama_ckpt_dir=str(base), dynamic_ckpt_dir=str(tmp_path / "adapter.pth"),
                            model_args_path=str(tmp_path / "args.json"), max_seq_len=96, max_gen_len=4,
                            temperature=0.0, chat=True, instructs=["The quick brown fox", "A"], inputs=["", "B"])
    capsys.readouterr()
    answer(config)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "User: The quick brown fox" and lines[2].startswith("> Assistant: ")
    assert "User: A" in lines and "B" in lines and "###" not in "\n".join(lines)
