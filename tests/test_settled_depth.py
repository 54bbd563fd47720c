"""benchmarks/settled_depth.py: how deep a model's predictions settle, early exit's label per block."""
import pytest
import torch

from benchmarks import settled_depth
from dllm.core import routing
from dllm.core.model import Transformer
from helpers import randomize, tiny_args

pytestmark = pytest.mark.slow


def test_settled_depth_counts_response_positions_whose_top1_is_final_at_each_block_input():
    """Blocks 2 and 3 made identities: their inputs are the last hidden state, so every response
    position is settled there; block 0's input is the embedding, checked by hand."""
    torch.manual_seed(0)
    model = randomize(Transformer(tiny_args(routing="dense")), seed=0).eval()
    with torch.no_grad():
        for layer in model.layers[2:]:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
    sequences = [(list(range(3, 15)), 5), (list(range(40, 60)), 1)]
    shares = settled_depth.settled_shares(model, sequences)
    assert shares[2:] == [1.0, 1.0]
    hits = 0
    with torch.no_grad():
        for ids, prompt_length in sequences:
            tokens = torch.tensor([ids])
            final, embedded = model(tokens)[0][0].argmax(-1), model.tok_embeddings(tokens)[0]
            for position in range(prompt_length - 1, len(ids) - 1):  # each predicts response token position + 1
                hits += routing.EarlyExitRouting.settled(model, embedded[position], final[position]).item()
    response_tokens = sum(len(ids) - prompt_length for ids, prompt_length in sequences)
    assert shares[0] == pytest.approx(hits / response_tokens) and 0 < shares[0] < 1
