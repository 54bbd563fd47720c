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

Attention at a routed block reads what was kept, where that pays. Two routes, chosen on the host
per block and step (`Packing.rows`): one batched call over every row's keys up to the longest row,
through a mask, with rows that run nothing attending too (their output dropped); or one call per
executing row over exactly its own kept keys, views of the cache, no mask in decode. The second
reads the kept pairs of the rows that run and nothing else, but pays a call per row, so it runs
when the bytes it spares exceed the calls it adds (`CALL_COST_BYTES`): at long contexts and
batches where many rows skip. Rejected (benchmarks/bench_kept_attention.py): gathering the
executing rows into a sub-batch (index_select copies every key it then reads: slower than the
masked call at long contexts), and
nested (jagged) tensors (their packed values would be a copy of the cache each step; torch's CPU
SDPA also wants queries and keys ragged alike). A GPU would want a varlen kernel over the host's
lengths instead of a loop; until one is measured, other devices keep the batched call.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

# What one more attention call costs, counted in the K/V bytes it could have read instead. CPU: set
# below the break-even that benchmarks/bench_kept_attention.py measures (row by row was faster
# from batch 8 and 128 kept pairs per row on). A device not listed (a GPU) keeps the batched call.
CALL_COST_BYTES = {"cpu": 64 * 1024}


@dataclass
class Packing:
    """Where one block's executing tokens go, worked out on the host from its execute mask.

    The tokens are packed row-major. With `rows`, attention runs row by row, each executing row
    over its own kept keys; without, it pads every row's queries to `width` and reads every row's
    keys up to the longest through `key_mask` (see the module docstring for which, and why).
    Index tensors are on the device; `rows` is on the host.
    """

    width: int
    token_rows: torch.Tensor  # [n] batch row of each executing token
    token_cols: torch.Tensor  # [n] its column in this forward
    positions: torch.Tensor  # [n] its position in the sequence
    slots: torch.Tensor  # [n] where its K/V go in its row
    rank: Optional[torch.Tensor]  # [n] its rank among its row's executing tokens; None when `even`
    key_mask: Optional[torch.Tensor]  # [batch, width, keys] True = attend; None: every key, or causal
    causal: bool = False  # every row starts empty and runs `width` tokens: plain causal attention, no mask
    rows: Optional[List[Tuple[int, int, int]]] = None  # (row, old length, tokens run) of each executing row

    @property
    def even(self) -> bool:
        """Every row runs `width` tokens, so the packed tokens are already [batch, width]."""
        return self.rank is None


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

    def reserve(self, needed: int):
        """Capacity for at least `needed` kept tokens per row."""
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
        self.reserve(start + s)
        self.k[:, :, start : start + s] = k.transpose(1, 2)
        self.v[:, :, start : start + s] = v.transpose(1, 2)
        self.lengths = [start + s] * len(self.lengths)
        return self.k[:, :, : start + s], self.v[:, :, : start + s]

    def pack(self, execute: List[List[bool]], start: int, device) -> Packing:
        """The packing of the tokens marked in `execute` ([batch][s] on the host), fed at position
        `start`; rows' lengths are advanced here, `append_packed` writes the K/V."""
        old, counts = list(self.lengths), [sum(row) for row in execute]
        token_rows, token_cols, rank = [], [], []
        for r, row in enumerate(execute):
            cols = [c for c, run in enumerate(row) if run]
            token_rows += [r] * len(cols)
            token_cols += cols
            rank += range(len(cols))
        self.lengths = [length + count for length, count in zip(old, counts)]
        width, even = max(counts), min(counts) == max(counts)
        slots = [old[r] + j for r, j in zip(token_rows, rank)]
        index = torch.tensor([token_rows, token_cols, [start + c for c in token_cols], slots, rank], device=device)
        rank_index = None if even else index[4]
        if self._row_by_row_pays(counts):
            rows = [(r, old[r], count) for r, count in enumerate(counts) if count]
            return Packing(width, *index[:4], rank_index, None, rows=rows)
        key_mask, causal = None, even and width > 1 and max(old) == 0
        if not causal and (width > 1 or not even or min(self.lengths) != max(self.lengths)):
            # query j of a row sees its slots up to old + j; padded queries see the row's last key
            bound = [[old[r] + min(j, count - 1) if count else max(old[r] - 1, 0) for j in range(width)]
                     for r, count in enumerate(counts)]
            key_mask = torch.arange(max(self.lengths), device=device) <= torch.tensor(bound, device=device)[..., None]
        return Packing(width, *index[:4], rank_index, key_mask, causal)

    def _row_by_row_pays(self, counts: List[int]) -> bool:
        """The K/V bytes a call per executing row spares (the batched call reads every row up to the
        longest) exceed what its extra calls cost; `lengths` already count the new tokens."""
        running = [length for length, count in zip(self.lengths, counts) if count]
        spared = (len(self.lengths) * max(self.lengths) - sum(running)) * self.pair_bytes()
        return spared > (len(running) - 1) * CALL_COST_BYTES.get(self.k.device.type, float("inf"))

    def append_packed(self, packing: Packing, k: torch.Tensor, v: torch.Tensor):
        """k, v [n, kv_heads, head_dim] of the packed tokens -> every row's keys and values
        [batch, kv_heads, longest, head_dim], views of the cache."""
        longest = max(self.lengths)
        self.reserve(longest)
        self.k[packing.token_rows, :, packing.slots] = k.to(self.k.dtype)
        self.v[packing.token_rows, :, packing.slots] = v.to(self.v.dtype)
        return self.k[:, :, :longest], self.v[:, :, :longest]

    def row(self, r: int):
        """Row r's kept keys and values [1, kv_heads, length, head_dim], views of the cache (one
        strided view each, not two slices: a decode step asks for every executing row and block)."""
        shape = (1, self.k.shape[1], self.lengths[r], self.k.shape[3])
        offset = r * self.k.stride(0)
        return (self.k.as_strided(shape, self.k.stride(), self.k.storage_offset() + offset),
                self.v.as_strided(shape, self.v.stride(), self.v.storage_offset() + offset))

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

    def reserve_room(self, n: int):
        """Room at every block for `n` more tokens on its longest row, so the next n tokens copy no
        cache, whatever runs (a dense block's capacity would otherwise double while decoding)."""
        for layer in self.layers:
            layer.reserve(max(layer.lengths) + n)

    def bytes_kept(self) -> int:
        return sum(layer.bytes_kept() for layer in self.layers)

    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated() for layer in self.layers)

    def tokens_kept(self) -> torch.Tensor:
        """[n_layers, batch] number of kept (token, block) pairs."""
        return torch.tensor([layer.lengths for layer in self.layers])
