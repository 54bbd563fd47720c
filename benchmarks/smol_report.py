r"""SmolLM2 with D-LLM against the dense model and a dense LoRA fine-tune, on the held-out smol split,
measured in one run on one machine.

    python -m benchmarks.smol_report --llama_ckpt_dir models/smollm2 \
        --runs "dense=;lora=output/smollm2-lora/checkpoint-last.pth:dense;dllm=assets/smollm2-dllm/checkpoint.pth"

`--runs` is `label=adapter[:dense]` separated by `;` (an empty adapter is the base model; `:dense`
loads the adapter's LoRA with every block executed, for a LoRA-only fine-tune). Per run: held-out
CE and perplexity against the dense model's answers, top-1 agreement with them (teacher forced),
greedy generations compared with them token by token, the execution, FLOPs and KV ratios from the
routing that happened, per-token adaptivity (blocks executed per token, by kind of token), and
prefill and batch-1 decode speed on real prompts (best of `repeats`, runs interleaved).
"""
import json
import math
import os
import statistics
from dataclasses import dataclass

import torch

from dllm.atomic_io import atomic_write_text
from dllm.chat import ChatFormat
from dllm.config import Settings, setting
from dllm.data import load_records
from dllm.errors import run_cli
from dllm.evaluate import Evaluator
from dllm.generation import Llama
from dllm.core.routing import DenseRouting
from dllm.timing import timed


def parse_runs(runs: str):
    out = []
    for item in runs.split(";"):
        label, _, spec = item.partition("=")
        adapter, _, mode = spec.partition(":")
        out.append((label.strip(), adapter.strip() or None, mode.strip() == "dense"))
    return out


def build(llama_ckpt_dir, adapter, dense, max_seq_len, batch_size):
    generator = Llama.build(llama_ckpt_dir, adapter, max_seq_len=max_seq_len, max_batch_size=batch_size,
                            model_parallel_size=1)
    if dense:
        generator.model.use_routing(DenseRouting())
    return generator


def token_kind(text: str, special: bool) -> str:
    if special:
        return "template/special"
    stripped = text.strip()
    if not stripped:
        return "whitespace"
    if stripped.isdigit():
        return "digit"
    if all(not c.isalnum() for c in stripped):
        return "punctuation"
    if text[0] in " \n\t" or text[0] == "Ġ" or text[0] == "Ċ":
        return "word start"
    return "word continuation"


def executed_blocks(generator, stats, rows_tokens, counts, per_kind):
    """Append each token's executed-block count (prompt and answer) to counts[row] and to its kind."""
    tok = generator.tokenizer
    for row, tokens in enumerate(rows_tokens):
        executed = stats.activation[row, : stats.lengths[row]].sum(-1).tolist()
        counts.append(executed)
        for token, n in zip(tokens, executed):
            per_kind.setdefault(token_kind(tok.decode([token]), token in tok.special_ids), []).append(n)


def adaptivity(counts, per_kind):
    """Blocks executed per token: mean over all tokens, spread within a sequence (averaged over
    sequences), and the mean by kind of token."""
    every = [n for sequence in counts for n in sequence]
    return {"blocks_per_token_mean": statistics.mean(every),
            "blocks_per_token_std_within_sequence": statistics.mean(statistics.pstdev(c) for c in counts if len(c) > 1),
            "by_kind": {k: {"mean": statistics.mean(v), "n": len(v)} for k, v in sorted(per_kind.items())}}


@torch.inference_mode()
def generations(generator, records, chat, n, max_gen_len, batch_size):
    """Greedy answers to the first n test prompts, the routing they ran with, and token agreement
    with the reference (the dense model's) answers."""
    tok = generator.tokenizer
    prompts = [tok.encode(r.prompt, bos=True, eos=False) for r in records[:n]]
    outputs, shares, prefix, exact, counts, per_kind = [], [], [], 0, [], {}
    for start in range(0, n, batch_size):
        batch = prompts[start : start + batch_size]
        tokens, _, _, stats = generator.generate(batch, max_gen_len, temperature=0.0, actprobs=False,
                                                 stop_ids=chat.stop_ids)
        executed_blocks(generator, stats, [p + t for p, t in zip(batch, tokens)], counts, per_kind)
        for i, out in enumerate(tokens):
            reference = tok.encode(records[start + i].response, bos=False, eos=False)
            same = 0
            while same < min(len(out), len(reference)) and out[same] == reference[same]:
                same += 1
            prefix.append(same / max(1, len(reference)))
            exact += out == reference
            outputs.append(tok.decode(out))
            shares.append(stats.exec_share(i))
    return outputs, shares, {"greedy_prefix_agreement": statistics.mean(prefix), "greedy_exact": exact / n,
                             "adaptivity": adaptivity(counts, per_kind)}


def speed_prompts(generator, records, prefill_len, decode_prompt_len):
    """Real text: held-out prompts and answers joined to the lengths wanted."""
    ids = []
    for r in records:
        ids += generator.tokenizer.encode(r.prompt + r.response, bos=True, eos=True)
        if len(ids) >= prefill_len:
            break
    return torch.tensor([ids[:prefill_len]]), torch.tensor([ids[:decode_prompt_len]])


@torch.inference_mode()
def time_prefill(model, tokens):
    device = model.tok_embeddings.weight.device
    tokens = tokens.to(device)
    return timed(lambda: model(tokens, 0, model.new_cache(1)), device)[0]


@torch.inference_mode()
def time_decode(model, prompt, steps):
    """Greedy decoding, one token a step, after the prompt's prefill (not timed)."""
    device = model.tok_embeddings.weight.device
    prompt = prompt.to(device)
    cache = model.new_cache(1)
    logits, _ = model(prompt, 0, cache)
    first = logits[:, -1].argmax(-1, keepdim=True)

    def decode():
        token = first
        for i in range(steps):
            logits, _ = model(token, prompt.shape[1] + i, cache)
            token = logits[:, -1].argmax(-1, keepdim=True)

    return timed(decode, device)[0]


def instructions(dataset_path, dataset, n):
    with open(os.path.join(dataset_path, dataset, "test.json")) as f:
        return [f"{r['instruction']}\n\n{r['input']}".strip() for r in json.load(f)[:n]]


@dataclass
class ReportConfig(Settings):
    llama_ckpt_dir: str = setting("models/smollm2", "base model directory (tools/convert_checkpoint.py writes it)")
    runs: str = setting("dense=", "label=adapter[:dense] separated by ';' (the first run is the speed reference)")
    dataset_path: str = setting("datasets", "directory of the datasets")
    dataset: str = setting("smol", "dataset whose test split is measured")
    n_generate: int = setting(48, "test prompts answered greedily", low=1)
    max_gen_len: int = setting(96, "most tokens per greedy answer", low=1)
    batch_size: int = setting(16, "prompts per forward pass", low=1)
    max_seq_len: int = setting(512, "longest prompt plus answer", low=1)
    prefill_len: int = setting(512, "tokens of the timed prefill (batch 1)", low=1)
    decode_prompt_len: int = setting(64, "prompt tokens before the timed decode steps", low=1)
    decode_steps: int = setting(32, "timed single-token decode steps (batch 1)", low=1)
    repeats: int = setting(3, "timings per run, interleaved; the best kept", low=1)
    n_examples: int = setting(3, "answers kept as examples per run", low=0)
    out: str = setting("benchmarks/results/smol_report.json", "JSON written at the end")


def main(config: ReportConfig):
    llama_ckpt_dir, dataset_path, dataset, batch_size = config.llama_ckpt_dir, config.dataset_path, config.dataset, config.batch_size
    n_generate, max_gen_len, max_seq_len = config.n_generate, config.max_gen_len, config.max_seq_len
    prefill_len, decode_prompt_len, decode_steps = config.prefill_len, config.decode_prompt_len, config.decode_steps
    repeats, n_examples, out = config.repeats, config.n_examples, config.out
    results, generators = {}, {}
    for label, adapter, dense in parse_runs(config.runs):
        generator = build(llama_ckpt_dir, adapter, dense, max_seq_len, batch_size)
        chat = ChatFormat(generator.tokenizer)
        records = load_records(dataset_path, dataset, "test", chat)
        evaluator = Evaluator(generator, batch_size, max_gen_len, 0, dataset_path)
        ppl, top1 = evaluator.perplexity(dataset, records)
        outputs, shares, agreement = generations(generator, records, chat, n_generate, max_gen_len, batch_size)
        routing = "dense" if dense or adapter is None else generator.model.params.routing
        results[label] = {"adapter": adapter, "routing": routing,
                          "exec_ratio": ppl.kv_ratio, "flops_ratio": ppl.flops_ratio, "kv_ratio": ppl.kv_ratio,
                          "val_ce": math.log(ppl.value), "val_ppl": ppl.value, "top1_agreement": top1.value,
                          "n_tokens": ppl.n, **agreement, "examples": [
                              {"instruction": text, "answer": outputs[i], "exec_share": shares[i]}
                              for i, text in enumerate(instructions(dataset_path, dataset, n_examples))]}
        generators[label] = generator
        print(f"{label}: {json.dumps({k: v for k, v in results[label].items() if k != 'examples'})}")

    any_generator = next(iter(generators.values()))
    chat = ChatFormat(any_generator.tokenizer)
    records = load_records(dataset_path, dataset, "test", chat)
    prefill_tokens, decode_prompt = speed_prompts(any_generator, records, prefill_len, decode_prompt_len)
    best = {label: {"prefill": math.inf, "decode": math.inf} for label in generators}
    for _ in range(repeats):
        for label, generator in generators.items():
            best[label]["prefill"] = min(best[label]["prefill"], time_prefill(generator.model, prefill_tokens))
            best[label]["decode"] = min(best[label]["decode"], time_decode(generator.model, decode_prompt, decode_steps))
    dense_label = next(iter(generators))
    for label in generators:
        r = results[label]
        r["prefill_tok_s"] = prefill_len / best[label]["prefill"]
        r["decode_tok_s"] = decode_steps / best[label]["decode"]
        r["prefill_speedup"] = best[dense_label]["prefill"] / best[label]["prefill"]
        r["decode_speedup"] = best[dense_label]["decode"] / best[label]["decode"]

    meta = {"llama_ckpt_dir": llama_ckpt_dir, "dataset": dataset, "n_generate": n_generate, "max_gen_len": max_gen_len,
            "prefill_len": prefill_len, "decode_prompt_len": decode_prompt_len, "decode_steps": decode_steps,
            "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "speed_reference": dense_label}
    print(markdown(results))
    atomic_write_text(json.dumps({"meta": meta, "runs": results}, indent=2, ensure_ascii=False) + "\n", out)
    print(f"wrote {out}")


def markdown(results) -> str:
    head = ["run", "exec ratio", "FLOPs ratio", "KV ratio", "val CE", "val ppl", "top-1 agreement",
            "greedy prefix agreement", "greedy exact", "prefill tok/s", "prefill x", "decode b1 tok/s", "decode x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        lines.append("| " + " | ".join([
            label, f"{r['exec_ratio']:.3f}", f"{r['flops_ratio']:.3f}", f"{r['kv_ratio']:.3f}", f"{r['val_ce']:.3f}",
            f"{r['val_ppl']:.2f}", f"{100 * r['top1_agreement']:.1f}%", f"{100 * r['greedy_prefix_agreement']:.1f}%",
            f"{100 * r['greedy_exact']:.1f}%", f"{r['prefill_tok_s']:.1f}", f"{r['prefill_speedup']:.2f}",
            f"{r['decode_tok_s']:.1f}", f"{r['decode_speedup']:.2f}"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main, ReportConfig.parse(description=__doc__))
