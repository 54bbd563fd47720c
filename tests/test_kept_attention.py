"""Attention at a routed block that reads what was kept: each executing row over exactly its own
kept keys, the rows that run nothing not computed (kv_cache.py), and the same logits as the masked
training path and as the batched call."""
import pytest
import torch

from dllm.core import kv_cache
from dllm.core.kv_cache import LayerKVCache
from dllm.core.model import Attention, Transformer
from dllm.core.routing import Decision, FixedRouting
from helpers import ATTENTION_ROUTES, max_diff, randomize, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")
B, PREFILL, CHUNK, STEPS = 4, 6, 3, 5
S = PREFILL + CHUNK + STEPS


class PositionRouting(FixedRouting):
    """Masks over the whole sequence [b, S]; each forward takes the columns of its positions."""

    def decide(self, block, x, positions, state):
        mask = self.masks.get(block.layer_id)
        if mask is None:
            return None
        mask = mask.gather(1, positions)
        return Decision(mask.float(), mask)


def ragged_masks(model):
    """Rows that keep very different numbers of keys: row 0 runs every token, row 1 about one in
    five, row 2 nothing of block 1 (and of every block at the last step), row 3 half; and, per
    routed block, a step where only one row runs."""
    g = torch.Generator().manual_seed(3)
    masks = {}
    for layer in model.layers[1:]:
        mask = torch.stack([torch.ones(S, dtype=torch.bool), torch.rand(S, generator=g) < 0.2,
                            torch.rand(S, generator=g) < 0.7, torch.rand(S, generator=g) < 0.5])
        mask[:, PREFILL + CHUNK + layer.layer_id % STEPS] = torch.tensor([False, False, True, False])
        masks[layer.layer_id] = mask
    masks[1][2] = False
    for mask in masks.values():
        mask[2, -1] = False
    return masks


def model_and_tokens(n_layers=5):
    torch.manual_seed(0)
    model = randomize(Transformer(tiny_args(n_layers=n_layers)), seed=1, lora_b_std=0.2)
    model.use_routing(PositionRouting(ragged_masks(model)))
    return model, torch.randint(0, 320, (B, S), generator=torch.Generator().manual_seed(2))


def incremental(model, tokens):
    """Prefill, a chunk of several tokens, then one token at a time, through one cache."""
    cache = model.new_cache(B)
    bounds = [0, PREFILL, PREFILL + CHUNK] + list(range(PREFILL + CHUNK + 1, S + 1))
    logits = [model(tokens[:, a:b], a, cache)[0] for a, b in zip(bounds, bounds[1:])]
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("route", ATTENTION_ROUTES)
def test_decode_over_kept_keys_equals_the_masked_training_path(route, monkeypatch):
    monkeypatch.setitem(kv_cache.CALL_COST_BYTES, "cpu", ATTENTION_ROUTES[route])
    model, tokens = model_and_tokens()
    with torch.no_grad():
        masked, activation = model.train()(tokens)
        got, cache = incremental(model.eval(), tokens)
    assert max_diff(got, masked) <= 1e-5
    assert torch.equal(cache.tokens_kept(), activation.sum(1).T.long())


def test_the_two_routes_give_the_same_logits(monkeypatch):
    model, tokens = model_and_tokens()
    logits = {}
    with torch.no_grad():
        for route, cost in ATTENTION_ROUTES.items():
            monkeypatch.setitem(kv_cache.CALL_COST_BYTES, "cpu", cost)
            logits[route] = incremental(model.eval(), tokens)[0]
    assert max_diff(logits["row_by_row"], logits["batched"]) <= 1e-5


def test_each_executing_row_reads_only_its_kept_keys_and_a_skipping_row_is_not_computed(monkeypatch):
    monkeypatch.setitem(kv_cache.CALL_COST_BYTES, "cpu", 0)
    model, tokens = model_and_tokens()
    calls = []
    attend_heads = Attention.attend_heads

    def recording(self, q, keys, values, mask, causal):
        calls.append((q.shape[0], q.shape[2], keys.shape[2], keys.data_ptr()))  # rows, queries, keys, where
        return attend_heads(self, q, keys, values, mask, causal)

    monkeypatch.setattr(Attention, "attend_heads", recording)
    with torch.no_grad():
        cache = model.eval().new_cache(B)
        model(tokens[:, : S - 1], 0, cache)
        calls.clear()
        model(tokens[:, S - 1 :], S - 1, cache)
    masks = model.routing.masks
    expected = [(B, 1, S, cache.layers[0].k.data_ptr())]  # block 0 has no router: every row at once
    for layer in model.layers[1:]:
        kv, mask = cache.layers[layer.layer_id], masks[layer.layer_id]
        expected += [(1, 1, kv.lengths[r], kv.k[r].data_ptr()) for r in range(B) if mask[r, -1]]
    assert calls == expected  # one query row per call, over its own row's kept keys, read in place
    assert all(not masks[layer][2, -1] for layer in masks)  # row 2 ran nothing: no call has it
    assert len(calls) < 1 + B * (len(model.layers) - 1)


def pack_decode(lengths, running, device="cpu"):
    """The packing of a decode step of a [len(lengths)]-row cache with SmolLM2's K/V shape."""
    kv = LayerKVCache(len(lengths), 3, 64, torch.float32, device, max_len=8192)
    kv.lengths = list(lengths)
    return kv.pack([[r in running] for r in range(len(lengths))], start=max(lengths), device=device)


def test_rows_run_one_by_one_where_the_keys_they_spare_outweigh_the_calls():
    long_half = pack_decode([2048] * 8, running={0, 2, 4, 6})
    assert long_half.rows == [(r, 2048, 1) for r in (0, 2, 4, 6)] and long_half.key_mask is None
    assert pack_decode([16] * 8, running={0, 2, 4, 6}).rows is None  # short rows: one masked call
    assert pack_decode([2048] * 8, running=set(range(8))).rows is None  # nothing to spare
    assert pack_decode([2048], running={0}).rows is None  # batch of one: the same single call


def test_a_device_without_a_measured_call_cost_keeps_the_batched_call():
    assert pack_decode([2048] * 8, running={0}, device="meta").rows is None
