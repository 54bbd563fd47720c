"""D-LLM on the Llama-2 architecture: one model definition for training and inference.

Which tokens run which block is the routing policy's (routing.py: D-LLM, MoD, static pruning,
early exit, dense), chosen by `ModelArgs.routing`. Training (`model.train()`) computes every token
in every block, evicts skipped tokens' keys and blends `w * block(x) + (1 - w) * x`, so the router's
gradient exists; only the executing tokens are computed with autograd, as no other gradient
crosses the block (TransformerBlock.forward_split). Inference (`model.eval()`) gathers the
executing tokens of each block and runs only those, blended by the same weight; the others pass
through at the cost of the policy, and leave no K/V behind (see kv_cache.py). A block every token
runs, with rows keeping as many keys (dense mode, the blocks below the routers, a batch of one),
runs as plain Llama: no gather, no mask but causal.
"""
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.layers import ParallelEmbedding, VocabParallelEmbedding
from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region, gather_from_model_parallel_region
from torch import nn

from dllm.errors import InputError
from dllm.core.kv_cache import KVCache, LayerKVCache, Packing
from dllm.core.layers import (
    ColumnLinear, FeedForward, LoRA, RMSNorm, RowLinear, apply_rotary_emb, linear, precompute_freqs_cis,
)
from dllm.core.routing import Decision, DenseRouting, make_routing


@dataclass
class LlamaArgs:
    """The base model's architecture: what a Meta params.json or a Hugging Face config.json says."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 and Hugging Face checkpoints (None/False: Llama-2's derived values)
    head_dim: Optional[int] = None  # dim // n_heads unless given
    hidden_dim: Optional[int] = None  # the FFN width as stored (HF intermediate_size); else rounded from dim
    tie_word_embeddings: bool = False  # the output projection is the embedding matrix
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}


@dataclass
class AdapterArgs:
    """What an adapter adds to its base and how it routes: LoRA, the routing policy and its
    settings (the D-LLM names are the official ones; the rest default to the reference's behaviour).
    The training settings themselves (lambda, lr, schedule) are TrainConfig's."""

    lora_rank: int = 8
    dynamic_active_target: float = 0.5
    dynamic_start_layer: int = 2
    dynamic_router_hdim: int = 512
    dynamic_reserve_initials: int = 2
    lora_scale: float = 1.0
    lora_dropout: float = 0.05
    dynamic_router_bias: Tuple[float, float] = (0.1, 2.0)
    gumbel_tau: float = 1.0
    rate_loss_unit: str = "token"  # the rate loss holds each token's share, each sequence's mean, or response tokens'
    rate_loss_gap: str = "absolute"  # the rate loss's gap |share - target|, or that over the target (relative)
    execute_threshold: float = 0.5  # the policy's inference threshold as saved (policies that have one)
    # budget-conditioned D-LLM: the range of execution shares its routers are trained for and take as
    # input (a target drawn per sequence from it); empty: one fixed target, the routers take no budget
    dynamic_budget_range: Tuple[float, ...] = ()
    dynamic_budget_routers: int = 1  # routers per block sharing out that range (routing.BudgetRouters)
    dynamic_budget_lora: int = 0  # LoRA gains per rank at this many budgets over that range (layers.LoRA); 0: none
    dynamic_budget_draw_power: float = 1.0  # training draws low + (high - low) * u ** power: above 1, low budgets more often
    # the routing policy (routing.POLICIES); params.json without it are D-LLM adapters
    routing: str = "dllm"
    static_skip_layers: Tuple[int, ...] = ()  # static pruning: the blocks every token skips


@dataclass
class ModelArgs(AdapterArgs, LlamaArgs):
    """Everything a model is built from, flat as the official params.json keeps it: the base's
    architecture, the adapter's settings, and the sizes the KV cache and RoPE table are made for."""

    max_batch_size: int = 32
    max_seq_len: int = 2048

    @staticmethod
    def unknown_keys(params: dict) -> list:
        """The keys of a params dict this model does not know (from_dict ignores them)."""
        return sorted(set(params) - {f.name for f in fields(ModelArgs)} - {"use_scaled_rope"})

    @classmethod
    def from_dict(cls, params: dict, **overrides) -> "ModelArgs":
        """Accept a Meta params.json as is; keys this model does not know are ignored (`unknown_keys`)."""
        if not isinstance(params, dict):
            raise TypeError(f"expected a JSON object, got {type(params).__name__}")
        known = {f.name for f in fields(cls)}
        merged = {k: v for k, v in params.items() if k in known}
        if params.get("use_scaled_rope") and merged.get("rope_scaling") is None:
            merged["rope_scaling"] = dict(META_LLAMA3_ROPE_SCALING)  # Meta's Llama-3.1 params.json
        merged.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("dynamic_router_bias", "static_skip_layers", "dynamic_budget_range"):
            if key in merged:
                merged[key] = tuple(merged[key])
        return cls(**merged)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["dynamic_router_bias"] = list(self.dynamic_router_bias)
        out["static_skip_layers"] = list(self.static_skip_layers)
        out["dynamic_budget_range"] = list(self.dynamic_budget_range)
        return out

    @property
    def q_width(self) -> int:
        """The query projection's output width: dim, unless the checkpoint sets head_dim."""
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """The key (and value) projection's output width."""
        return (self.n_kv_heads or self.n_heads) * self.head_dim

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ("llama3", "default"):
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: llama3)")

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# what Meta's params.json means by "use_scaled_rope": true (Llama-3.1)
META_LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _normal_init(weight: torch.Tensor) -> torch.Tensor:
    return nn.init.normal_(weight, std=0.02)


def _no_init(weight: torch.Tensor) -> torch.Tensor:
    return weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, init_method):
        super().__init__()
        mp = fs_init.get_model_parallel_world_size()
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = self.n_kv_heads // mp
        self.head_dim = args.head_dim
        q_out, kv_out = args.q_width, args.kv_width
        column = dict(bias=False, gather_output=False, init_method=init_method)
        self.wq = ColumnLinear(args.dim, q_out, **column)
        self.wk = ColumnLinear(args.dim, kv_out, **column)
        self.wv = ColumnLinear(args.dim, kv_out, **column)
        self.wo = RowLinear(q_out, args.dim, bias=False, input_is_parallel=True, init_method=init_method)
        if args.lora_rank > 0:
            lora = (args.lora_rank, args.lora_dropout, args.lora_scale, args.dynamic_budget_lora)
            self.lora_q = LoRA(args.dim, q_out, *lora)
            self.lora_k = LoRA(args.dim, kv_out, *lora)
            self.lora_v = LoRA(args.dim, kv_out, *lora)
        else:
            self.lora_q = self.lora_k = self.lora_v = None
        # merge_lora_at: the strength folded into wq/wk/wv, and their weights without it
        self.merged_strength: Optional[float] = None
        self.unmerged_weights: Optional[Tuple[torch.Tensor, ...]] = None

    def merge_lora(self):
        """Fold LoRA into wq/wk/wv for inference; the adapters are dropped afterwards. Merged at a
        strength before (merge_lora_at), the weights without it are restored first."""
        if self.lora_q is None:
            return
        with torch.no_grad():
            if self.unmerged_weights is not None:
                for base, weight in zip((self.wq, self.wk, self.wv), self.unmerged_weights):
                    base.weight.copy_(weight)
                self.unmerged_weights = self.merged_strength = None
            for base, lora in ((self.wq, self.lora_q), (self.wk, self.lora_k), (self.wv, self.lora_v)):
                base.weight += lora.delta_weight().to(base.weight.dtype)
        self.lora_q = self.lora_k = self.lora_v = None

    def merge_lora_at(self, strength: float):
        """Fold LoRA into wq/wk/wv at `strength` times its trained update, keeping the LoRA and the
        weights without it: merging another strength then starts from those, so it is exact however
        often the strength changes (a sum of differences would drift in bf16), at the cost of one copy
        of wq/wk/wv. Merged, the projections run at the base's speed; unmerged, each adds its LoRA's
        two products at every step."""
        if self.lora_q is None:
            raise RuntimeError("merge_lora_at needs the LoRA kept (not merged for good) and a LoRA rank above 0")
        if strength == self.merged_strength:
            return
        bases = (self.wq, self.wk, self.wv)
        if self.unmerged_weights is None:
            self.unmerged_weights = tuple(base.weight.detach().clone() for base in bases)
        with torch.no_grad():
            for base, lora, weight in zip(bases, (self.lora_q, self.lora_k, self.lora_v), self.unmerged_weights):
                base.weight.copy_(weight + (lora.delta_weight() * strength).to(weight.dtype))
        self.merged_strength = strength

    def project(self, x: torch.Tensor, freqs_cis: torch.Tensor, anchors: Optional[torch.Tensor] = None):
        """x [..., dim] -> q [..., heads, head_dim], k and v [..., kv_heads, head_dim], RoPE applied;
        anchors [..., budget_gates]: each token's, for a budget-conditioned LoRA."""
        return self.heads(self.products(x), self.lora_updates(x, anchors), freqs_cis)

    def products(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base projections of x: q, k and v before LoRA and RoPE, [..., width]."""
        return self.wq(x), self.wk(x), self.wv(x)

    def lora_updates(self, x: torch.Tensor, anchors: Optional[torch.Tensor] = None):
        """The LoRA's updates of q, k and v for x, or None where there is no LoRA or it is merged."""
        if self.lora_q is None or self.merged_strength is not None:
            return None
        return self.lora_q(x, anchors), self.lora_k(x, anchors), self.lora_v(x, anchors)

    def heads(self, products, updates, freqs_cis: torch.Tensor):
        """The base products plus the LoRA's updates (None: none), split into heads, RoPE applied."""
        q, k, v = products
        if updates is not None:
            q, k, v = q + updates[0], k + updates[1], v + updates[2]
        lead = q.shape[:-1]
        q = apply_rotary_emb(q.view(*lead, self.n_local_heads, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(*lead, self.n_local_kv_heads, self.head_dim), freqs_cis)
        return q, k, v.view(*lead, self.n_local_kv_heads, self.head_dim)

    def attend(self, q, keys, values, mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        """q [b, m, h, d], keys/values [b, kvh, n, d] (the cache's layout), mask [b, m, n] bool
        (True = attend) or None -> [b, m, h * d]."""
        out = self.attend_heads(q.transpose(1, 2), keys, values, None if mask is None else mask.unsqueeze(1), causal)
        return out.transpose(1, 2).flatten(2)

    def attend_heads(self, q, keys, values, mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
        """attend in the cache's layout: q [b, h, m, d] -> [b, h, m, d]; mask broadcasts to [b, h, m, n]."""
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.n_local_heads != self.n_local_kv_heads)

    def forward_causal(self, x, freqs_cis, anchors=None) -> torch.Tensor:
        """Every token computed over every earlier one: a block all tokens execute, in training."""
        q, k, v = self.project(x, freqs_cis, anchors)
        return self.wo(self.attend(q, k.transpose(1, 2), v.transpose(1, 2), causal=True))

    def forward_plain(self, x, freqs_cis, kv: LayerKVCache, anchors=None) -> torch.Tensor:
        """Every token of every row, rows keeping as many keys: plain Llama attention over the
        cache, causal among the new tokens and no other mask."""
        b, s, _ = x.shape
        kept = kv.lengths[0]
        q, k, v = self.project(x, freqs_cis, anchors)
        keys, values = kv.append_all(k, v)
        mask = None
        if s > 1 and kept > 0:
            mask = torch.ones(s, kept + s, dtype=torch.bool, device=x.device).tril(kept).expand(b, s, kept + s)
        return self.wo(self.attend(q, keys, values, mask, causal=s > 1 and kept == 0))

    def forward_packed(self, x, freqs_cis, packing: Packing, kv: LayerKVCache, anchors=None) -> torch.Tensor:
        """Only executing tokens, packed [n, dim]. Their K/V are appended to the cache; each
        executing row attends to its own kept keys, row by row, or all rows at once with queries
        padded to one width (kv_cache.py says which, and why)."""
        q, k, v = self.project(x, freqs_cis, anchors)
        keys, values = kv.append_packed(packing, k, v)
        if packing.rows is not None:
            return self.wo(self.attend_rows(q, packing.rows, kv))
        if packing.even:
            q_pad = q.view(keys.shape[0], packing.width, *q.shape[1:])
        else:
            q_pad = q.new_zeros(keys.shape[0], packing.width, *q.shape[1:])
            q_pad[packing.token_rows, packing.rank] = q
        out = self.attend(q_pad, keys, values, packing.key_mask, causal=packing.causal)
        return self.wo(out.flatten(0, 1) if packing.even else out[packing.token_rows, packing.rank])

    def attend_rows(self, q, rows, kv: LayerKVCache) -> torch.Tensor:
        """q [n, heads, head_dim] packed row-major -> [n, heads * head_dim]: each executing row's
        queries over exactly its kept keys, causal among its new ones, no mask for one. A decode
        step runs this loop for every routed block, so each row costs one query slice, two cache
        views and the attention call, and the outputs are laid out once at the end."""
        q = q.transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]: a row's queries are one slice
        outs, start = [], 0
        for r, old, count in rows:
            keys, values = kv.row(r)
            mask = None
            if count > 1 and old > 0:
                mask = torch.ones(count, old + count, dtype=torch.bool, device=q.device).tril(old)
            outs.append(self.attend_heads(q.narrow(2, start, count), keys, values, mask, causal=count > 1 and old == 0))
            start += count
        return torch.cat(outs, 2)[0].transpose(0, 1).flatten(1)


@dataclass
class RowPacking:
    """Chosen tokens of a [rows, s] batch laid out per row, in order, left-aligned in `width`
    slots: `where` = (row, rank among the row's chosen tokens) of each, in flat order."""

    where: Tuple[torch.Tensor, torch.Tensor]
    rows: int
    width: int

    @classmethod
    def of(cls, index: torch.Tensor, chosen: torch.Tensor) -> "RowPacking":
        """index [n]: the chosen tokens' flat indices, in order; chosen [rows, s] bool."""
        rank = chosen.long().cumsum(1).flatten().index_select(0, index) - 1
        return cls((index // chosen.shape[1], rank), chosen.shape[0], int(rank.max()) + 1 if len(index) else 1)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """[n, ...] in flat order -> [rows, width, ...], zeros in the slots left over."""
        return t.new_zeros((self.rows, self.width) + t.shape[1:]).index_put(self.where, t)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] -> the chosen tokens' [n, ...]."""
        return t[self.where]


def blend(weight: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Decision.update_weight applied: 1 gives the block's output exactly, 0 its input."""
    w = weight.unsqueeze(-1).to(x.dtype)
    return w * out + (1 - w) * x


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, init_method, routing: DenseRouting):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, init_method)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, init_method)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.router = routing.block_module(layer_id)

    def _ffn(self, h):
        return h + self.feed_forward(self.ffn_norm(h))

    def _run_all(self, x, freqs_cis, anchors=None) -> torch.Tensor:
        """Every token through the block, causal over every earlier one: training's unrouted path."""
        return self._ffn(x + self.attention.forward_causal(self.attention_norm(x), freqs_cis, anchors))

    def forward_split(self, x, freqs_cis, decision: Decision, anchors=None) -> torch.Tensor:
        """The block's output for every token in training, before the blend, [b, s, dim].

        A skipped token's update has weight 0 in the blend and its key is evicted from every other
        query, so no gradient crosses the block for it. The executing tokens run with autograd; the
        skipped ones run without it, and only where the weight carries a gradient (D-LLM's
        straight-through estimator needs their output; MoD's fixed 0 needs nothing, and they keep
        their input). So the backward and the saved activations of the projections, attention and
        the feed-forward cost the executed share, not all tokens; one read of the execute mask to the
        host per block picks the rows. The executing tokens of each row, packed in order, attend
        causally among themselves, which is what eviction leaves them. The norm and the LoRA (a
        small part) run on all tokens at once, so LoRA dropout draws its masks as over the whole batch.
        """
        keep = decision.mask.flatten()
        run, rest = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
        if len(rest) == 0:
            return self._run_all(x, freqs_cis, anchors)
        rest_needed = decision.weight.requires_grad
        if len(run) == 0 and not rest_needed:
            return x
        b, s = x.shape[:2]
        tokens, freqs_cis = x.flatten(0, 1), freqs_cis.flatten(0, 1)
        normed = self.attention_norm(tokens)
        updates = self.attention.lora_updates(normed, None if anchors is None else anchors.flatten(0, 1))

        def project(rows):
            products = self.attention.products(normed.index_select(0, rows))
            ups = None if updates is None else [u.index_select(0, rows) for u in updates]
            return self.attention.heads(products, ups, freqs_cis.index_select(0, rows))

        def finish(rows, attended):
            return self._ffn(tokens.index_select(0, rows) + self.attention.wo(attended))

        def spread(ran: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
            """[n_run, ...] and [n_rest, ...] laid out as the flat tokens."""
            return ran.new_zeros((b * s,) + ran.shape[1:]).index_copy(0, run, ran).index_copy(0, rest, skipped)

        # an executing token attends to the executing tokens up to itself only: packed per row in
        # order, they attend causally, at the cost of the executed share squared
        q, k, v = project(run)
        ran = RowPacking.of(run, decision.mask)
        attended = self.attention.attend(ran.pack(q), ran.pack(k).transpose(1, 2), ran.pack(v).transpose(1, 2), causal=True)
        out_run = finish(run, ran.unpack(attended))
        if not rest_needed:
            return spread(out_run, tokens.index_select(0, rest)).view_as(x)
        with torch.no_grad():  # a skipped token attends to the executing tokens before it and to its own key
            q_rest, k_rest, v_rest = project(rest)
            k, v = (spread(r, o).unflatten(0, (b, s)) for r, o in ((k, k_rest), (v, v_rest)))
            skipped = RowPacking.of(rest, ~decision.mask)
            position = skipped.pack(rest % s)  # padding: position 0, whose own key it sees
            keys = torch.arange(s, device=x.device)
            mask = (decision.mask[:, None, :] & (keys <= position[..., None])) | (keys == position[..., None])
            out_rest = finish(rest, skipped.unpack(self.attention.attend(skipped.pack(q_rest), k.transpose(1, 2),
                                                                         v.transpose(1, 2), mask)))
        return spread(out_run, out_rest).view_as(x)

    def forward(self, x, positions, freqs_cis, routing, kv: Optional[LayerKVCache] = None, state: Optional[dict] = None):
        """Returns (output, decision). Without a cache: the training path (forward_split); with one:
        real skipping, where a routed block reads its execute mask to the host once (its only
        synchronisation) and a block every token runs with rows keeping as many keys takes the plain
        Llama path.
        `state` is the routing state of the whole model's forward (routing.py)."""
        state = {} if state is None else state
        decision: Optional[Decision] = routing.decide(self, x, positions, state)
        b, s, _ = x.shape
        anchors = routing.lora_anchors(x, state, self.training)  # per token, for a budget-conditioned LoRA
        if kv is None:
            if decision is None:
                return self._run_all(x, freqs_cis[positions], anchors), None
            return blend(decision.update_weight(), self.forward_split(x, freqs_cis[positions], decision, anchors), x), decision

        start = kv.feed(s)
        # the block's one read from the device: which tokens execute it
        execute = None if decision is None else decision.mask.to("cpu", copy=True).tolist()
        if execute is not None and not any(map(any, execute)):
            return x, decision
        if (execute is None or all(map(all, execute))) and kv.uniform():
            h = x + self.attention.forward_plain(self.attention_norm(x), freqs_cis[start : start + s], kv, anchors)
            out = self._ffn(h)
            if decision is not None and decision.scale is not None:  # else the executing tokens' weight is 1
                out = blend(decision.update_weight(), out, x)
            return out, decision
        packing = kv.pack(execute or [[True] * s] * b, start, x.device)
        where = (packing.token_rows, packing.token_cols)
        tokens = x[where]
        h = tokens + self.attention.forward_packed(self.attention_norm(tokens), freqs_cis[packing.positions], packing, kv,
                                                   None if anchors is None else anchors[where])
        out = self._ffn(h)
        if decision is not None and decision.scale is not None:  # else the executing tokens' weight is 1
            out = blend(decision.update_weight()[where], out, tokens)
        return x.index_put(where, out), decision


def is_adapter_key(name: str) -> bool:
    """Router (any policy's block module) and LoRA tensors: what fine-tuning trains and what an
    adapter checkpoint holds."""
    return ".router." in name or ".lora_" in name


def check_model_parallel_split(params: ModelArgs, mp_size: int):
    """Heads, KV heads and the vocabulary are split across model-parallel ranks: each must divide."""
    counts = (("n_heads", params.n_heads), ("n_kv_heads", params.n_kv_heads or params.n_heads),
              ("vocab_size", params.vocab_size))
    bad = [f"{name}={count}" for name, count in counts if count % mp_size]
    if bad:
        raise InputError(f"{' and '.join(bad)} {'does' if len(bad) == 1 else 'do'} not divide by the "
                         f"model-parallel size {mp_size}; use a model-parallel size that divides it")


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs, init_weights: bool = True):
        """`init_weights=False` skips random initialisation when a checkpoint will be loaded."""
        super().__init__()
        if not fs_init.model_parallel_is_initialized():
            raise RuntimeError("model parallel is not initialised: call dllm.distributed.setup() first")
        check_model_parallel_split(params, fs_init.get_model_parallel_world_size())
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        init_method = _normal_init if init_weights else _no_init
        if params.tie_word_embeddings:
            # split by vocabulary, so each rank's embedding shard is its shard of the output projection
            self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim, init_method=init_method)
            self.output = None
        else:
            self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, init_method=init_method)
            self.output = ColumnLinear(params.dim, params.vocab_size, bias=False, init_method=init_method)
        self.routing = make_routing(params)
        self.layers = nn.ModuleList(TransformerBlock(i, params, init_method, self.routing) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        # a plain attribute, not a buffer: Module.to(dtype) would drop the imaginary part
        self.freqs_cis = precompute_freqs_cis(params.head_dim, params.max_seq_len * 2, params.rope_theta,
                                              params.rope_scaling)

    def new_cache(self, batch: int) -> KVCache:
        attn = self.layers[0].attention
        weight = attn.wk.weight
        return KVCache(self.n_layers, batch, attn.n_local_kv_heads, attn.head_dim, weight.dtype, weight.device,
                       self.params.max_seq_len)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None,
                budget: Optional[torch.Tensor] = None, response_tokens: Optional[torch.Tensor] = None):
        """tokens [b, s] -> (logits [b, s, vocab] fp32, activation [b, s, n_layers]).

        activation is the execute weight per token and block (1 for always-on blocks and reserved
        tokens); in training it carries the routers' gradient. In eval mode without a cache a
        throw-away cache is used, so the forward skips for real. budget [b]: the share of blocks
        each row should execute, for a policy that takes one (routing.DLLMRouting.check_budget).
        response_tokens [b, s]: which tokens belong to the answer rather than the prompt, for a dial
        calibrated per phase (routing.MarginDial); unmarked, every token counts as the answer's.
        """
        inputs = {"budget": budget, "response_tokens": response_tokens}
        logits, activation, _ = self.run(tokens, start_pos, cache, {k: v for k, v in inputs.items() if v is not None})
        return logits, activation

    def run(self, tokens: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None,
            state: Optional[dict] = None):
        """forward, plus the routing state it left (what the policy's aux loss reads); `state` may
        start with the policy's inputs for this forward (a per-row "budget", the "response_tokens")."""
        h, activation, state = self.hidden_states(tokens, start_pos, cache, state)
        return self.project_vocab(h).float(), activation, state

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None,
                      state: Optional[dict] = None):
        """run without the output projection: (the final norm's output [b, s, dim], activation, state)."""
        b, s = tokens.shape
        if self.training and cache is not None:
            raise ValueError("the KV cache is for inference; call model.eval() first")
        if not self.training and cache is None:
            if start_pos != 0:
                raise ValueError("start_pos > 0 needs the cache of the earlier tokens")
            cache = self.new_cache(b)
        if cache is not None and start_pos != cache.seen:
            raise ValueError(f"start_pos {start_pos}, but the cache has seen {cache.seen} tokens per row")
        self.freqs_cis = self.freqs_cis.to(tokens.device)
        positions = torch.arange(start_pos, start_pos + s, device=tokens.device).expand(b, s)
        h = self.tok_embeddings(tokens)
        activation, executes_all = [], torch.ones(b, s, device=h.device)
        state = {} if state is None else dict(state)
        for layer in self.layers:
            kv = None if cache is None else cache.layers[layer.layer_id]
            h, decision = layer(h, positions, self.freqs_cis, self.routing, kv, state)
            activation.append(executes_all if decision is None else decision.weight.float())
        return self.norm(h), torch.stack(activation, -1), state

    def project_vocab(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection; tied models use the embedding matrix itself (one tensor, no copy)."""
        if self.output is not None:
            return self.output(h)
        local = linear(copy_to_model_parallel_region(h), self.tok_embeddings.weight)
        return gather_from_model_parallel_region(local)

    def logits_at(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, vocab] at the flat `positions` (objective.scored_positions) only: a teacher's targets."""
        h, _, _ = self.hidden_states(tokens)
        return self.project_vocab(h.flatten(0, 1)[positions]).float()

    def use_routing(self, routing: DenseRouting):
        """Route with another policy over the blocks as built (the dense base, a pruning probe, fixed
        decisions): it reads the block modules this model holds, and adds none."""
        if not isinstance(routing, DenseRouting):
            raise TypeError(f"a routing policy (routing.DenseRouting or a subclass), got {type(routing).__name__}")
        self.routing = routing

    def merge_lora(self):
        for layer in self.layers:
            layer.attention.merge_lora()

    def merge_lora_at(self, strength: float):
        """Every LoRA update folded into its projection at `strength` times the trained scale, the LoRA
        kept so that another strength can be merged later (Attention.merge_lora_at)."""
        for layer in self.layers:
            layer.attention.merge_lora_at(strength)

    def set_lora_strength(self, strength: float):
        """Every LoRA update at `strength` times the trained scale, applied unmerged at every step."""
        for layer in self.layers:
            attention = layer.attention
            for lora in (attention.lora_q, attention.lora_k, attention.lora_v):
                if lora is None or attention.merged_strength is not None:
                    raise RuntimeError("set_lora_strength needs the LoRA unmerged (and a LoRA rank above 0)")
                lora.scale = self.params.lora_scale * strength

    def set_adapter_trainable(self, adapter_only: bool = True) -> int:
        """Freeze everything but routers and LoRA (or unfreeze all), and the blocks the policy never
        runs (no gradient reaches them); returns the trainable count."""
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter_key(name) or not adapter_only)
        for layer in self.layers:
            if self.routing.always_skips(layer.layer_id):
                layer.requires_grad_(False)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
