"""A KV cache that keeps, per block and per sequence, only the tokens that executed that block.

Each block's cache is a [batch, n_kv_heads, capacity, head_dim] buffer (the layout attention
reads, so a row's keys are a view, not a copy) with each row's length kept on the host as a plain
int: writing and reading never ask the device how long a row is. A row's keys are packed in position
order (RoPE is applied before caching), so the gaps left by skipped tokens need no slots, and a
query at rank i among its row's new keys sees exactly the keys up to slot `old length + i`: no
positions are stored or compared.

Capacity is shared by a block's rows and grows geometrically with the longest row (doubling from
`chunk`, capped at max_seq_len): a decode step copies nothing unless its longest row crosses a
power of two, so a whole generation reallocates at most log2(max_seq_len / chunk) times.
Preallocating max_seq_len per row would avoid even those copies, but would hold the slots of every
token that skips the block: memory would no longer follow what is kept. A skipped token is never
written, and `bytes_kept` counts kept pairs only.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class Packing:
    """Where one block's executing tokens go, worked out on the host from its execute mask.

    The tokens are packed row-major; `rows` are the batch rows with at least one of them, and
    attention pads each such row's queries to `width`. Index tensors are on the model's device.
    """

    rows: List[int]
    width: int
    token_rows: torch.Tensor  # [n] batch row of each executing token
    token_cols: torch.Tensor  # [n] its column in this forward
    positions: torch.Tensor  # [n] its position in the sequence
    slots: torch.Tensor  # [n] where its K/V go in its row
    row_index: Optional[torch.Tensor]  # [n] index of its row in `rows`; None when rows pack evenly
    rank: Optional[torch.Tensor]  # [n] its rank among its row's executing tokens; None likewise
    key_mask: Optional[torch.Tensor]  # [len(rows), width, keys] True = attend; None: every key

    @property
    def even(self) -> bool:
        """Every row runs `width` tokens, so the packed tokens are already [rows, width]."""
        return self.row_index is None


class LayerKVCache:
    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, dtype, device, max_len: int, chunk: int = 64):
        self.chunk = chunk
        self.max_len = max_len
        self.k = torch.zeros(batch, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = [0] * batch  # kept tokens per row
        self.seen = 0  # tokens fed per row, kept or not: the position of the next one

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def feed(self, n: int) -> int:
        """Count `n` more tokens fed to every row; returns the position of the first."""
        start, self.seen = self.seen, self.seen + n
        return start

    def _reserve(self, needed: int):
        if needed <= self.capacity:
            return
        capacity = max(self.chunk, self.capacity)
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, max(needed, self.max_len))
        # zeros, not empty: masked-out slots still enter attn @ V, and NaN * 0 is NaN
        k = self.k.new_zeros(*self.k.shape[:2], capacity, self.k.shape[3])
        v = torch.zeros_like(k)
        k[:, :, : self.capacity] = self.k
        v[:, :, : self.capacity] = self.v
        self.k, self.v = k, v

    def uniform(self) -> bool:
        """Every row keeps as many tokens."""
        return min(self.lengths) == max(self.lengths)

    def append_all(self, k: torch.Tensor, v: torch.Tensor):
        """k, v [batch, s, kv_heads, head_dim] from rows of equal length -> every row's keys and
        values [batch, kv_heads, length, head_dim], views of the cache."""
        start, s = self.lengths[0], k.shape[1]
        self._reserve(start + s)
        self.k[:, :, start : start + s] = k.transpose(1, 2)
        self.v[:, :, start : start + s] = v.transpose(1, 2)
        self.lengths = [start + s] * len(self.lengths)
        return self.k[:, :, : start + s], self.v[:, :, : start + s]

    def pack(self, execute: List[List[bool]], start: int, device) -> Packing:
        """The packing of the tokens marked in `execute` ([batch][s] on the host), fed at position
        `start`; their rows' lengths are advanced here, `append_packed` writes their K/V."""
        rows, counts, old = [], [], []
        token_rows, token_cols, rank, row_index = [], [], [], []
        for r, row in enumerate(execute):
            cols = [c for c, run in enumerate(row) if run]
            if not cols:
                continue
            row_index += [len(rows)] * len(cols)
            rows.append(r)
            counts.append(len(cols))
            old.append(self.lengths[r])
            token_rows += [r] * len(cols)
            token_cols += cols
            rank += range(len(cols))
            self.lengths[r] += len(cols)
        width, new = max(counts), [length + count for length, count in zip(old, counts)]
        slots = [old[i] + j for i, j in zip(row_index, rank)]
        index = torch.tensor([token_rows, token_cols, [start + c for c in token_cols], slots, row_index, rank],
                             device=device)
        even = min(counts) == width
        key_mask = None
        if width > 1 or min(new) != max(new):
            # query j of row i sees slots up to old[i] + j; padded queries see the whole row
            bound = [[old[i] + min(j, counts[i] - 1) for j in range(width)] for i in range(len(rows))]
            key_mask = torch.arange(max(new), device=device) <= torch.tensor(bound, device=device)[..., None]
        return Packing(rows, width, *index[:4], None if even else index[4], None if even else index[5], key_mask)

    def append_packed(self, packing: Packing, k: torch.Tensor, v: torch.Tensor):
        """k, v [n, kv_heads, head_dim] of the packed tokens -> the keys and values of the packing's
        rows [rows, kv_heads, longest, head_dim] (views when every row is in it)."""
        longest = max(self.lengths[r] for r in packing.rows)
        self._reserve(longest)
        self.k[packing.token_rows, :, packing.slots] = k.to(self.k.dtype)
        self.v[packing.token_rows, :, packing.slots] = v.to(self.v.dtype)
        if len(packing.rows) == len(self.lengths):
            return self.k[:, :, :longest], self.v[:, :, :longest]
        rows = torch.tensor(packing.rows, device=self.k.device)
        return self.k[rows, :, :longest], self.v[rows, :, :longest]

    def pair_bytes(self) -> int:
        """One token's K and V."""
        return 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()

    def bytes_kept(self) -> int:
        return sum(self.lengths) * self.pair_bytes()

    def bytes_allocated(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class KVCache:
    """One LayerKVCache per block; made fresh for every generate() call."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, dtype, device, max_len: int):
        self.layers: List[LayerKVCache] = [
            LayerKVCache(batch, n_kv_heads, head_dim, dtype, device, max_len) for _ in range(n_layers)
        ]

    @property
    def seen(self) -> int:
        """Tokens fed per row: the position the next forward starts at."""
        return self.layers[0].seen

    def pair_bytes(self) -> int:
        return self.layers[0].pair_bytes()

    def bytes_kept(self) -> int:
        return sum(layer.bytes_kept() for layer in self.layers)

    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated() for layer in self.layers)

    def tokens_kept(self) -> torch.Tensor:
        """[n_layers, batch] number of kept (token, block) pairs."""
        return torch.tensor([layer.lengths for layer in self.layers])
