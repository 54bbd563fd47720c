"""D-LLM against dllm's dense mode and transformers' Llama on the same weights, in one run: prefill
and decode speed, KV bytes, FLOPs and weight-read shares.

A random-weight Llama-2-shaped model (or a real base with --llama_ckpt_dir; routers stay random).
Each routed block's router is calibrated (once, on all the sequences measured) so that a chosen share
of tokens executes it.
Configurations are interleaved within every repeat and the best of --repeats is kept, so machine
noise hits all alike; every ratio in the table comes from this one run.

Ideals. Prefill is bound by arithmetic: its ideal speed-up over dense is 1 / FLOPs ratio. Decode at
small batch is bound by reading weights: a block costs its full weight read as soon as one row of
the batch executes it, so decode's ideal is the smaller of 1 / FLOPs ratio and 1 / weight-read
ratio (the bytes of weights read, counting a block at a step when any row executes it, plus the
routers and the LM head, over dense). The weight-read share is the share of (step, routed block)
pairs where at least one row executes. The bytes ideal counts what a decode step must read at the
least, weights and K/V alike: dense reads every block's weights and every row's K/V; D-LLM the
weights of the blocks some row executes (plus the routers), and at each block only the rows that
execute it read their own kept pairs. At long contexts K/V outweigh the weights, and that is where
eviction can pay. The kept-cache ideal is looser: every weight read, and every row reading its whole
kept cache at every block each step, what eviction alone saves without skipping anything (the first
estimate that asked for this work). The bytes ideal prices a weight byte and a K/V byte alike; on a CPU, batched
matmuls read weights more slowly than attention reads K/V, so the rate ideal prices each at dense's
own cost on this machine: dense decodes once more after a --rate_prompt_len prompt (the same weights,
few pairs), the two timings give a pair's time and a weight byte's (with all else a step does), and
the ideal is dense's time over what D-LLM's reads cost at those prices. `dllm-agree@s` measures
what batched decode could gain if routers agreed across the batch: the first row decides for every
row (a different model, only a measurement of the bound; its quality is not measured).

    python -m benchmarks.bench_skip --out benchmarks/results/bench_skip_cpu.json   # the committed CPU table
    python -m benchmarks.bench_skip --dim 4096 --n_layers 32 --n_heads 32 --dtype bfloat16 --repeats 3 \\
        --out benchmarks/results/bench_skip_gpu.json     # Llama-2-7B shape on a GPU (synchronised timing)
    python -m benchmarks.bench_skip --llama_ckpt_dir models/smollm2 --decode_batches 1 \\
        --out benchmarks/results/bench_smollm2_cpu.json  # a real base (Meta or HF layout)

Without --out the table is printed and nothing is written.
"""
import json
import os
import platform
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks import command
from dllm import distributed
from dllm.checkpoints import hf_layout
from dllm.checkpoints import base_model, model_params
from dllm.atomic_io import atomic_write_text
from dllm.config import Settings, setting
from dllm.errors import InputError, run_cli
from dllm.core.flops import flops_ratio, forward_flops, kv_ratio
from dllm.core.kv_cache import KVCache
from dllm.core.model import ModelArgs, Transformer
from dllm.core.routing import DenseRouting, DLLMRouting
from dllm.timing import CLOCKS, timed


@dataclass
class BenchBase(Settings):
    """What every speed benchmark of this model shares: the model (a random-weight Llama of this
    shape, or a real base), the shares measured, the decode steps timed, the repeats, the output."""

    dim: int = setting(1024, "model width (random weights)", low=1)
    n_layers: int = setting(8, "decoder blocks", low=1)
    n_heads: int = setting(8, "attention heads", low=1)
    n_kv_heads: Optional[int] = setting(None, "key/value heads (default: n_heads)", low=1)
    vocab_size: int = setting(32000, "vocabulary size", low=1)
    router_hdim: int = setting(512, "router hidden width", low=1)
    start_layer: int = setting(2, "blocks below this always execute", low=0)
    shares: List[float] = setting([0.25, 0.5, 0.75], "execution shares of the routed blocks", low=0, high=1,
                                  low_open=True)
    decode_steps: int = setting(32, "timed decode steps", low=1)
    budget: List[float] = setting([], "also these budgets, shares of all blocks as --budget means elsewhere (the "
                                  "blocks below --start_layer count as executed), e.g. \"[0.5, 0.7]\"", low=0,
                                  high=1, low_open=True)
    repeats: int = setting(3, "interleaved repeats; the best is kept", low=1)
    clock: str = setting("wall", "what a time is: wall time, or the process's CPU time (a CPU shared with "
                         "other jobs)", choices=tuple(CLOCKS))
    dtype: str = setting("float32", "weights dtype", choices=("float32", "bfloat16", "float16"))
    rate_prompt_len: int = setting(16, "dense also decodes after a prompt this short, which prices a K/V pair "
                                   "and a weight byte on this machine (the rate ideal); 0: no rate ideal", low=0)
    seed: int = setting(0, "random seed")
    llama_ckpt_dir: Optional[str] = setting(None, "a real base (Meta or HF layout) instead of random weights")
    out: Optional[str] = setting(None, "write the table's JSON here (default: print only)")


@dataclass
class BenchConfig(BenchBase):
    prompt_len: int = setting(512, "prefill prompt length (batch 1)", low=1)
    decode_prompt_len: int = setting(128, "prompt length before the timed decode steps", low=1)
    decode_batches: List[int] = setting([1, 8], "decode batch sizes", low=1)


class CalibratedRouting(DLLMRouting):
    """D-LLM inference routing with a per-block threshold, set the first time a block is seen so
    that a fraction `share` of those tokens executes it (p(execute) >= threshold, as in D-LLM)."""

    def __init__(self, share: float, args: ModelArgs):
        super().__init__(args)
        self.share = share
        self.thresholds = {}

    def decide(self, block, x, positions, state):
        if block.router is not None:
            if block.layer_id not in self.thresholds:
                logits = block.router(x)
                margin = (logits[..., 1] - logits[..., 0]).flatten()
                self.thresholds[block.layer_id] = torch.sigmoid(torch.quantile(margin, 1.0 - self.share)).item()
            self.threshold = self.thresholds[block.layer_id]
        return super().decide(block, x, positions, state)


class AgreeingRouting(CalibratedRouting):
    """The first row's decision for every row: routers that agree across the batch."""

    def decide(self, block, x, positions, state):
        decision = super().decide(block, x, positions, state)
        if decision is not None:
            decision.weight, decision.mask = decision.weight[:1].expand_as(decision.weight), decision.mask[:1].expand_as(decision.mask)
        return decision


FILL_CHUNK = 256  # tokens per forward of an untimed prefill


@dataclass
class CacheBytes:
    """What the table reads of a cache, kept so the cache itself can be freed."""

    kept: int
    allocated: int
    pair: int

    @classmethod
    def of(cls, cache) -> Optional["CacheBytes"]:
        return cls(cache.bytes_kept(), cache.bytes_allocated(), cache.pair_bytes()) if isinstance(cache, KVCache) else None


class DllmRunner:
    """dllm under one routing policy; returns activations and KV bytes beside the timings."""

    def __init__(self, model: Transformer, routing, clock: str = "wall"):
        self.model, self.routing, self.clock = model, routing, clock

    def prefill(self, tokens, device, room: int = 0):
        """Time a prefill of `tokens` into a fresh cache (`room`: tokens to follow; dllm's cache grows)."""
        self.model.use_routing(self.routing)
        cache = self.model.new_cache(tokens.shape[0])
        seconds, (_, activation) = timed(lambda: self.model(tokens, 0, cache), device, self.clock)
        return seconds, activation, cache

    def steps(self, cache, steps, start: int, device):
        """Time one token at a time for every column of `steps`, at positions from `start` on."""
        self.model.use_routing(self.routing)

        def run():
            return torch.cat([self.model(steps[:, i : i + 1], start + i, cache)[1] for i in range(steps.shape[1])], 1)

        seconds, activation = timed(run, device, self.clock)
        return seconds, activation

    def fill(self, tokens, device, room: int = 0):
        """Prefill untimed, FILL_CHUNK tokens at a time (the same cache, the same routing, less
        memory than one forward's logits), then make `room` for the tokens to follow, as
        transformers' static cache has it; returns (activation, cache)."""
        self.model.use_routing(self.routing)
        cache = self.model.new_cache(tokens.shape[0])
        starts = range(0, tokens.shape[1], FILL_CHUNK)
        activation = [self.model(tokens[:, a : a + FILL_CHUNK], a, cache)[1] for a in starts]
        cache.reserve_room(room)
        return torch.cat(activation, 1), cache

    def decode(self, prompt, steps, device):
        """Prefill `prompt` (untimed), then time the steps; the activation covers both."""
        prompt_activation, cache = self.fill(prompt, device, room=steps.shape[1])
        seconds, activation = self.steps(cache, steps, prompt.shape[1], device)
        return seconds, torch.cat([prompt_activation, activation], 1), cache


class TransformersRunner:
    """transformers' LlamaForCausalLM on the same weights, with its static cache and SDPA."""

    def __init__(self, model: Transformer, dtype: torch.dtype, clock: str = "wall"):
        self.clock = clock
        from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

        self.cache_class = StaticCache
        device = model.tok_embeddings.weight.device
        config = LlamaConfig(**hf_layout.params_to_config(model.params, dtype))
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            hf = LlamaForCausalLM(config)
        base = {k: v for k, v in model.state_dict().items() if ".router." not in k and ".lora_" not in k}
        weights = hf_layout.meta_to_hf(base, model.params)
        if config.tie_word_embeddings:  # one tensor under both names, as transformers ties them
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        hf.load_state_dict(weights, strict=True, assign=True)
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config).to(device)  # buffers not in a state dict
        self.hf, self.config = hf.eval(), config

    def prefill(self, tokens, device, room: int = 0):
        """Time a prefill into a fresh static cache with `room` slots for the tokens to follow."""
        def run():
            cache = self.cache_class(self.config, max_cache_len=tokens.shape[1] + room)
            self.hf(tokens, cache=cache, use_cache=True)
            return cache
        seconds, cache = timed(run, device, self.clock)
        return seconds, None, cache

    def steps(self, cache, steps, start: int, device):
        positions = torch.arange(start, start + steps.shape[1], device=device)

        def run():
            for i in range(steps.shape[1]):
                self.hf(steps[:, i : i + 1], cache=cache, use_cache=True, cache_position=positions[i : i + 1])

        seconds, _ = timed(run, device, self.clock)
        return seconds, None

    def fill(self, tokens, device, room: int = 0):
        cache = self.cache_class(self.config, max_cache_len=tokens.shape[1] + room)
        for a in range(0, tokens.shape[1], FILL_CHUNK):
            chunk = tokens[:, a : a + FILL_CHUNK]
            positions = torch.arange(a, a + chunk.shape[1], device=device)
            self.hf(chunk, cache=cache, use_cache=True, cache_position=positions)
        return None, cache

    def decode(self, prompt, steps, device):
        _, cache = self.fill(prompt, device, room=steps.shape[1])
        seconds, _ = self.steps(cache, steps, prompt.shape[1], device)
        return seconds, None, None


def build_model(config: BenchBase, device, max_seq_len: int, max_batch_size: int) -> Transformer:
    sizes = dict(dynamic_router_hdim=config.router_hdim, dynamic_start_layer=config.start_layer, lora_rank=0,
                 max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    torch_dtype = getattr(torch, config.dtype)
    if config.llama_ckpt_dir:
        args = model_params.load_params(config.llama_ckpt_dir, **sizes)
        model = base_model.build_model(args, config.llama_ckpt_dir, None, device, torch_dtype)
    else:
        args = ModelArgs(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads,
                         n_kv_heads=config.n_kv_heads, vocab_size=config.vocab_size, **sizes)
        distributed.setup_if_needed()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        model = Transformer(args).to(device)
        torch.set_default_dtype(previous)
    for layer in model.layers:
        if layer.router is not None:
            torch.nn.init.normal_(layer.router.linear_2.weight, std=0.5)
    return model.eval()


def weight_bytes(model: Transformer) -> Dict[str, object]:
    """Bytes a forward reads per block (without its router), per router, and for the LM head."""
    def size(params):
        return sum(p.numel() * p.element_size() for p in params)
    blocks = [size(p for n, p in layer.named_parameters() if not n.startswith("router.")) for layer in model.layers]
    routers = [0 if layer.router is None else size(layer.router.parameters()) for layer in model.layers]
    head = model.output.weight if model.output is not None else model.tok_embeddings.weight
    return {"blocks": blocks, "routers": routers, "head": size([head])}


def weight_read(activation: torch.Tensor, sizes: dict, start_layer: int, routed: bool):
    """(weight-read share, weight-read ratio) of decode steps; activation [b, steps, n_layers]."""
    any_row = (activation > 0.5).any(0).double()  # [steps, n_layers]
    blocks = torch.tensor(sizes["blocks"], dtype=torch.float64)
    per_step = (any_row * blocks).sum(1) + sizes["head"] + (sum(sizes["routers"]) if routed else 0)
    dense = blocks.sum() + sizes["head"]
    return float(any_row[:, start_layer:].mean()), float(per_step.mean() / dense)


def decode_reads(activation: torch.Tensor, sizes: dict, n_prompt: int, routed: bool) -> Tuple[float, int]:
    """(weight bytes, K/V pairs) the decode steps after `n_prompt` must read at the least; activation
    [b, tokens, n_layers].

    Each step reads the weights of every block some row executes, the LM head and the routers, and
    at each block, for every row that executes it, that row's kept K/V pairs (its new one included).
    """
    executed = activation > 0.5
    pairs = (executed.cumsum(1) * executed)[:, n_prompt:].sum()
    any_row = executed[:, n_prompt:].any(0).double()  # [steps, n_layers]
    per_step = sizes["head"] + (sum(sizes["routers"]) if routed else 0)
    weights = (any_row * torch.tensor(sizes["blocks"], dtype=torch.float64)).sum() + any_row.shape[0] * per_step
    return float(weights), int(pairs)


def kept_cache_reads(activation: torch.Tensor, sizes: dict, n_prompt: int, routed: bool) -> Tuple[float, int]:
    """(weight bytes, K/V pairs) of decode steps that read every weight and, at every block, every
    row's whole kept cache: what eviction alone saves, skipping aside (the first estimate of what it
    could save, (weights + K/V) / (weights + kept share x K/V)). An upper bound on the bytes ideal's reads."""
    kept = (activation > 0.5).cumsum(1)[:, n_prompt:].sum()
    steps = activation.shape[1] - n_prompt
    weights = sum(sizes["blocks"]) + sizes["head"] + (sum(sizes["routers"]) if routed else 0)
    return float(steps * weights), int(kept)


def decode_bytes(activation: torch.Tensor, sizes: dict, n_prompt: int, pair_bytes: int, routed: bool) -> float:
    weights, pairs = decode_reads(activation, sizes, n_prompt, routed)
    return weights + pairs * pair_bytes


def read_prices(dense_long: float, dense_short: float, reads_long, reads_short) -> Optional[Tuple[float, float]]:
    """(seconds per weight byte, seconds per K/V pair) of dense's decode on this machine. After a long
    and a short prompt it reads the same weights (bytes, pairs in `reads_*`) and different pairs, which
    prices a pair and, with everything else a step does, a weight byte. None when the two timings
    cannot tell them apart."""
    (weights, pairs_long), (_, pairs_short) = reads_long, reads_short
    per_pair = (dense_long - dense_short) / (pairs_long - pairs_short)
    per_weight_byte = (dense_long - per_pair * pairs_long) / weights
    return (per_weight_byte, per_pair) if per_pair > 0 and per_weight_byte > 0 else None


def rate_ideal(dense_long: float, prices: Tuple[float, float], reads) -> float:
    """The speed-up over dense that `reads` (weight bytes, K/V pairs) allow at dense's prices."""
    return dense_long / (prices[0] * reads[0] + prices[1] * reads[1])


def step_flops_ratio(args: ModelArgs, activation: torch.Tensor, n_prompt: int, routing) -> float:
    """FLOPs of the tokens after the prompt (the timed steps) over dense's."""
    def steps_only(act, policy):
        return forward_flops(args, act, routing=policy) - forward_flops(args, act[:, :n_prompt], routing=policy)
    return steps_only(activation, routing) / steps_only(torch.ones_like(activation), None)


def make_runners(model: Transformer, shares: List[float], calibration: torch.Tensor, device, clock: str,
                 reference: bool = True) -> dict:
    """transformers (`reference`: a second copy of the weights), dense and D-LLM at each share, its
    routers calibrated on `calibration`."""
    runners = {"transformers": TransformersRunner(model, model.tok_embeddings.weight.dtype, clock)} if reference else {}
    runners["dense"] = DllmRunner(model, DenseRouting(), clock)
    with torch.inference_mode():
        for share in shares:
            runners[f"dllm@{share:.2f}"] = DllmRunner(model, CalibratedRouting(share, model.params), clock)
            runners[f"dllm@{share:.2f}"].prefill(calibration, device)  # sets every router's threshold
    return runners


def main(config: BenchConfig):
    device = distributed.setup()
    torch.manual_seed(config.seed)
    model = build_model(config, device, max(config.prompt_len, config.decode_prompt_len + config.decode_steps),
                        max(config.decode_batches))
    args = model.params
    prompt = torch.randint(0, args.vocab_size, (1, config.prompt_len), device=device)
    decode_tokens = torch.randint(0, args.vocab_size, (max(config.decode_batches), config.decode_prompt_len
                                                       + config.decode_steps), device=device)
    decode_inputs = {b: (decode_tokens[:b, : config.decode_prompt_len], decode_tokens[:b, config.decode_prompt_len :])
                     for b in config.decode_batches}
    # routers are calibrated on every sequence measured: with random weights the share varies by sequence
    width = min(config.prompt_len, decode_tokens.shape[1])
    calibration = torch.cat([prompt[:, :width], decode_tokens[:, :width]])
    routed = args.n_layers - config.start_layer
    below = [b for b in config.budget if b * args.n_layers <= config.start_layer]
    if below:
        raise InputError(f"--budget {below[0]}: the {config.start_layer} of {args.n_layers} blocks below --start_layer "
                         f"always run, so a budget must be above {config.start_layer / args.n_layers:.3f}")
    config.shares = config.shares + [(b * args.n_layers - config.start_layer) / routed for b in config.budget]
    runners = make_runners(model, config.shares, calibration, device, config.clock)
    batched = [b for b in config.decode_batches if b > 1]
    with torch.inference_mode():
        if batched:
            for share in config.shares:
                agreeing = AgreeingRouting(share, args)
                agreeing.thresholds = runners[f"dllm@{share:.2f}"].routing.thresholds
                runners[f"dllm-agree@{share:.2f}"] = DllmRunner(model, agreeing, config.clock)

        best: Dict[str, Dict[str, float]] = {name: {} for name in runners}
        record: Dict[str, dict] = {name: {} for name in runners}
        for _ in range(config.repeats):
            for name, runner in runners.items():
                agree = name.startswith("dllm-agree")
                if not agree:
                    seconds, activation, cache = runner.prefill(prompt, device)
                    keep_best(best[name], "prefill", seconds)
                    record[name]["prefill"] = (activation, CacheBytes.of(cache))
                for b, (dprompt, steps) in decode_inputs.items():
                    if agree and b == 1:
                        continue
                    seconds, activation, cache = runner.decode(dprompt, steps, device)
                    keep_best(best[name], f"decode{b}", seconds)
                    record[name][f"decode{b}"] = (activation, CacheBytes.of(cache))
                    del cache
                    if name == "dense" and 0 < config.rate_prompt_len < config.decode_prompt_len:
                        keep_best(best[name], f"decode{b}_short", runner.decode(dprompt[:, : config.rate_prompt_len],
                                                                               steps, device)[0])

    rows = summarise(config, model, runners, best, record)
    meta = describe(config, model, device)
    print_table(rows, meta, config.decode_batches)
    if config.out:
        atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", config.out)
        print(f"wrote {config.out}")


def summarise(config, model, runners, best, record) -> List[dict]:
    args, sizes = model.params, weight_bytes(model)
    dense, hf = best["dense"], best["transformers"]
    rows = []
    for name, runner in runners.items():
        routing = getattr(runner, "routing", None)
        routed = isinstance(routing, DLLMRouting)
        row = {"config": name}
        if "prefill" in best[name]:
            row.update(prefill_tok_s=config.prompt_len / best[name]["prefill"],
                       prefill_x_dense=dense["prefill"] / best[name]["prefill"],
                       prefill_x_transformers=hf["prefill"] / best[name]["prefill"])
        if routing is not None and "prefill" in record[name]:
            activation, cache = record[name]["prefill"]
            row.update(exec_share_routed=float(activation[..., config.start_layer:].mean()),
                       exec_share_all=float(activation.mean()),
                       flops_ratio=flops_ratio(args, activation, routing=routing),
                       kv_ratio=kv_ratio(activation), kv_bytes=cache.kept,
                       kv_bytes_ratio=cache.kept / record["dense"]["prefill"][1].kept,
                       kv_bytes_allocated=cache.allocated)
            row["prefill_of_ideal"] = row["prefill_x_dense"] * row["flops_ratio"]
        for b in config.decode_batches:
            key = f"decode{b}"
            if key not in best[name]:
                continue
            row[f"{key}_tok_s"] = b * config.decode_steps / best[name][key]
            row[f"{key}_x_dense"] = dense[key] / best[name][key]
            row[f"{key}_x_transformers"] = hf[key] / best[name][key]
            if routing is None:
                continue
            activation, cache = record[name][key]
            steps = activation[:, config.decode_prompt_len:]
            share, ratio = weight_read(steps, sizes, config.start_layer, routed)
            row[f"{key}_exec_share_routed"] = float(steps[..., config.start_layer:].mean())
            row[f"{key}_flops_ratio"] = step_flops_ratio(args, activation, config.decode_prompt_len, routing)
            row[f"{key}_weight_share"] = share
            row[f"{key}_weight_ratio"] = ratio
            row[f"{key}_ideal_x"] = 1 / max(row[f"{key}_flops_ratio"], ratio)
            row[f"{key}_of_ideal"] = row[f"{key}_x_dense"] / row[f"{key}_ideal_x"]
            row[f"{key}_kv_bytes_ratio"] = cache.kept / record["dense"][key][1].kept
            dense_bytes = decode_bytes(torch.ones_like(activation), sizes, config.decode_prompt_len,
                                       cache.pair, False)
            row[f"{key}_bytes_ratio"] = decode_bytes(activation, sizes, config.decode_prompt_len,
                                                     cache.pair, routed) / dense_bytes
            row[f"{key}_bytes_ideal_x"] = 1 / row[f"{key}_bytes_ratio"]
            row[f"{key}_of_bytes_ideal"] = row[f"{key}_x_dense"] / row[f"{key}_bytes_ideal_x"]
            weights, pairs = kept_cache_reads(activation, sizes, config.decode_prompt_len, routed)
            row[f"{key}_kept_cache_ideal_x"] = dense_bytes / (weights + pairs * cache.pair)
            row[f"{key}_of_kept_cache_ideal"] = row[f"{key}_x_dense"] / row[f"{key}_kept_cache_ideal_x"]
            if f"{key}_short" in dense:
                ones = torch.ones_like(activation)
                prices = read_prices(dense[key], dense[f"{key}_short"],
                                     decode_reads(ones, sizes, config.decode_prompt_len, False),
                                     decode_reads(ones[:, config.decode_prompt_len - config.rate_prompt_len :], sizes,
                                                  config.rate_prompt_len, False))
                if prices is not None:
                    row[f"{key}_dense_weight_gb_s"] = 1e-9 / prices[0]
                    row[f"{key}_dense_kv_gb_s"] = cache.pair * 1e-9 / prices[1]
                    row[f"{key}_rate_ideal_x"] = rate_ideal(dense[key], prices,
                                                            decode_reads(activation, sizes, config.decode_prompt_len, routed))
                    row[f"{key}_of_rate_ideal"] = row[f"{key}_x_dense"] / row[f"{key}_rate_ideal_x"]
        rows.append(row)
    return rows


def describe(config: BenchBase, model: Transformer, device) -> dict:
    """The run's settings, command, machine and model, for the results file's header."""
    args = model.params
    return {**run_meta(config, device), "model": config.llama_ckpt_dir or "random weights",
            "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "vocab_size": args.vocab_size,
            "transformers": transformers_version(),
            "reference": "transformers LlamaForCausalLM, sdpa attention, StaticCache"}


def keep_best(store, key, seconds):
    store[key] = min(seconds, store.get(key, float("inf")))


def transformers_version() -> str:
    import transformers
    return transformers.__version__


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run_meta(settings, device) -> dict:
    """What every speed benchmark's results file says of its run: settings, command, machine, and
    the load average (other jobs on the machine) when the table was made."""
    return {"settings": asdict(settings), "command": command(), "device": device_name(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": os.getloadavg()}


def print_table(rows, meta, decode_batches):
    s = meta["settings"]
    print(f"\n{meta['model']}, {meta['device']}, {s['dtype']}, dim {meta['dim']}, {meta['n_layers']} layers, "
          f"prefill {s['prompt_len']} tokens, decode {s['decode_steps']} tokens after {s['decode_prompt_len']}, "
          f"best of {s['repeats']}")
    head = ["config", "exec (routed)", "FLOPs ratio", "KV bytes ratio", "prefill tok/s", "x dense", "x HF", "% ideal"]
    for b in decode_batches:
        head += [f"decode b{b} tok/s", "x dense", "x HF", "weight-read share", "ideal x", "% ideal",
                 "bytes ideal x", "% bytes ideal", "kept-cache ideal x", "% kept-cache ideal", "rate ideal x",
                 "% rate ideal"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))

    def cell(row, key, fmt):
        return fmt.format(row[key]) if key in row else "-"
    for r in rows:
        cells = [r["config"], cell(r, "exec_share_routed", "{:.3f}"), cell(r, "flops_ratio", "{:.3f}"),
                 cell(r, "kv_bytes_ratio", "{:.3f}"), cell(r, "prefill_tok_s", "{:.1f}"),
                 cell(r, "prefill_x_dense", "{:.2f}"), cell(r, "prefill_x_transformers", "{:.2f}"),
                 cell(r, "prefill_of_ideal", "{:.0%}")]
        for b in decode_batches:
            cells += [cell(r, f"decode{b}_tok_s", "{:.1f}"), cell(r, f"decode{b}_x_dense", "{:.2f}"),
                      cell(r, f"decode{b}_x_transformers", "{:.2f}"), cell(r, f"decode{b}_weight_share", "{:.3f}"),
                      cell(r, f"decode{b}_ideal_x", "{:.2f}"), cell(r, f"decode{b}_of_ideal", "{:.0%}"),
                      cell(r, f"decode{b}_bytes_ideal_x", "{:.2f}"), cell(r, f"decode{b}_of_bytes_ideal", "{:.0%}"),
                      cell(r, f"decode{b}_kept_cache_ideal_x", "{:.2f}"),
                      cell(r, f"decode{b}_of_kept_cache_ideal", "{:.0%}"),
                      cell(r, f"decode{b}_rate_ideal_x", "{:.2f}"), cell(r, f"decode{b}_of_rate_ideal", "{:.0%}")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    run_cli(main, BenchConfig.parse(description=__doc__))
