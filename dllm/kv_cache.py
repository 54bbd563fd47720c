"""A KV cache that keeps, per block and per sequence, only the tokens that executed that block.

Each block's cache is a packed [batch, capacity, n_kv_heads, head_dim] buffer with a per-row
length and the true position of every kept key (RoPE is applied before caching, and the causal
mask compares positions, so gaps left by skipped tokens need no slots). Capacity grows in chunks
with what is kept; a skipped token is never written.
"""
from typing import List

import torch


class LayerKVCache:
    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, dtype, device, chunk: int = 64):
        self.chunk = chunk
        self.k = torch.zeros(batch, 0, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def _grow(self, needed: int):
        new_cap = -(-needed // self.chunk) * self.chunk
        pad = new_cap - self.capacity
        b, _, h, d = self.k.shape
        # zeros, not empty: masked-out slots still enter attn @ V, and NaN * 0 is NaN
        self.k = torch.cat([self.k, self.k.new_zeros(b, pad, h, d)], 1)
        self.v = torch.cat([self.v, self.v.new_zeros(b, pad, h, d)], 1)
        self.pos = torch.cat([self.pos, self.pos.new_zeros(b, pad)], 1)

    def append(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Store packed new keys; `rows` [n] is row-major sorted. Returns each token's rank in its row."""
        counts = torch.bincount(rows, minlength=self.length.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(rows.shape[0], device=rows.device) - starts[rows]
        slot = self.length[rows] + rank
        needed = int((self.length + counts).max())
        if needed > self.capacity:
            self._grow(needed)
        self.k[rows, slot] = k.to(self.k.dtype)
        self.v[rows, slot] = v.to(self.v.dtype)
        self.pos[rows, slot] = pos
        self.length += counts
        return rank

    def read(self, rows: torch.Tensor):
        """Keys, values, key positions and validity of the given rows, trimmed to the longest."""
        lengths = self.length[rows]
        kept = int(lengths.max())
        valid = torch.arange(kept, device=rows.device)[None, :] < lengths[:, None]
        if rows.shape[0] == self.length.shape[0]:
            return self.k[:, :kept], self.v[:, :kept], self.pos[:, :kept], valid
        return self.k[rows, :kept], self.v[rows, :kept], self.pos[rows, :kept], valid

    def pair_bytes(self) -> int:
        """One token's K and V."""
        return 2 * self.k.shape[2] * self.k.shape[3] * self.k.element_size()

    def bytes_kept(self) -> int:
        return int(self.length.sum()) * self.pair_bytes()

    def bytes_allocated(self) -> int:
        return 2 * self.k.numel() * self.k.element_size() + self.pos.numel() * self.pos.element_size()


class KVCache:
    """One LayerKVCache per block; made fresh for every generate() call."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, dtype, device):
        self.layers: List[LayerKVCache] = [
            LayerKVCache(batch, n_kv_heads, head_dim, dtype, device) for _ in range(n_layers)
        ]

    def pair_bytes(self) -> int:
        return self.layers[0].pair_bytes()

    def bytes_kept(self) -> int:
        return sum(layer.bytes_kept() for layer in self.layers)

    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated() for layer in self.layers)

    def tokens_kept(self) -> torch.Tensor:
        """[n_layers, batch] number of kept (token, block) pairs."""
        return torch.stack([layer.length for layer in self.layers])
