"""FLOPs and KV accounting (dllm/core/flops.py) against hand arithmetic, and against what a real-skipping
forward actually executed and kept in its cache."""
import dataclasses

import pytest
import torch

from dllm.core import flops
from dllm.core.model import Transformer
from dllm.core.routing import DLLMRouting, mlp_flops
from helpers import SMALL_EXECUTED, randomize, small_args, tiny_args


def test_token_flops_by_hand():
    args = small_args()
    # head_dim = 8 / 2 = 4; kv_dim = 1 kv head * 4 = 4
    # ffn hidden: int(2 * 4 * 8 / 3) = int(21.33) = 21, rounded up to a multiple of 4 -> 24
    assert args.ffn_hidden_dim == 24
    f = flops.token_flops(args)
    assert f.qkvo == 2 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8) == 384  # wq, wk, wv, wo
    assert f.ffn == 2 * 3 * 8 * 24 == 1152  # w1, w3: 8 -> 24, w2: 24 -> 8
    assert f.attn_per_key == 2 * (2 * 4) + 2 * (2 * 4) == 32  # q.k and p*v, 2 heads x head_dim 4 each
    assert mlp_flops(8, 4, 2) == 2 * (8 * 4 + 4 * 2) == 80  # D-LLM's router: linear_1 8 -> 4, linear_2 4 -> 2
    assert f.lm_head == 2 * 8 * 10 == 160


def test_forward_flops_by_hand():
    args = small_args()
    block = 384 + 1152  # qkvo + ffn of one executed (token, block)
    # executed pairs: layer 0: 4, layer 1: 3 (positions 0, 1, 3), layer 2: 2 (positions 0, 1) -> 9
    # kept keys seen by each executed token (cumsum of its block's column, at its own position):
    #   layer 0: cumsum [1, 2, 3, 4] -> 1 + 2 + 3 + 4 = 10
    #   layer 1: column [1, 1, 0, 1], cumsum [1, 2, 2, 3] -> executed at 0, 1, 3: 1 + 2 + 3 = 6
    #   layer 2: column [1, 1, 0, 0], cumsum [1, 2, 2, 2] -> executed at 0, 1: 1 + 2 = 3
    # -> 19 (query, key) pairs
    routers = 4 * 2 * 80  # 4 tokens x 2 routed blocks (layers 1 and 2)
    lm_head = 4 * 160
    expected = 9 * block + 19 * 32 + routers + lm_head
    assert expected == 13824 + 608 + 640 + 640 == 15712
    assert flops.forward_flops(args, SMALL_EXECUTED, routing=DLLMRouting(args)) == expected
    assert flops.forward_flops(args, SMALL_EXECUTED) == expected - routers

    # dense: 12 pairs, 3 blocks x (1 + 2 + 3 + 4) = 30 (query, key) pairs, no routers
    dense = 12 * block + 30 * 32 + lm_head
    assert dense == 18432 + 960 + 640 == 20032
    assert flops.forward_flops(args, torch.ones_like(SMALL_EXECUTED)) == dense
    assert flops.flops_ratio(args, SMALL_EXECUTED, routing=DLLMRouting(args)) == pytest.approx(15712 / 20032, rel=1e-12)
    assert flops.flops_ratio(args, SMALL_EXECUTED) == pytest.approx((15712 - 640) / 20032, rel=1e-12)
    # executed pairs over all pairs
    assert flops.kv_ratio(SMALL_EXECUTED) == pytest.approx(9 / 12, rel=1e-12)


def test_dense_ratio_is_one_and_routers_cost_a_little():
    args = small_args()
    ones = torch.ones(2, 5, 3)
    assert flops.flops_ratio(args, ones) == 1.0
    with_routers = flops.flops_ratio(args, ones, routing=DLLMRouting(args))
    # the routers' share: 2 routed blocks x 80 per token over the dense cost per token
    dense = flops.forward_flops(args, ones)
    assert with_routers == pytest.approx(1 + 2 * 5 * 2 * 80 / dense, rel=1e-12)
    assert with_routers > 1.0
    big = tiny_args(dim=512, n_heads=8, n_kv_heads=8, multiple_of=256, dynamic_router_hdim=16)
    assert 1.0 < flops.flops_ratio(big, torch.ones(1, 16, big.n_layers), routing=DLLMRouting(big)) < 1.01
    assert flops.kv_ratio(ones) == 1.0


def test_ratio_falls_with_the_execution_share():
    args = small_args(n_layers=4)
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 12, 4, generator=g)
    scores[..., 0] = 2  # the always-on block
    scores[:, :2] = 2  # reserved initials
    previous = float("inf")
    for threshold in (0.0, 0.2, 0.4, 0.6, 0.8, 1.1):
        executed = (scores >= threshold).float()
        ratio = flops.flops_ratio(args, executed)
        assert ratio < previous
        previous = ratio


def test_padding_contributes_nothing():
    args = small_args()
    g = torch.Generator().manual_seed(1)
    executed = (torch.rand(2, 6, 3, generator=g) > 0.4).float()
    executed[..., 0] = 1
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    # the padded tail's routing is garbage: whatever it is, it must not count
    other = executed.clone()
    other[1, 4:] = 1 - other[1, 4:]
    for routing in (DLLMRouting(args), None):
        total = flops.forward_flops(args, executed, mask, routing)
        assert flops.forward_flops(args, other, mask, routing) == total
        separate = flops.forward_flops(args, executed[:1], None, routing) + flops.forward_flops(args, executed[1:, :4], None, routing)
        assert total == separate
    dense = flops.forward_flops(args, torch.ones(1, 6, 3)) + flops.forward_flops(args, torch.ones(1, 4, 3))
    assert flops.flops_ratio(args, executed, mask) == pytest.approx(flops.forward_flops(args, executed, mask) / dense, rel=1e-12)
    kept = executed[0].sum() + executed[1, :4].sum()
    assert flops.kv_ratio(executed, mask) == pytest.approx(float(kept) / ((6 + 4) * 3), rel=1e-12)
    assert flops.kv_ratio(other, mask) == flops.kv_ratio(executed, mask)


def test_measured_routing_matches_cache_and_closed_form(tokenizer_path):
    """A real-skipping forward: kv_ratio is what the cache kept, and flops_ratio is the hand
    formula from the activation, between bounds from the execution share, and close to the
    matmul-only blend when matmuls dominate attention."""
    torch.manual_seed(0)
    args = tiny_args(max_seq_len=64)
    model = randomize(Transformer(args), seed=4, router_scale=3.0).eval()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, args.vocab_size, (2, 24), generator=g)
    cache = model.new_cache(2)
    with torch.inference_mode():
        _, activation = model(tokens, 0, cache)
    b, T, L = activation.shape
    executed = activation > 0.5
    share = float(executed.float().mean())
    routed_share = float(executed[..., args.dynamic_start_layer:].float().mean())
    assert 0.05 < routed_share < 0.95, "random routers must skip some tokens and keep others"

    # KV: the cache holds exactly the executed pairs
    kept = int(cache.tokens_kept().sum())
    assert kept == int(executed.sum())
    assert flops.kv_ratio(activation) == pytest.approx(kept / (b * T * L), rel=1e-12)

    # FLOPs: an explicit loop over tokens and blocks
    f = flops.token_flops(args)
    num = 0
    for row in range(b):
        for layer in range(L):
            for t in range(T):
                if executed[row, t, layer]:
                    keys = int(executed[row, : t + 1, layer].sum())
                    num += f.qkvo + f.ffn + keys * f.attn_per_key
    n_routed = L - args.dynamic_start_layer
    router = mlp_flops(args.dim, args.dynamic_router_hdim, 2)
    num += b * T * (n_routed * router + f.lm_head)
    dense = b * L * (T * (f.qkvo + f.ffn) + T * (T + 1) // 2 * f.attn_per_key) + b * T * f.lm_head
    ratio = flops.flops_ratio(args, activation, routing=model.routing)
    assert ratio == pytest.approx(num / dense, rel=1e-12)

    # bounds from the share: every executed token attends at least itself and at most every
    # earlier position
    E = int(executed.sum())
    fixed = b * T * (n_routed * router + f.lm_head)
    at_most_keys = sum(t + 1 for row in range(b) for t in range(T) for layer in range(L) if executed[row, t, layer])
    lower = (E * (f.qkvo + f.ffn + f.attn_per_key) + fixed) / dense
    upper = (E * (f.qkvo + f.ffn) + at_most_keys * f.attn_per_key + fixed) / dense
    assert lower <= ratio <= upper
    assert E == pytest.approx(share * b * T * L)

    # matmuls dominating (wide model, same routing): ratio -> router + lm_head + share blend
    wide = dataclasses.replace(args, dim=8192, n_heads=64, n_kv_heads=64, multiple_of=256, vocab_size=320)
    fw = flops.token_flops(wide)
    router = mlp_flops(wide.dim, wide.dynamic_router_hdim, 2)
    blend = (share * L * (fw.qkvo + fw.ffn) + n_routed * router + fw.lm_head) / (L * (fw.qkvo + fw.ffn) + fw.lm_head)
    assert flops.flops_ratio(wide, activation, routing=DLLMRouting(wide)) == pytest.approx(blend, rel=2e-3)


def test_counted_tokens_split_the_total_and_still_attend_to_the_others():
    """The response's FLOPs plus the prompt's are the whole forward's; a response token's attention
    counts the prompt keys it reads."""
    args = small_args()
    routing = DLLMRouting(args)
    prompt = torch.tensor([[1, 1, 0, 0]], dtype=torch.float32)
    response = 1 - prompt
    whole = flops.forward_flops(args, SMALL_EXECUTED, None, routing)
    first = flops.forward_flops(args, SMALL_EXECUTED, None, routing, counted=prompt)
    second = flops.forward_flops(args, SMALL_EXECUTED, None, routing, counted=response)
    assert first + second == whole
    assert first == flops.forward_flops(args, SMALL_EXECUTED[:, :2], None, routing)
    # positions 2 and 3 by hand: layer 0 both (keys 3, 4), layer 1 position 3 (keys 3), layer 2 none
    assert second == 3 * (384 + 1152) + (3 + 4 + 3) * 32 + 2 * 2 * 80 + 2 * 160
