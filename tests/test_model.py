"""The model against an independent oracle, the KV-eviction semantics, and one training step.

- Oracle: with LoRA at zero and every router executing, our Meta-layout model must be Llama-2, so
  its logits must equal transformers' LlamaForCausalLM on the same (converted) weights.
- Eviction: a token that skips block l leaves no trace in any other token's output at block l,
  and the real-skipping inference path computes the same function as the masked training path.
- Training: only routers and LoRA receive gradients and change; the base stays bit-identical.
"""
import inspect


import pytest
import torch
import torch.nn.functional as F

from dllm.core.objective import compute_loss, scored_positions
from dllm.core.model import Transformer, blend, is_adapter_key
from dllm.core.routing import Decision, DenseRouting, DLLMRouting, FixedRouting
from helpers import max_diff, randomize, tiny_args


# ----------------------------------------------------------------------------------------------
# helpers


def force_execute(model: Transformer):
    """Router logits independent of the input with p(execute) = 1 (also under Gumbel noise)."""
    with torch.no_grad():
        for layer in model.layers:
            if layer.router is not None:
                layer.router.linear_2.weight.zero_()
                layer.router.linear_2.bias.copy_(torch.tensor([-1e4, 1e4]))


def meta_to_hf(model: Transformer):
    """Our Meta-layout weights in a transformers LlamaForCausalLM (LoRA and routers dropped)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    args = model.params
    n_kv = args.n_kv_heads or args.n_heads
    hd = args.head_dim
    kwargs = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=n_kv,
        rms_norm_eps=args.norm_eps, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers >= 5
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": args.rope_theta}
    else:
        kwargs["rope_theta"] = args.rope_theta
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config).float().eval()

    def permute(w, heads):
        return w.view(heads, hd // 2, 2, args.dim).transpose(1, 2).reshape(heads * hd, args.dim)

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(args.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        new[dst + "self_attn.q_proj.weight"] = permute(sd[src + "attention.wq.weight"], args.n_heads)
        new[dst + "self_attn.k_proj.weight"] = permute(sd[src + "attention.wk.weight"], n_kv)
        new[dst + "self_attn.v_proj.weight"] = sd[src + "attention.wv.weight"]
        new[dst + "self_attn.o_proj.weight"] = sd[src + "attention.wo.weight"]
        new[dst + "mlp.gate_proj.weight"] = sd[src + "feed_forward.w1.weight"]
        new[dst + "mlp.down_proj.weight"] = sd[src + "feed_forward.w2.weight"]
        new[dst + "mlp.up_proj.weight"] = sd[src + "feed_forward.w3.weight"]
        new[dst + "input_layernorm.weight"] = sd[src + "attention_norm.weight"]
        new[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
    hf.load_state_dict(new, strict=True)
    return hf


def make_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_args(**overrides))


def routed_layers(model):
    return [layer.layer_id for layer in model.layers if layer.router is not None]


# ----------------------------------------------------------------------------------------------
# 1. oracle: transformers' Llama on the same weights

CONFIGS = {
    "mha": dict(n_heads=4, n_kv_heads=None),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mha-nolora": dict(n_heads=4, n_kv_heads=4, lora_rank=0),
    "gqa8-nolora": dict(dim=64, n_heads=8, n_kv_heads=2, lora_rank=0),
}
_ORACLE = {}


def oracle_case(name):
    """(model with forced-execute routers, tokens, HF logits); built once per configuration."""
    if name not in _ORACLE:
        model = randomize(make_model(seed=1, n_layers=3, **CONFIGS[name]), seed=2)
        if model.params.lora_rank > 0:  # LoRA B starts at zero, so LoRA is a no-op
            for layer in model.layers:
                for part in (layer.attention.lora_q, layer.attention.lora_k, layer.attention.lora_v):
                    assert torch.count_nonzero(part.linear_B.weight) == 0
                    assert torch.count_nonzero(part.linear_A.weight) > 0
        else:
            assert model.layers[0].attention.lora_q is None
        force_execute(model)
        tokens = torch.randint(0, model.params.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = meta_to_hf(model)(tokens).logits.float()
        _ORACLE[name] = (model, tokens, expected)
    return _ORACLE[name]


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["dense", "dllm-forced"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_logits_match_transformers_llama(config, mode, routing):
    model, tokens, expected = oracle_case(config)
    model.train(mode == "train")
    model.use_routing(DenseRouting() if routing == "dense" else DLLMRouting(model.params))
    with torch.no_grad():
        logits, activation = model(tokens)
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert torch.all(activation == 1)  # every router executed (forced), so this is plain Llama
    assert expected.abs().max() > 1.0  # not a vacuous comparison of near-zero logits
    assert max_diff(logits, expected) <= 1e-4


@pytest.mark.slow
def test_oracle_is_sensitive_to_rotary_layout():
    """Control: without the rotary permutation the same comparison fails clearly."""
    model, tokens, expected = oracle_case("gqa")
    model.eval()
    model.use_routing(DenseRouting())
    hf = meta_to_hf(model)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            hf.model.layers[i].self_attn.q_proj.weight.copy_(layer.attention.wq.weight)
            hf.model.layers[i].self_attn.k_proj.weight.copy_(layer.attention.wk.weight)
        wrong = hf(tokens).logits.float()
        logits, _ = model(tokens)
    assert max_diff(logits, wrong) > 1e-2


# ----------------------------------------------------------------------------------------------
# 2. eviction semantics


def _block_inputs(model, b=2, s=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, model.params.dim, generator=g)
    positions = torch.arange(s).expand(b, s)
    return x, positions


@pytest.mark.parametrize("config", ["gqa", "mha"])
def test_skipped_token_is_evicted_at_block(config):
    model = randomize(make_model(seed=4, **{k: v for k, v in CONFIGS[config].items()}), seed=5)
    model.train()
    layer = model.layers[2]
    x, positions = _block_inputs(model)
    b, s = positions.shape
    mask = torch.ones(b, s, dtype=torch.bool)
    j = 3
    mask[0, j] = False  # token (0, j) skips this block
    mask[0, 6] = False  # another skipped token after it
    mask[1, 0] = False  # row 1: the first token skips (no attention sink)
    routing = FixedRouting({layer.layer_id: mask})

    with torch.no_grad():
        out, decision = layer(x, positions, model.freqs_cis, routing)
        assert torch.equal(decision.mask, mask)
        # the skipped token passes through unchanged
        assert torch.equal(out[~mask], x[~mask])

        # perturb the skipped token's input: no other token's output may change
        x2 = x.clone()
        x2[0, j] += 3.0 * torch.randn(model.params.dim, generator=torch.Generator().manual_seed(9))
        out2, _ = layer(x2, positions, model.freqs_cis, routing)
        others = torch.ones(b, s, dtype=torch.bool)
        others[0, j] = False
        assert max_diff(out2[others], out[others]) <= 1e-6
        assert torch.equal(out2[0, j], x2[0, j])

        # same for the skipped first token of row 1
        x3 = x.clone()
        x3[1, 0] += 3.0
        out3, _ = layer(x3, positions, model.freqs_cis, routing)
        others = torch.ones(b, s, dtype=torch.bool)
        others[1, 0] = False
        assert max_diff(out3[others], out[others]) <= 1e-6

        # control: perturbing an executing token does change later tokens of its row
        x4 = x.clone()
        x4[0, 2] += 3.0
        out4, _ = layer(x4, positions, model.freqs_cis, routing)
        assert max_diff(out4[0, 4:], out[0, 4:]) > 1e-3
        assert max_diff(out4[1], out[1]) <= 1e-6  # rows are independent
        assert max_diff(out4[0, :2], out[0, :2]) <= 1e-6  # causal


def test_all_execute_mask_is_a_no_op():
    model = randomize(make_model(seed=6), seed=7)
    model.train()
    x, positions = _block_inputs(model)
    layer = model.layers[1]
    with torch.no_grad():
        dense, none = layer(x, positions, model.freqs_cis, DenseRouting())
        masked, _ = layer(x, positions, model.freqs_cis, FixedRouting({1: torch.ones(positions.shape, dtype=torch.bool)}))
    assert none is None
    assert max_diff(dense, masked) <= 1e-6
    # the same at model level, every routed block with an all-True mask
    tokens = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        model.use_routing(DenseRouting())
        ref, _ = model(tokens)
        model.use_routing(FixedRouting({i: torch.ones(2, 10, dtype=torch.bool) for i in routed_layers(model)}))
        got, activation = model(tokens)
    assert torch.all(activation == 1)
    assert max_diff(ref, got) <= 1e-6


def _random_masks(model, b, s, seed):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for i in routed_layers(model):
        masks[i] = torch.rand(b, s, generator=g) < 0.6
    ids = routed_layers(model)
    masks[ids[0]][1, :] = False  # a whole row skips a block
    masks[ids[1]][0, 0] = False  # the first token skips a block
    masks[ids[-1]][:, :] = True  # a block every token executes
    return masks


@pytest.mark.slow
@pytest.mark.parametrize("config", ["gqa", "mha"])
def test_gather_path_equals_masked_path(config):
    model = randomize(make_model(seed=10, n_layers=5, **CONFIGS[config]), seed=11, lora_b_std=0.2)
    b, s = 3, 12
    tokens = torch.randint(0, 320, (b, s), generator=torch.Generator().manual_seed(12))
    model.use_routing(FixedRouting(_random_masks(model, b, s, seed=13)))
    with torch.no_grad():
        model.train()
        masked, act_train = model(tokens)
        model.eval()
        cache = model.new_cache(b)
        gathered, act_eval = model(tokens, cache=cache)
    assert torch.equal(act_train, act_eval)
    assert max_diff(masked, gathered) <= 1e-5
    # eviction in memory: the cache keeps exactly the executed (token, block) pairs
    kept = cache.tokens_kept()  # [n_layers, b]
    assert torch.equal(kept, act_eval.sum(1).T.long())


def test_incremental_decode_equals_full_forward():
    """Prefill + one token at a time through the evicting cache == one full eval forward."""
    model = randomize(make_model(seed=14, n_layers=4), seed=15, router_scale=2.0, lora_b_std=0.2)
    model.eval()
    b, s, prefill = 2, 14, 5
    tokens = torch.randint(0, 320, (b, s), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        full, act_full = model(tokens)
        routed = act_full[:, 2:, 1:]
        assert 0 < routed.mean() < 1, "the routers should make some tokens skip and some execute"
        cache = model.new_cache(b)
        parts, acts = [], []
        logits, act = model(tokens[:, :prefill], 0, cache)
        parts.append(logits), acts.append(act)
        for t in range(prefill, s):
            logits, act = model(tokens[:, t:t + 1], t, cache)
            parts.append(logits), acts.append(act)
    assert torch.equal(torch.cat(acts, 1), act_full)
    assert max_diff(torch.cat(parts, 1), full) <= 1e-5
    assert torch.equal(cache.tokens_kept(), act_full.sum(1).T.long())


def test_merge_lora_keeps_logits():
    model = randomize(make_model(seed=17), seed=18, router_scale=2.0, lora_b_std=0.2)
    model.eval()
    tokens = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(19))
    with torch.no_grad():
        before, act_before = model(tokens)
        model.merge_lora()
        after, act_after = model(tokens)
    assert model.layers[0].attention.lora_q is None
    assert torch.equal(act_before, act_after)
    assert max_diff(before, after) <= 1e-5


# ----------------------------------------------------------------------------------------------
# 3. a training step


def _batch(b=2, s=12, seed=20):
    g = torch.Generator().manual_seed(seed)
    examples = torch.randint(3, 320, (b, s), generator=g)
    example_masks = torch.ones(b, s, dtype=torch.bool)
    example_masks[1, -3:] = False  # padding at the end of row 1
    examples[~example_masks] = 0
    label_masks = example_masks & (torch.arange(s) >= 4)  # the response starts at position 4
    return examples, examples.clone(), example_masks, label_masks


def test_training_step_updates_only_adapter():
    args = dict(lora_rank=4, dynamic_router_hdim=16)
    model = randomize(make_model(seed=21, **args), seed=22, lora_b_std=0.1)
    p = model.params
    n_trainable = model.set_adapter_trainable(True)
    n_kv = p.n_kv_heads or p.n_heads
    router = p.dim * p.dynamic_router_hdim + p.dynamic_router_hdim + p.dynamic_router_hdim + 2 * p.dynamic_router_hdim + 2
    lora = 3 * p.lora_rank * p.dim + p.lora_rank * (p.n_heads + 2 * n_kv) * p.head_dim
    assert n_trainable == (p.n_layers - p.dynamic_start_layer) * router + p.n_layers * lora

    base = {k: v.detach().clone() for k, v in model.named_parameters() if not is_adapter_key(k)}
    adapter = {k: v.detach().clone() for k, v in model.named_parameters() if is_adapter_key(k)}
    assert sum(v.numel() for v in adapter.values()) == n_trainable
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2, weight_decay=0.02)
    c_loss, a_loss, metrics = compute_loss(model, *_batch())
    assert torch.isfinite(c_loss) and torch.isfinite(a_loss)
    assert 0.0 <= metrics["act_ratio"] <= 1.0
    (c_loss + a_loss).backward()
    for name, q in model.named_parameters():
        if is_adapter_key(name):
            assert q.requires_grad and q.grad is not None, name
            assert torch.count_nonzero(q.grad) > 0, name
        else:
            assert not q.requires_grad and q.grad is None, name
    opt.step()
    for name, q in model.named_parameters():
        if is_adapter_key(name):
            assert not torch.equal(q, adapter[name]), name
        else:
            assert torch.equal(q, base[name]), name


def _every_token_with_autograd(layer, x, freqs_cis, key_keep):
    """The block's output for every token, all of it recorded by autograd: what forward_split must equal."""
    attention = layer.attention
    q, k, v = attention.project(layer.attention_norm(x), freqs_cis)
    s = x.shape[1]
    causal, own = torch.ones(s, s, dtype=torch.bool).tril(), torch.eye(s, dtype=torch.bool)
    mask = torch.where(key_keep[:, None, :], causal, own)  # earlier keys of executing tokens, and its own
    return layer._ffn(x + attention.wo(attention.attend(q, k.transpose(1, 2), v.transpose(1, 2), mask)))


def _blended_grads(layer, x, weight, block_out, seed=25):
    """The blend's output and the gradients of a random projection of it: input, weight (when it has
    one) and every LoRA tensor."""
    out = blend(weight, block_out, x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    wrt = [x] + [weight] * weight.requires_grad + [p for n, p in layer.named_parameters() if ".lora_" in n]
    return out, torch.autograd.grad((out * probe).sum(), wrt)


@pytest.mark.parametrize("weight_grad", [True, False], ids=["dllm-weight", "fixed-weight"])
def test_split_training_block_equals_every_token_with_autograd(weight_grad):
    model = randomize(make_model(seed=24, **CONFIGS["gqa"]), seed=25, lora_b_std=0.2)
    model.train()
    layer = model.layers[2]
    x, positions = _block_inputs(model)
    x.requires_grad_()
    mask = torch.rand(positions.shape, generator=torch.Generator().manual_seed(26)) < 0.5
    mask[0, 0] = False  # a first token that skips
    assert 0 < int(mask.sum()) < mask.numel()
    weight = mask.float().requires_grad_(weight_grad)
    freqs_cis = model.freqs_cis[positions]
    got, got_grads = _blended_grads(layer, x, weight, layer.forward_split(x, freqs_cis, Decision(weight, mask)))
    ref, ref_grads = _blended_grads(layer, x, weight, _every_token_with_autograd(layer, x, freqs_cis, mask))
    assert max_diff(got, ref) <= 1e-5
    assert len(got_grads) == len(ref_grads) == 7 + weight_grad  # x, six LoRA tensors, the weight
    for g, r in zip(got_grads, ref_grads):
        assert torch.count_nonzero(r) > 0
        assert max_diff(g, r) <= 1e-5 * max(1.0, float(r.abs().max()))


def test_split_training_backward_multiplies_only_the_executing_rows_projections():
    from torch.utils.flop_counter import FlopCounterMode

    model = randomize(make_model(seed=27, **CONFIGS["gqa"], lora_rank=0), seed=28)  # the LoRA runs on every token
    model.train()
    layer = model.layers[2]
    x, positions = _block_inputs(model)
    x.requires_grad_()
    freqs_cis = model.freqs_cis[positions]
    mask = torch.rand(positions.shape, generator=torch.Generator().manual_seed(29)) < 0.5
    products = []
    for keep in (mask, torch.ones_like(mask)):
        weight = keep.float().requires_grad_()
        out = blend(weight, layer.forward_split(x, freqs_cis, Decision(weight, keep)), x)
        with FlopCounterMode(display=False) as counter:
            out.sum().backward()
        products.append(counter.get_flop_counts()["Global"][torch.ops.aten.mm])
    assert products[0] * mask.numel() == products[1] * int(mask.sum())


def test_set_adapter_trainable_false_unfreezes_all():
    model = make_model(seed=23)
    n = model.set_adapter_trainable(False)
    assert n == sum(q.numel() for q in model.parameters())
    assert all(q.requires_grad for q in model.parameters())


def test_compute_loss_by_hand_with_fixed_routing():
    model = randomize(make_model(seed=24), seed=25, lora_b_std=0.1)
    p = model.params
    examples, labels, example_masks, label_masks = _batch()
    b, s = examples.shape
    g = torch.Generator().manual_seed(26)
    masks = {i: torch.rand(b, s, generator=g) < 0.5 for i in routed_layers(model)}
    masks[routed_layers(model)[0]][:, :2] = False  # reserved tokens skip: they must not count anyway
    model.use_routing(FixedRouting(masks))
    model.train()
    with torch.no_grad():
        c_loss, _, metrics = compute_loss(model, examples, labels, example_masks, label_masks)
        logits, activation = model(examples)
        token_weight = (example_masks & (torch.arange(s) >= p.dynamic_reserve_initials)).float()
        a_loss = DLLMRouting(p).aux_loss(model, {}, activation, None, token_weight)

    # D-LLM's rate loss: per real, non-reserved token |mean over ALL layers of executed - target|
    total, count, executed = 0.0, 0, 0.0
    for r in range(b):
        for t in range(s):
            if not example_masks[r, t] or t < p.dynamic_reserve_initials:
                continue
            ratio = sum(1.0 if i not in masks else float(masks[i][r, t]) for i in range(p.n_layers)) / p.n_layers
            total += abs(ratio - p.dynamic_active_target)
            executed += ratio
            count += 1
    assert a_loss.item() == pytest.approx(total / count, abs=1e-6)
    assert metrics["act_ratio"] == pytest.approx(executed / count, abs=1e-6)
    assert 0.0 <= metrics["act_ratio"] <= 1.0

    # CE on response tokens: position t predicts labels[t + 1] where label_masks[t + 1]
    logp = logits.log_softmax(-1)
    ce, n = 0.0, 0
    for r in range(b):
        for t in range(s - 1):
            if label_masks[r, t + 1]:
                ce -= logp[r, t, labels[r, t + 1]].item()
                n += 1
    assert c_loss.item() == pytest.approx(ce / n, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["output", "tied"])
def test_compute_loss_equals_the_formula_on_every_positions_logits(tied):
    """compute_loss projects to the vocabulary only where a response token is predicted: CE, the
    distillation KL, the rate loss, the metrics and the adapter's gradients are those of the
    formula on every position's logits (the same dropout and Gumbel noise)."""
    model = randomize(make_model(seed=27, tie_word_embeddings=tied, lora_dropout=0.05), seed=28, router_scale=1.0,
                      lora_b_std=0.1)
    teacher = randomize(make_model(seed=29, tie_word_embeddings=tied), seed=30).eval()
    model.set_adapter_trainable(True)
    model.train()
    examples, labels, example_masks, label_masks = _batch()
    positions = scored_positions(label_masks)
    weight = label_masks[:, 1:].float()
    with torch.no_grad():
        teacher_logits = teacher(examples)[0][:, :-1]
        torch.testing.assert_close(teacher.logits_at(examples, positions), teacher_logits[weight.bool()])

    def losses_and_grads(pieces):
        c_loss, a_loss, metrics = pieces
        (c_loss + a_loss + metrics["distill_loss"]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return [c_loss, a_loss, metrics["distill_loss"], metrics["act_ratio"], metrics["n_labels"],
                metrics["n_tokens"]], grads

    torch.manual_seed(31)
    got, got_grads = losses_and_grads(compute_loss(model, examples, labels, example_masks, label_masks,
                                                         teacher.logits_at(examples, positions)))
    torch.manual_seed(31)
    logits, activation, state = model.run(examples)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    student, target = logits[:, :-1].log_softmax(-1), teacher_logits.log_softmax(-1)
    kl = (target.exp() * (target - student)).sum(-1)
    token_weight = (example_masks & (torch.arange(examples.shape[1]) >= model.params.dynamic_reserve_initials)).float()
    c_loss = (ce * weight.flatten()).sum() / weight.sum()
    a_loss = model.routing.aux_loss(model, state, activation, None, token_weight)
    act_ratio = (activation.mean(-1) * token_weight).sum() / token_weight.sum()
    want, want_grads = losses_and_grads((c_loss, a_loss, {"distill_loss": (kl * weight).sum() / weight.sum(),
                                                          "act_ratio": act_ratio, "n_labels": weight.sum(),
                                                          "n_tokens": token_weight.sum()}))
    assert 0 < a_loss.item() and 0 < got[2].item()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and any(".router." in n for n in got_grads)
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
