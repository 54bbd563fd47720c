"""dllm/scoring.py's one truncation rule and dllm/timing.py's per-forward timer."""
import torch

from dllm.scoring import encode_pair, fit
from dllm.timing import StepTimer, timed


class CharTokenizer:
    """One token per character, bos 1, eos 2."""

    def encode(self, text, bos, eos):
        return [1] * bos + [ord(c) for c in text] + [2] * eos


def test_encode_pair_splits_where_the_context_ends():
    context, continuation = encode_pair(CharTokenizer(), "ab", "cd", eos=True)
    assert (context, continuation) == ([1, 97, 98], [99, 100, 2])
    assert encode_pair(CharTokenizer(), "ab", "", eos=False) == ([1, 97], [98])  # at least one token scored


def test_fit_cuts_the_context_from_the_left_and_keeps_the_continuation():
    context, continuation = list(range(10, 20)), [1, 2, 3]
    assert fit(context, continuation, 100) == (context + continuation, 10)
    row, start = fit(context, continuation, 8)
    assert row == [15, 16, 17, 18, 19, 1, 2, 3] and row[start:] == continuation
    # a continuation as long as max_seq_len keeps its end, after one token of context
    row, start = fit(context, list(range(8)), 8)
    assert row == list(range(8)) and start == 1


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(4, 2)

    def forward(self, tokens):
        return self.tok_embeddings(tokens)


def test_step_timer_times_each_forward_until_closed():
    model = Tiny()
    with StepTimer(model) as timer:
        model(torch.tensor([[1]]))
        model(torch.tensor([[2]]))
    model(torch.tensor([[3]]))
    assert len(timer.steps) == 2 and all(s >= 0 for s in timer.steps)
    seconds, out = timed(lambda: 7, torch.device("cpu"))
    assert out == 7 and seconds >= 0
