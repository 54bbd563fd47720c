"""The building blocks the model is made of: the projections (fairscale's model-parallel linears,
their product picked by row count), RMSNorm, RoPE (with Llama-3.1's scaling), LoRA and the SwiGLU
feed-forward, each model-parallel where it holds weights."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import (
    copy_to_model_parallel_region, gather_from_model_parallel_region, reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from torch import nn

# Row counts for which `weight @ x.T` runs faster than F.linear's `x @ weight.T`, by device. On the
# CPU's BLAS a product of 2 to 8 rows, what a decode step at batch 8 or less gives every projection
# (a routed block gets only the rows that execute it), reads the weight 1.5x to 3.6x as fast that
# way, ahead in every repeat (benchmarks/bench_linear_rows.py); 12 rows are even, so larger batches
# keep F.linear. Dense and D-LLM take it alike. A device not listed keeps F.linear.
TRANSPOSED_ROWS = {"cpu": range(2, 9)}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), as `weight @ x.T` where that is faster (TRANSPOSED_ROWS).
    Inference only: training keeps F.linear's kernels and gradients."""
    rows = x.numel() // x.shape[-1]
    if torch.is_grad_enabled() or rows not in TRANSPOSED_ROWS.get(x.device.type, ()):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, -1).T
    out = torch.mm(weight, flat) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat)
    return out.T.contiguous().view(*x.shape[:-1], weight.shape[0])


class ColumnLinear(ColumnParallelLinear):
    """fairscale's column-parallel linear with its product taken by `linear`. Unsplit (one
    model-parallel rank) it skips fairscale's region mappings: identities there, but each is an
    autograd Function call, and a decode step makes about two hundred of them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.output_size_per_partition != self.out_features
        out = linear(copy_to_model_parallel_region(x) if split else x, self.weight, self.bias)
        return gather_from_model_parallel_region(out) if split and self.gather_output else out


class RowLinear(RowParallelLinear):
    """fairscale's row-parallel linear with its product taken by `linear`; unsplit, no region
    mappings (as ColumnLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.input_size_per_partition != self.in_features
        if split and not self.input_is_parallel:
            x = scatter_to_model_parallel_region(x)
        out = linear(x, self.weight)
        if split:
            out = reduce_from_model_parallel_region(out)
        return out if self.bias is None else out + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def llama3_scaled_freqs(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.1 long-context RoPE: low frequencies divided by `factor`, a smooth ramp between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > context / low, freqs / factor, freqs)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, smoothed, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0,
                         rope_scaling: Optional[dict] = None) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3":
        freqs = llama3_scaled_freqs(freqs, rope_scaling)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim]; freqs_cis [..., head_dim // 2], one row per token."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis.unsqueeze(-2)).flatten(-2).type_as(x)


class LoRA(nn.Module):
    """Low-rank update of a column-parallel projection; fp32 so it trains beside bf16 bases."""

    def __init__(self, in_features: int, out_features: int, rank: int, dropout: float, scale: float,
                 budget_gates: int = 0):
        super().__init__()
        self.scale = scale
        self.linear_A = nn.Linear(in_features, rank, bias=False, dtype=torch.float32)
        self.linear_B = ColumnParallelLinear(
            rank, out_features, bias=False, gather_output=False, init_method=nn.init.zeros_
        )
        self.linear_B.weight.data = self.linear_B.weight.data.float()
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.linear_A.weight, std=1.0 / rank)
        # a budget-conditioned LoRA: a gain per rank at each of `budget_gates` evenly spaced budgets
        self.budget_gates = nn.Parameter(torch.ones(budget_gates, rank)) if budget_gates else None

    def gate(self, anchors: torch.Tensor) -> torch.Tensor:
        """anchors [..., budget_gates], each token's weight on each budget's gains (anchor_weights of its
        budget) -> the gain on each rank [..., rank]."""
        return anchors @ self.budget_gates

    def forward(self, x: torch.Tensor, anchors: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., in]; anchors [..., budget_gates] with x's leading dims, for a budget-conditioned LoRA."""
        down = self.linear_A(self.dropout(x.float()))
        if self.budget_gates is not None:
            if anchors is None:
                raise RuntimeError("a budget-conditioned LoRA needs each token's budget: run it under its D-LLM routing")
            down = down * self.gate(anchors)
        out = self.linear_B(down)
        return (out if self.scale == 1 else out * self.scale).to(x.dtype)  # the same numbers, one pass less

    def delta_weight(self) -> torch.Tensor:
        """The local shard of B @ A * scale, for merging into the base weight."""
        if self.budget_gates is not None:
            raise RuntimeError("a budget-conditioned LoRA's update depends on the row's budget: it is never merged")
        return self.linear_B.weight @ self.linear_A.weight * self.scale


def anchor_weights(budget: torch.Tensor, budget_range: Tuple[float, ...], n: int) -> torch.Tensor:
    """budget [...] -> the weight of each of `n` evenly spaced anchors over `budget_range` [..., n]:
    linear between the two around it, summing to 1 (outside the range, the nearest end's)."""
    low, high = budget_range
    anchors = torch.linspace(low, high, n, device=budget.device)
    spacing = (high - low) / (n - 1)
    return (1 - (budget.float()[..., None].clamp(low, high) - anchors).abs() / spacing).clamp(min=0)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, init_method):
        super().__init__()
        self.w1 = ColumnLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=init_method)
        self.w2 = RowLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=init_method)
        self.w3 = ColumnLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=init_method)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
