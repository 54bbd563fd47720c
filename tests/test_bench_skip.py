"""benchmarks/bench_skip.py's outside reference: transformers' Llama on dllm's weights."""
import pytest
import torch

from benchmarks import bench_skip
from dllm.core.model import Transformer
from helpers import max_diff, randomize, tiny_args


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_the_transformers_reference_computes_dllms_dense_logits(tied):
    """Tied embeddings (SmolLM2) too: the head is the embedding under both names."""
    torch.manual_seed(0)
    model = randomize(Transformer(tiny_args(routing="dense", tie_word_embeddings=tied)), seed=0).eval()
    runner = bench_skip.TransformersRunner(model, torch.float32)
    tokens = torch.randint(0, model.params.vocab_size, (2, 12))
    with torch.no_grad():
        ours = model(tokens)[0]
        theirs = runner.hf(tokens).logits
    assert max_diff(ours, theirs) < 1e-4
    assert (runner.hf.lm_head.weight.data_ptr() == runner.hf.model.embed_tokens.weight.data_ptr()) == tied


def test_the_bytes_ideal_counts_the_weights_some_row_runs_and_each_running_rows_kept_pairs():
    """Two rows, two blocks (the second routed), two prompt tokens and one step; one byte a pair."""
    sizes = {"blocks": [10, 20], "routers": [0, 5], "head": 7}
    activation = torch.ones(2, 3, 2)
    activation[0, 1, 1] = 0  # row 0 keeps 2 pairs at block 1 after the step
    activation[1, 2, 1] = 0  # row 1 skips block 1 at the step: reads none of its pairs there
    dllm = bench_skip.decode_bytes(activation, sizes, 2, 1, routed=True)
    assert dllm == (10 + 20 + 5 + 7) + (3 + 3) + 2
    assert bench_skip.decode_bytes(torch.ones(2, 3, 2), sizes, 2, 1, routed=False) == (10 + 20 + 7) + 2 * 3 * 2
    activation[0, 2, 1] = 0  # no row runs block 1 at the step: its weights are not read either
    assert bench_skip.decode_bytes(activation, sizes, 2, 1, routed=True) == (10 + 5 + 7) + (3 + 3)


def test_the_kept_cache_ideal_reads_every_weight_and_every_rows_whole_kept_cache_at_every_block():
    """The same two rows: eviction alone, every row reading its kept pairs whether it runs or not."""
    sizes = {"blocks": [10, 20], "routers": [0, 5], "head": 7}
    activation = torch.ones(2, 3, 2)
    activation[0, 1, 1] = 0  # row 0 keeps 2 pairs at block 1 after the step
    activation[1, 2, 1] = 0  # row 1 skips block 1 at the step, yet reads the 2 pairs it kept there
    activation[0, 2, 1] = 0  # no row runs block 1 at the step: its weights are read all the same
    assert bench_skip.kept_cache_reads(activation, sizes, 2, routed=True) == (10 + 20 + 5 + 7, 3 + 3 + 1 + 2)
    assert bench_skip.kept_cache_reads(torch.ones(2, 3, 2), sizes, 2, routed=False) == (10 + 20 + 7, 2 * 3 * 2)


def test_the_rate_ideal_prices_a_pair_and_a_weight_byte_at_what_they_cost_dense():
    """Dense reads 100 weight bytes and 50 pairs in 3 s, the same weights and 10 pairs in 2 s: a pair
    costs 1/40 s and a weight byte 1.75/100 s; a run reading 100 bytes and 20 pairs then needs 2.25 s."""
    prices = bench_skip.read_prices(3.0, 2.0, (100, 50), (100, 10))
    assert prices == (pytest.approx(0.0175), pytest.approx(1 / 40))
    assert bench_skip.rate_ideal(3.0, prices, (100, 20)) == pytest.approx(3.0 / 2.25)
    # timings that cannot tell a pair from a weight byte give no prices
    assert bench_skip.read_prices(2.0, 2.0, (100, 50), (100, 10)) is None


def test_decode_reads_split_the_bytes_ideal_into_weights_and_pairs():
    sizes = {"blocks": [10, 20], "routers": [0, 5], "head": 7}
    activation = torch.ones(2, 3, 2)
    activation[1, 2, 1] = 0
    assert bench_skip.decode_reads(activation, sizes, 2, routed=True) == (10 + 20 + 5 + 7, 3 + 3 + 3)
