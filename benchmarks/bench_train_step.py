"""One fine-tuning step (forward, backward, AdamW) of dllm against transformers + PEFT, in one run.

Four configurations on the same base, batch, LoRA rank, target modules (q/k/v) and dropout:
transformers' LlamaForCausalLM with a PEFT LoRA (what a user would run instead), dllm with LoRA only
(`--routing dense`) and dllm with D-LLM routing (routers and the rate loss), twice: with the
reference's initial routers (their bias executes about 82% of the routed blocks: the first steps of
a run) and with routers that execute `execute_share` of them (the rest of a run, once the rate loss
holds the target). Only the tokens that execute a block are differentiated through it, so D-LLM's
step costs less as the share falls. Random tokens, the last
`response_share` of each row scored (the response), no padding. Configurations are interleaved
within every repeat after `warmup` untimed steps each, and the best of `repeats` is kept, so machine
noise hits all alike. Peak memory is measured apart, in a fresh process per configuration (the
timing process holds all three models), over warm-up and one step with the model loaded: peak RSS
on the CPU, torch.cuda.max_memory_allocated on CUDA.

    python -m benchmarks.bench_train_step --out benchmarks/results/bench_train_step_cpu   # the CPU table
    python -m benchmarks.bench_train_step --out benchmarks/results/bench_train_step_gpu   # on a GPU (bf16 base)

`--out PREFIX` writes PREFIX.json and PREFIX.md; `--profile` prints each step's torch.profiler table.
Needs requirements-bench.txt (peft).
"""
import gc
import json
import math
import multiprocessing
import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from benchmarks import command
from benchmarks.bench_skip import device_name, keep_best, transformers_version
from dllm.core.objective import compute_loss
from dllm import distributed
from dllm.checkpoints import base_model, model_params
from dllm.atomic_io import atomic_write_text
from dllm.config import Settings, setting
from dllm.errors import run_cli
from dllm.core.flops import token_flops
from dllm.core.model import AdapterArgs, ModelArgs
from dllm.core.routing import mlp_flops
from dllm.timing import synchronize, timed
from dllm.training.loop import param_groups

CONFIGS = ("transformers+peft", "dllm lora", "dllm d-llm", "dllm d-llm at share")


@dataclass
class TrainStepConfig(Settings):
    llama_ckpt_dir: str = setting("models/smollm2", "the base, Hugging Face layout (transformers loads it too)")
    batch_size: int = setting(4, "rows per step", low=1)
    seq_len: int = setting(256, "tokens per row", low=2)
    response_share: float = setting(0.5, "share of each row scored (the response)", low=0, high=1, low_open=True)
    lora_rank: int = setting(8, "LoRA rank on q/k/v", low=1)
    lora_dropout: float = setting(0.05, "LoRA input dropout", low=0, high=1)
    lambda_active: float = setting(5.0, "weight of D-LLM's rate loss", low=0)
    execute_share: float = setting(0.5, "share of the routed blocks the routers of 'dllm d-llm at share' execute "
                                   "(a trained adapter's: the paper's target)", low=0, high=1, low_open=True)
    dynamic_router_hdim: int = setting(AdapterArgs.dynamic_router_hdim, "hidden width of D-LLM's routers (the "
                                       "paper's default; the SmolLM2 preset uses 128)", low=1)
    warmup: int = setting(2, "untimed steps per configuration before timing", low=0)
    repeats: int = setting(4, "interleaved timed steps; the best is kept", low=1)
    dtype: str = setting("auto", "base weights dtype (auto: bf16 on CUDA, fp32 on the CPU, as finetuning.py)",
                         choices=("auto", "float32", "bfloat16"))
    seed: int = setting(0, "random seed")
    threads: int = setting(0, "torch threads (0: torch's default)", low=0)
    memory: bool = setting(True, "measure each configuration's peak memory in a fresh process")
    profile: bool = setting(False, "print each configuration's torch.profiler table of one step")
    out: Optional[str] = setting(None, "write PREFIX.json and PREFIX.md (default: print only)")


def base_dtype(config: TrainStepConfig, device) -> torch.dtype:
    return distributed.base_dtype(device) if config.dtype == "auto" else getattr(torch, config.dtype)


def make_batch(config: TrainStepConfig, vocab_size: int, device):
    """(tokens [b, s], response mask [b, s]): the same for every configuration."""
    generator = torch.Generator().manual_seed(config.seed)
    tokens = torch.randint(0, vocab_size, (config.batch_size, config.seq_len), generator=generator)
    response = torch.zeros_like(tokens, dtype=torch.bool)
    response[:, config.seq_len - max(1, round(config.response_share * config.seq_len)):] = True
    return tokens.to(device), response.to(device)


class DllmStep:
    """dllm's training step as dllm/training/loop.py takes it: compute_loss, c_loss + lambda * a_loss."""

    def __init__(self, config: TrainStepConfig, routing: str, device, execute_share: Optional[float] = None):
        args = model_params.load_params(config.llama_ckpt_dir, lora_rank=config.lora_rank,
                                      lora_dropout=config.lora_dropout, routing=routing,
                                      dynamic_router_hdim=config.dynamic_router_hdim,
                                      max_seq_len=config.seq_len, max_batch_size=config.batch_size)
        torch.manual_seed(config.seed)
        self.model = base_model.build_model(args, config.llama_ckpt_dir, None, device, base_dtype(config, device))
        if execute_share is not None:
            route_at_share(self.model, execute_share)
        self.model.set_adapter_trainable(True)
        self.model.train()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.02, 1.0), lr=1e-4, betas=(0.9, 0.95))
        self.lam = self.model.routing.aux_weight(1.0, config.lambda_active, 1.0)
        tokens, response = make_batch(config, args.vocab_size, device)
        self.batch = (tokens, tokens, torch.ones_like(response), response)
        self.shares = []  # the executed share of all blocks at each step

    def __call__(self) -> torch.Tensor:
        c_loss, a_loss, metrics = compute_loss(self.model, *self.batch)
        self.shares.append(float(metrics["act_ratio"]))
        loss = c_loss + self.lam * a_loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return c_loss.detach()


class PeftStep:
    """transformers' Llama with a PEFT LoRA on q/k/v (scale alpha / r = 1, as dllm's lora_scale)."""

    def __init__(self, config: TrainStepConfig, device):
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(config.llama_ckpt_dir, dtype=base_dtype(config, device),
                                              attn_implementation="sdpa").to(device)
        torch.manual_seed(config.seed)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, lora_dropout=config.lora_dropout,
                          target_modules=["q_proj", "k_proj", "v_proj"], bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(hf, lora).train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
        tokens, response = make_batch(config, hf.config.vocab_size, device)
        self.inputs = dict(input_ids=tokens, labels=tokens.masked_fill(~response, -100))

    def __call__(self) -> torch.Tensor:
        loss = self.model(**self.inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def route_at_share(model, share: float):
    """Routers that execute `share` of the tokens, as the routers of an adapter trained to that
    target do: the second layer's weight zeroed and its bias at the share's log-odds, so the Gumbel
    noise decides each token (the reference's initial routers, a run's first steps, execute about 82%)."""
    with torch.no_grad():
        for layer in model.layers:
            if layer.router is not None:
                layer.router.linear_2.weight.zero_()
                layer.router.linear_2.bias.copy_(torch.tensor([0.0, math.log(share / (1 - share))]) if share < 1
                                                 else torch.tensor([-1e4, 1e4]))


def step_flops(args: ModelArgs, config: TrainStepConfig, name: str, share: float = 1.0) -> float:
    """Model FLOPs of one step per token: a frozen weight's matmul costs its forward twice (forward
    and the input's gradient), a trained one (LoRA, routers) three times (and the weight's
    gradient), attention three times. The head runs at every position under transformers, only at
    the scored ones under dllm. D-LLM adds a router at every routed block, and at a routed block
    executing `p` of its tokens differentiates the projections for those tokens only, attention
    over the pairs among them (p squared) and reads p of the keys in the forward; `share` is the
    executed share of all blocks, the always-on ones among them."""
    f = token_flops(args)
    attention = f.attn_per_key * (config.seq_len + 1) / 2  # keys seen, on average over the positions
    lora = 2 * config.lora_rank * (3 * args.dim + (args.n_heads + 2 * (args.n_kv_heads or args.n_heads)) * args.head_dim)

    def block(p: float) -> float:
        return (f.qkvo + f.ffn + lora + p * attention) + (p * (f.qkvo + f.ffn) + 2 * lora + 2 * p * p * attention)

    routed = args.n_layers - args.dynamic_start_layer if name.startswith("dllm d-llm") else 0
    p_routed = (share * args.n_layers - (args.n_layers - routed)) / routed if routed else 1.0
    total = (args.n_layers - routed) * block(1.0) + routed * block(p_routed)
    scored = max(1, round(config.response_share * config.seq_len)) / config.seq_len
    total += 2 * f.lm_head * (1.0 if name == "transformers+peft" else scored)
    if routed:
        total += routed * 3 * mlp_flops(args.dim, args.dynamic_router_hdim, 2)
    return total


def build_step(config: TrainStepConfig, name: str, device):
    if name == "transformers+peft":
        return PeftStep(config, device)
    if name == "dllm lora":
        return DllmStep(config, "dense", device)
    return DllmStep(config, "dllm", device, config.execute_share if name == "dllm d-llm at share" else None)


def peak_memory(config: TrainStepConfig, name: str) -> float:
    """Bytes at the peak of warm-up plus one step, alone in this process, the model loaded: RSS
    (Linux: its high-water mark reset after loading, so loading's copies do not count), or CUDA
    allocated."""
    device = distributed.setup()
    if config.threads:
        torch.set_num_threads(config.threads)
    step = build_step(config, name, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current RSS
    for _ in range(config.warmup + 1):
        step()
    synchronize(device)
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return peak_rss()


def peak_rss() -> float:
    """This process's peak resident bytes: Linux's VmHWM (ru_maxrss cannot be reset, and carries
    the spawning parent's peak over the exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return float(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) * 1024
    except OSError:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_memory_apart(config: TrainStepConfig, name: str) -> float:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_memory, (config, name))


def print_profile(name: str, step, device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{name}: one step, by self time")
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


def main(config: TrainStepConfig):
    device = distributed.setup()
    if config.threads:
        torch.set_num_threads(config.threads)
    load_before = os.getloadavg()
    peaks = {name: peak_memory_apart(config, name) for name in CONFIGS} if config.memory else {}
    steps = {name: build_step(config, name, device) for name in CONFIGS}
    first_loss = {name: float(step()) for name, step in steps.items()}  # zero-initialised B: the base's CE
    for step in steps.values():
        for _ in range(max(config.warmup - 1, 0)):
            step()
    best, best_cpu, times = {}, {}, {name: [] for name in CONFIGS}
    for _ in range(config.repeats):
        for name, step in steps.items():
            cpu_start = time.process_time()
            seconds, _ = timed(step, device)
            times[name].append(seconds)
            keep_best(best, name, seconds)
            keep_best(best_cpu, name, time.process_time() - cpu_start)
    args = steps["dllm d-llm"].model.params
    shares = {name: sum(step.shares) / len(step.shares) if isinstance(step, DllmStep) else 1.0
              for name, step in steps.items()}
    flops = {name: step_flops(args, config, name, shares[name]) for name in CONFIGS}
    if config.profile:
        for name, step in steps.items():
            print_profile(name, step, device)
    tokens = config.batch_size * config.seq_len
    rows = [{"config": name, "step_s": best[name], "tokens_per_s": tokens / best[name],
             "x_peft": best["transformers+peft"] / best[name], "x_lora": best["dllm lora"] / best[name],
             "cpu_s": best_cpu[name], "cpu_x_peft": best_cpu["transformers+peft"] / best_cpu[name],
             "cpu_x_lora": best_cpu["dllm lora"] / best_cpu[name], "executed_share": shares[name],
             "step_flops_per_token": flops[name], "flops_x_lora": flops[name] / flops["dllm lora"],
             "peak_memory_bytes": peaks.get(name), "first_loss": first_loss[name], "times_s": times[name]}
            for name in CONFIGS]
    import peft
    meta = {"command": command(),
            "settings": asdict(config), "device": device_name(device),
            "dtype": str(base_dtype(config, device)).replace("torch.", ""),
            "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS",
            "load_average_1min": [load_before[0], os.getloadavg()[0]],  # at the start and at the end
            "torch": torch.__version__, "transformers": transformers_version(), "peft": peft.__version__}
    table = markdown(rows, meta)
    print("\n" + table)
    if config.out:
        atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", config.out + ".json")
        atomic_write_text(table, config.out + ".md")
        print(f"wrote {config.out}.json and {config.out}.md")


def markdown(rows, meta) -> str:
    s = meta["settings"]
    lines = [f"### One training step on {s['llama_ckpt_dir']}: {meta['device']}, {meta['dtype']}", "",
             f"`{meta['command']}`", "",
             f"batch {s['batch_size']} x {s['seq_len']}, response share {s['response_share']}, LoRA rank "
             f"{s['lora_rank']} on q/k/v, dropout {s['lora_dropout']}; forward, backward and AdamW, best of "
             f"{s['repeats']} interleaved after {s['warmup']} warm-up steps; torch {meta['torch']}, transformers "
             f"{meta['transformers']}, peft {meta['peft']}; load average (1 min) {meta['load_average_1min'][0]:.1f} at "
             f"the start, {meta['load_average_1min'][1]:.1f} at the end", "",
             "Wall time, and the process's CPU time (all threads; what a step costs when others share the cores). "
             "x PEFT and x LoRA-only are speed-ups: the other's time over this one's.", "",
             f"| config | executed | step (s) | tokens/s | x PEFT | x LoRA-only | CPU s | CPU x PEFT | CPU x LoRA-only | "
             f"step FLOPs / LoRA-only's | {meta['peak_memory']} (GB) | first CE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 1e9:.2f}"
        lines.append(f"| {r['config']} | {r['executed_share']:.3f} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['x_peft']:.3f} | "
                     f"{r['x_lora']:.3f} | {r['cpu_s']:.3f} | {r['cpu_x_peft']:.3f} | {r['cpu_x_lora']:.3f} | "
                     f"{r['flops_x_lora']:.3f} | {memory} | {r['first_loss']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main, TrainStepConfig.parse(description=__doc__))
