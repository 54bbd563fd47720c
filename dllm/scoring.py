"""Teacher-forced scoring of continuations after contexts: the one scorer behind evaluate.py's
perplexity and option log-likelihoods, the lm-eval model's log-likelihoods and fidelity's
comparison with the base.

One truncation rule: a row longer than max_seq_len keeps its end, so the context is cut from the
left and the continuation is kept whole (as lm-eval does); only a continuation of max_seq_len
tokens or more loses its own start, and at least one token always stays as context. Every kept
token is fed, the last one too, so the routing record covers the whole row.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

Pair = Tuple[List[int], List[int]]  # (context tokens, continuation tokens)


def encode_pair(tokenizer, context: str, continuation: str, eos: bool) -> Pair:
    """The context with bos, and as continuation the tokens that follow the context's tokens in the
    encoding of context + continuation (eos appended when asked), so the two join as the model
    reads the whole text."""
    context_ids = tokenizer.encode(context, bos=True, eos=False)
    whole = tokenizer.encode(context + continuation, bos=True, eos=eos)
    split = min(len(context_ids), len(whole) - 1)
    return whole[:split], whole[split:]


@dataclass
class Scored:
    """One right-padded forward of a batch: tokens, logits and routing per position, and which
    tokens were scored (`scored[i, p]`: row i's token p is a kept continuation token)."""

    tokens: torch.Tensor  # [b, width]
    token_mask: torch.Tensor  # [b, width], 1 on real tokens
    scored: torch.Tensor  # [b, width]
    logits: torch.Tensor  # [b, width, vocab]
    activation: torch.Tensor  # [b, width, n_layers]

    @property
    def targets(self) -> torch.Tensor:
        """[b, width - 1], 1 where the next token is scored: the positions whose logits count."""
        return self.scored[:, 1:]

    def token_logprobs(self) -> torch.Tensor:
        """[b, width - 1]: log p of each next token."""
        return -F.cross_entropy(self.logits[:, :-1].transpose(1, 2), self.tokens[:, 1:], reduction="none")

    def loglik(self) -> List[float]:
        """Per row, the sum of log p of its scored tokens."""
        return (self.token_logprobs() * self.targets).sum(1).tolist()

    def n_scored(self) -> List[float]:
        return self.targets.sum(1).tolist()

    def top1(self) -> List[float]:
        """Per row, how many scored tokens are the model's argmax."""
        return ((self.logits[:, :-1].argmax(-1) == self.tokens[:, 1:]).float() * self.targets).sum(1).tolist()

    def greedy(self) -> List[bool]:
        """Per row, whether every scored token is the argmax (lm-eval's is_greedy)."""
        return [hits == n for hits, n in zip(self.top1(), self.n_scored())]


def fit(context: List[int], continuation: List[int], max_seq_len: int) -> Tuple[List[int], int]:
    """The row as fed (at most max_seq_len tokens, the module's rule) and the index of its first
    scored token."""
    whole = context + continuation
    cut = max(0, len(whole) - max_seq_len)
    return whole[cut:], max(1, len(context) - cut)


@torch.inference_mode()
def teacher_forced(model, pairs: Sequence[Pair], max_seq_len: int) -> Scored:
    """Every (context, continuation) row fitted to max_seq_len, right-padded, in one forward."""
    rows = [fit(context, continuation, max_seq_len) for context, continuation in pairs]
    width = max(len(tokens) for tokens, _ in rows)
    device = model.tok_embeddings.weight.device
    tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    token_mask = torch.zeros(len(rows), width, device=device)
    scored = torch.zeros(len(rows), width, device=device)
    for i, (row, start) in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, device=device)
        token_mask[i, : len(row)] = 1
        scored[i, start : len(row)] = 1
    logits, activation = model(tokens, response_tokens=scored)
    return Scored(tokens, token_mask, scored, logits, activation)
