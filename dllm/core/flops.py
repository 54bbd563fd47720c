"""FLOPs and KV accounting from the routing that actually happened, token by token.

Counted (2 FLOPs per multiply-add): q/k/v/o projections and the FFN for each executed (token,
block); attention scores and the weighted sum over the keys that token actually attends (its own
row's kept keys at that block, up to its position); the routing policy's own cost (its `cost`:
D-LLM's router at every routed block for every token, MoD's router and predictor, early exit's
classifier up to the exit); the LM head for every token. The dense reference counts the same tokens
with every block executed, every key kept, and no routing.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from dllm.core.model import ModelArgs
from dllm.core.routing import DenseRouting


@dataclass
class TokenFlops:
    qkvo: int
    ffn: int
    attn_per_key: int
    lm_head: int


def token_flops(args: ModelArgs) -> TokenFlops:
    q_dim, kv_dim = args.q_width, args.kv_width
    return TokenFlops(
        qkvo=2 * args.dim * (2 * q_dim + 2 * kv_dim),
        ffn=2 * 3 * args.dim * args.ffn_hidden_dim,
        attn_per_key=2 * 2 * q_dim,
        lm_head=2 * args.dim * args.vocab_size,
    )


def _masked(executed: torch.Tensor, token_mask: Optional[torch.Tensor]):
    """executed as 0/1 doubles on the CPU with padded tokens zeroed, and the [b, T] token mask."""
    mask = torch.ones(executed.shape[:2]) if token_mask is None else token_mask.detach().cpu()
    mask = mask.double()
    return (executed.detach().cpu() > 0.5).double() * mask[..., None], mask


def forward_flops(args: ModelArgs, executed: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                  routing: Optional[DenseRouting] = None, counted: Optional[torch.Tensor] = None) -> float:
    """executed: [b, T, n_layers] (1 = token ran the block), whole sequences from position 0;
    token_mask: [b, T], 1 for real tokens (right padding is left out); routing: the policy that
    decided, whose own cost is added (None: the plain model); counted: [b, T], the tokens whose
    FLOPs are summed (default: every real one), e.g. only the response's, still attending to the
    prompt's keys."""
    f = token_flops(args)
    executed, mask = _masked(executed, token_mask)
    keys_seen = executed.cumsum(1)  # kept keys at or before each position, per row and block
    if counted is not None:
        mask = mask * counted.detach().cpu().double()
        executed = executed * mask[..., None]
    total = (executed.sum() * (f.qkvo + f.ffn) + (executed * keys_seen).sum() * f.attn_per_key).item()
    n_tokens = mask.sum().item()
    if routing is not None:
        total += routing.cost(executed, mask)
    return total + n_tokens * f.lm_head


def flops_ratio(args: ModelArgs, executed: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                routing: Optional[DenseRouting] = None) -> float:
    dense = forward_flops(args, torch.ones_like(executed), token_mask)
    return forward_flops(args, executed, token_mask, routing) / dense


def kv_pairs(executed: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> Tuple[float, float]:
    """(kept, dense) (token, block) K/V pairs: what the evicting cache holds and a dense one would."""
    executed, mask = _masked(executed, token_mask)
    return executed.sum().item(), mask.sum().item() * executed.shape[2]


def kv_ratio(executed: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> float:
    kept, dense = kv_pairs(executed, token_mask)
    return kept / dense


@dataclass(eq=False)
class RoutingStats:
    """What one generate() call executed and kept, per prompt, up to the end of its output."""

    activation: torch.Tensor  # [b, tokens fed, n_layers] on the CPU, 1 = executed (= K/V kept)
    lengths: List[int]  # per row, the tokens up to the end of its output
    pair_bytes: int  # one token's K and V at one block
    cache_bytes_kept: int  # the whole batch's cache as it ended (every token fed, past eos too)
    tokens: List[List[int]]  # per row, its prompt and output, `lengths[row]` tokens
    prompt_lengths: List[int]

    @property
    def n_layers(self) -> int:
        return self.activation.shape[2]

    @property
    def token_mask(self) -> torch.Tensor:
        """[b, tokens fed], 1 up to the end of each row's output."""
        return (torch.arange(self.activation.shape[1])[None, :] < torch.tensor(self.lengths)[:, None]).float()

    def exec_pairs(self, row: int) -> int:
        return int(self.activation[row, : self.lengths[row]].sum())

    def exec_share(self, row: int) -> float:
        return self.exec_pairs(row) / max(1, self.lengths[row] * self.n_layers)

    def kv_bytes(self, row: int) -> int:
        return self.exec_pairs(row) * self.pair_bytes

    def kv_bytes_dense(self, row: int) -> int:
        return self.lengths[row] * self.n_layers * self.pair_bytes

    def __eq__(self, other) -> bool:
        """The same routing recorded: equal fields, the activation compared element by element."""
        if not isinstance(other, RoutingStats):
            return NotImplemented
        return torch.equal(self.activation, other.activation) and all(
            getattr(self, name) == getattr(other, name)
            for name in ("lengths", "pair_bytes", "cache_bytes_kept", "tokens", "prompt_lengths"))
