"""What an adapted model keeps of its dense base, and where its compute goes.

A compute-reduction method should keep the base's behaviour, so quality is measured against the
base on held-out prompts, not against reference text (CE against the base's own answers rewards a
model that grows sharper than the base):
- teacher forced on each record's response: KL(base || model) per response token (the primary
  number), top-1 agreement (the model's argmax is the base's) and, beside them, CE;
- in generation: each model's greedy answer compared with the base's greedy answer: exact match,
  the first ten words, and ROUGE-L F1 (Google's `rouge-score`).
Compute is counted where a user pays for it: execution share and FLOPs ratio over the prompt's
tokens and over the response's (teacher forced), and in real generation over the prefill and over
the decode steps, each against the dense model on the same tokens; prefill and decode speed are
timed while the answers are generated (batch 1, so a step is one request's prefill or one token).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tqdm import tqdm

from dllm.core import flops
from dllm.data import Record
from dllm.generation import Llama
from dllm.scoring import encode_pair, teacher_forced as score
from dllm.timing import StepTimer

FIRST_WORDS = 10


@dataclass
class Sums:
    """Sums that add over batches; `summary` turns them into the reported means and ratios."""

    kl: float = 0.0
    top1: float = 0.0
    ce: float = 0.0
    response_tokens: float = 0.0
    prompt_tokens: float = 0.0
    executed_prompt: float = 0.0  # executed (token, block) pairs
    executed_response: float = 0.0
    flops_prompt: float = 0.0
    flops_prompt_dense: float = 0.0
    flops_response: float = 0.0
    flops_response_dense: float = 0.0
    answers: float = 0.0
    exact: float = 0.0
    first_words: float = 0.0
    rouge_l: float = 0.0
    prefill_tokens: float = 0.0
    decode_tokens: float = 0.0
    executed_prefill: float = 0.0
    executed_decode: float = 0.0
    flops_prefill: float = 0.0
    flops_prefill_dense: float = 0.0
    flops_decode: float = 0.0
    flops_decode_dense: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: float = 0.0
    base_prefill_seconds: float = 0.0
    base_decode_seconds: float = 0.0
    base_decode_steps: float = 0.0


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def summary(s: Sums, n_layers: int) -> Dict[str, float]:
    return {
        "kl": _ratio(s.kl, s.response_tokens),
        "top1_agreement": _ratio(s.top1, s.response_tokens),
        "ce": _ratio(s.ce, s.response_tokens),
        "gen_exact": _ratio(s.exact, s.answers),
        "gen_first_words": _ratio(s.first_words, s.answers),
        "gen_rouge_l": _ratio(s.rouge_l, s.answers),
        "share_prompt": _ratio(s.executed_prompt, s.prompt_tokens * n_layers),
        "share_response": _ratio(s.executed_response, s.response_tokens * n_layers),
        "flops_prompt": _ratio(s.flops_prompt, s.flops_prompt_dense),
        "flops_response": _ratio(s.flops_response, s.flops_response_dense),
        "flops_all": _ratio(s.flops_prompt + s.flops_response, s.flops_prompt_dense + s.flops_response_dense),
        "share_prefill": _ratio(s.executed_prefill, s.prefill_tokens * n_layers),
        "share_decode": _ratio(s.executed_decode, s.decode_tokens * n_layers),
        "flops_prefill": _ratio(s.flops_prefill, s.flops_prefill_dense),
        "flops_decode": _ratio(s.flops_decode, s.flops_decode_dense),
        "flops_generation": _ratio(s.flops_prefill + s.flops_decode, s.flops_prefill_dense + s.flops_decode_dense),
        "prefill_speedup": _ratio(s.base_prefill_seconds, s.prefill_seconds),
        "decode_speedup": _ratio(s.base_decode_seconds / max(s.base_decode_steps, 1),
                                 s.decode_seconds / max(s.decode_steps, 1)),
        "prefill_tokens_per_s": _ratio(s.prefill_tokens, s.prefill_seconds),
        "decode_tokens_per_s": _ratio(s.decode_steps, s.decode_seconds),
        "answers": s.answers,
        "response_tokens": s.response_tokens,
    }


def _add_flops(sums: Sums, name: str, model, activation, token_mask, counted):
    args, routing = model.params, model.routing
    setattr(sums, name, getattr(sums, name) + flops.forward_flops(args, activation, token_mask, routing, counted))
    dense = flops.forward_flops(args, torch.ones_like(activation), token_mask, counted=counted)
    setattr(sums, name + "_dense", getattr(sums, name + "_dense") + dense)


@torch.inference_mode()
def teacher_forced(model, base, tokenizer, records: List[Record], sums: Sums, batch_size: int, desc: str = "score"):
    """KL(base || model), top-1 agreement and CE on every response token after its prompt (eos
    included, scored as evaluate.py scores it: dllm/scoring.py), and the compute of prompt and
    response tokens."""
    max_seq_len = model.params.max_seq_len
    for at in tqdm(range(0, len(records), batch_size), desc=desc, leave=False):
        pairs = [encode_pair(tokenizer, r.prompt, r.response, eos=True) for r in records[at : at + batch_size]]
        scored, base_scored = score(model, pairs, max_seq_len), score(base, pairs, max_seq_len)
        tokens, real, response = scored.tokens, scored.token_mask, scored.scored
        logits, activation, base_logits = scored.logits, scored.activation, base_scored.logits
        predicts = scored.targets  # positions whose next token is a response token
        logp, base_logp = F.log_softmax(logits[:, :-1], -1), F.log_softmax(base_logits[:, :-1], -1)
        kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
        ce = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        top1 = (logits[:, :-1].argmax(-1) == base_logits[:, :-1].argmax(-1)).float()
        sums.kl += (kl * predicts).sum().item()
        sums.ce += (ce * predicts).sum().item()
        sums.top1 += (top1 * predicts).sum().item()
        prompt = real - response
        sums.response_tokens += response.sum().item()
        sums.prompt_tokens += prompt.sum().item()
        executed = (activation > 0.5).float()
        sums.executed_prompt += (executed * prompt[..., None]).sum().item()
        sums.executed_response += (executed * response[..., None]).sum().item()
        _add_flops(sums, "flops_prompt", model, activation, real, prompt)
        _add_flops(sums, "flops_response", model, activation, real, response)


def timed_answer(generator: Llama, prompt: List[int], max_gen_len: int, stop_ids) -> tuple:
    """(answer text, prefill seconds, decode seconds, decode steps, the call's routing record)."""
    with StepTimer(generator.model) as timer:
        generation = generator.generate([prompt], max_gen_len, temperature=0.0, actprobs=False, stop_ids=stop_ids)
    return generator.tokenizer.decode(generation.tokens[0]), timer.steps[0], sum(timer.steps[1:]), \
        len(timer.steps) - 1, generation.routing


def first_words(text: str) -> List[str]:
    return text.split()[:FIRST_WORDS]


def generation(generator: Llama, base: Llama, records: List[Record], sums: Sums, max_gen_len: int, stop_ids,
               answers: Optional[list] = None, desc: str = "generate"):
    """Greedy answers of both models, batch 1, compared; the model's generation compute and both
    models' prefill and decode time. `answers` collects (prompt, base answer, model answer)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    max_seq_len = generator.model.params.max_seq_len
    for record in tqdm(records, desc=desc, leave=False):
        prompt = generator.tokenizer.encode(record.prompt, bos=True, eos=False)[-(max_seq_len - 1):]
        text, prefill, decode, steps, stats = timed_answer(generator, prompt, max_gen_len, stop_ids)
        base_text, base_prefill, base_decode, base_steps, _ = timed_answer(base, prompt, max_gen_len, stop_ids)
        sums.answers += 1
        exact = text.strip() == base_text.strip()
        sums.exact += exact
        sums.first_words += first_words(text) == first_words(base_text)
        # rouge-score drops what is not a word, so two equal answers of symbols would score 0
        sums.rouge_l += 1.0 if exact else scorer.score(base_text, text)["rougeL"].fmeasure
        sums.prefill_seconds += prefill
        sums.decode_seconds += decode
        sums.decode_steps += steps
        sums.base_prefill_seconds += base_prefill
        sums.base_decode_seconds += base_decode
        sums.base_decode_steps += base_steps
        length, n_prompt = stats.lengths[0], stats.prompt_lengths[0]
        activation = stats.activation[:, :length]
        prefill_mask = (torch.arange(length) < n_prompt).float()[None]
        decode_mask = 1 - prefill_mask
        executed = (activation > 0.5).float()
        sums.prefill_tokens += n_prompt
        sums.decode_tokens += length - n_prompt
        sums.executed_prefill += (executed * prefill_mask[..., None]).sum().item()
        sums.executed_decode += (executed * decode_mask[..., None]).sum().item()
        _add_flops(sums, "flops_prefill", generator.model, activation, None, prefill_mask)
        _add_flops(sums, "flops_decode", generator.model, activation, None, decode_mask)
        if answers is not None:
            answers.append({"prompt": record.prompt, "base": base_text, "model": text})

