"""Which tokens execute a block: the decision module and the swappable policies around it.

A policy looks at a block's input and returns a `Decision` (or None: every token executes, at no
routing cost). The block has one code path that acts on a Decision, so D-LLM, dense inference and
later baselines (MoD top-k, static pruning, early exit) differ only in the policy.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Router(nn.Module):
    """D-LLM decision module: Linear -> RMSNorm -> SiLU -> Linear(2), logits [skip, execute].

    Kept in fp32 whatever the base model's dtype, because its decisions are thresholds on small
    logit differences.
    """

    def __init__(self, dim: int, hdim: int, eps: float, bias_init=(0.1, 2.0)):
        super().__init__()
        self.linear_1 = nn.Linear(dim, hdim, dtype=torch.float32)
        self.norm = RMSNorm(hdim, eps, dtype=torch.float32)
        self.linear_2 = nn.Linear(hdim, 2, dtype=torch.float32)
        with torch.no_grad():
            self.linear_2.bias.copy_(torch.tensor(bias_init, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.norm(self.linear_1(x.float()))))


@dataclass
class Decision:
    """Per-token routing of one block.

    weight: [b, s] float, 1 = execute; carries the router's gradient in training.
    mask:   [b, s] bool, the tokens that execute (and so keep K/V at this block).
    """

    weight: torch.Tensor
    mask: torch.Tensor


class DenseRouting:
    """Every token executes every block: the plain Llama model."""

    def decide(self, block, x: torch.Tensor, positions: torch.Tensor) -> Optional[Decision]:
        return None


class DLLMRouting:
    """D-LLM: straight-through hard Gumbel-softmax in training, p(execute) >= threshold at inference.

    Blocks without a router (below dynamic_start_layer) always execute, and so do the first
    `reserve_initials` positions of every sequence (attention sinks).
    """

    def __init__(self, reserve_initials: int = 2, tau: float = 1.0, threshold: float = 0.5):
        self.reserve_initials = reserve_initials
        self.tau = tau
        self.threshold = threshold

    def decide(self, block, x: torch.Tensor, positions: torch.Tensor) -> Optional[Decision]:
        router = block.router
        if router is None:
            return None
        logits = router(x)
        prob = logits.softmax(-1)[..., 1]
        reserved = (positions < self.reserve_initials).expand_as(prob)
        if router.training:
            weight = F.gumbel_softmax(logits, tau=self.tau, hard=True)[..., 1]
            weight = torch.where(reserved, torch.ones_like(weight), weight)
            mask = weight > 0.5
        else:
            mask = (prob >= self.threshold) | reserved
            weight = mask.float()
        return Decision(weight, mask)


class FixedRouting:
    """Decisions given from outside, per layer ([b, s] bool masks): for tests and ablations."""

    def __init__(self, masks: dict):
        self.masks = masks

    def decide(self, block, x: torch.Tensor, positions: torch.Tensor) -> Optional[Decision]:
        mask = self.masks.get(block.layer_id)
        if mask is None:
            return None
        mask = mask.to(x.device)
        return Decision(mask.float(), mask)
