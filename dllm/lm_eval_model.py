"""The lm-evaluation-harness model `dllm`: the harness's requests on the real-skipping path (eval
mode forwards and `Llama.generate`), batched, with the FLOPs and KV ratios they cost.

    python -m tools.run_lm_eval --model dllm \
        --model_args llama_ckpt_dir=assets/tiny-llama2,adapter=assets/tiny-dllm/checkpoint.pth,execute_threshold=0.5 \
        --tasks TASK --batch_size 8

lm-eval is an optional extra (`pip install -r requirements-lm-eval.txt`). The harness has no plugin
hook for models, so it knows `dllm` only once this module is imported; tools/run_lm_eval.py does
that and then runs the harness's own command line.

Scoring is evaluate.py's (dllm/scoring.py, its truncation rule): the context with bos, the
continuation's tokens as the ones that follow the context's tokens in the encoding of context +
continuation, teacher forced in one right-padded forward (evaluate.py also scores an eos after the
continuation; the harness asks for the continuation alone). The measured ratios, per request type,
are logged after each call and written into the harness's results under config.dllm_routing.
"""
import logging
from typing import Dict, List, Optional, Tuple, Union

import torch.distributed as dist
import lm_eval.models  # noqa: F401 -- the harness's own models first: it loads them only into an empty registry
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from dllm.errors import InputError
from dllm.evaluate import Tally
from dllm.generation import Llama
from dllm.scoring import Pair, encode_pair, teacher_forced

logger = logging.getLogger("lm_eval.dllm")  # in the harness's log, which shows lm_eval.* only

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


@register_model("dllm")
class DLLMHarnessModel(LM):
    def __init__(self, llama_ckpt_dir: Optional[str] = None, adapter: Optional[str] = None, dense: bool = False,
                 execute_threshold: Optional[float] = None, tokenizer: Optional[str] = None,
                 max_seq_len: int = 512, batch_size: Union[int, str] = 8, max_gen_toks: int = 256,
                 seed: int = 1, device: Optional[str] = None, max_batch_size: Optional[int] = None,
                 budget: Optional[float] = None, base: Optional[str] = None):
        """`llama_ckpt_dir` (`base` is an older name for it), `adapter` and `budget` as for Llama.build
        (`dense` ignores the adapter). `device` and `max_batch_size` come from the harness's flags and
        are not used: dllm computes on CUDA when there is one, else the CPU, in batches of `batch_size`."""
        llama_ckpt_dir = llama_ckpt_dir or base
        if not llama_ckpt_dir:
            raise InputError("the dllm harness model needs its base: --model_args llama_ckpt_dir=DIR,...")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise InputError(f"batch_size {batch_size!r}: dllm takes a positive whole number (no 'auto')")
        generator = Llama.build(llama_ckpt_dir, adapter, tokenizer_path=tokenizer, max_seq_len=max_seq_len,
                                max_batch_size=int(batch_size), seed=seed, dense=dense,
                                execute_threshold=execute_threshold,
                                budget=None if budget is None else float(budget))
        if dist.get_world_size() > 1:
            raise InputError("the dllm harness model runs in one process (plain python, not torchrun)")
        super().__init__()
        self.generator, self.batch_size, self.max_gen_toks = generator, int(batch_size), max_gen_toks
        self.model, self.tokenizer = generator.model, generator.tokenizer
        self.max_seq_len = self.model.params.max_seq_len
        # what a text with no bos of its own is conditioned on (the harness's convention)
        self.prefix_id = self.tokenizer.bos_id if self.tokenizer.adds_bos else self.tokenizer.eos_id
        self.tallies: Dict[str, Tally] = {}

    def routing_ratios(self) -> Dict[str, dict]:
        """Per request type: FLOPs and KV ratios against the dense model on the same tokens."""
        return {
            kind: {"flops_ratio": t.flops / max(t.flops_dense, 1), "kv_ratio": t.kv_kept / max(t.kv_dense, 1),
                   "requests": int(t.value_den)}
            for kind, t in self.tallies.items()
        }

    def get_model_info(self) -> dict:
        """The harness puts this into its results' config: the ratios next to the scores."""
        return {"dllm_routing": self.routing_ratios()}

    def _count(self, kind: str, n_requests: int):
        self.tallies[kind].value_den += n_requests
        r = self.routing_ratios()[kind]
        logger.info("dllm %s: FLOPs ratio %.3f, KV ratio %.3f over %d requests", kind, r["flops_ratio"],
                    r["kv_ratio"], r["requests"])

    # ------------------------------------------------------------------ scoring

    def _encode_pair(self, context: str, continuation: str) -> Pair:
        """(context, continuation) tokens as evaluate.py encodes a prompt and response, without eos."""
        context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation, eos=False)
        if not context_ids:  # a tokenizer without bos and an empty context
            context_ids = [self.prefix_id]
        return context_ids, continuation_ids

    def _score(self, pairs: List[Pair], kind: str, disable_tqdm: bool) -> List[Tuple[float, bool]]:
        """(sum of log p, greedy?) of each continuation after its context, longest first in batches."""
        tally = self.tallies.setdefault(kind, Tally())
        order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        for at in tqdm(range(0, len(order), self.batch_size), desc=f"dllm {kind}", disable=disable_tqdm, leave=False):
            batch = order[at : at + self.batch_size]
            scored = teacher_forced(self.model, [pairs[i] for i in batch], self.max_seq_len)
            tally.add_routing(self.model.params, scored.activation, scored.token_mask, self.model.routing)
            for i, loglik, greedy in zip(batch, scored.loglik(), scored.greedy()):
                results[i] = (loglik, greedy)
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        out = self._score([self._encode_pair(*r.args) for r in requests], "loglikelihood", disable_tqdm)
        self._count("loglikelihood", len(requests))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Each text in the harness's rolling windows after `prefix_id`, of max_seq_len - 1 predictions
        so that a window, its first token included, fits max_seq_len."""
        windows, owner = [], []
        for i, r in enumerate(requests):
            tokens = self.tokenizer.encode(r.args[0], bos=False, eos=False)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_id, max_seq_len=self.max_seq_len - 1, context_len=1)):
                windows.append((context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[i] += logp
        self._count("loglikelihood_rolling", len(requests))
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy unless do_sample; runs to eos or max_gen_toks, then the text is cut at the first
        stop string (the FLOPs count the tokens generated past it)."""
        tally = self.tallies.setdefault("generate_until", Tally())
        groups: Dict[str, List[int]] = {}
        for i, r in enumerate(requests):
            unknown = set(r.args[1]) - set(GEN_KWARGS)
            if unknown:
                raise InputError(f"generation kwargs {sorted(unknown)} not supported; dllm takes {', '.join(GEN_KWARGS)}")
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out: List[Optional[str]] = [None] * len(requests)
        for indices in groups.values():
            kwargs = requests[indices[0]].args[1]
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            max_gen = kwargs.get("max_gen_toks", self.max_gen_toks)
            sample = kwargs.get("do_sample", False)
            temperature = kwargs.get("temperature", 1.0) if sample else 0.0
            for at in tqdm(range(0, len(indices), self.batch_size), desc="dllm generate_until", disable=disable_tqdm, leave=False):
                batch = indices[at : at + self.batch_size]
                keep = max(1, self.max_seq_len - max_gen)  # the context's end, with room to generate
                prompts = [self.tokenizer.encode(requests[i].args[0], bos=True, eos=False)[-keep:] for i in batch]
                tokens, _, _, routing = self.generator.generate(prompts, max_gen, temperature, kwargs.get("top_p", 1.0),
                                                                actprobs=False)
                tally.add_routing(self.model.params, routing.activation, routing.token_mask, self.model.routing)
                for i, prompt, t in zip(batch, prompts, tokens):
                    out[i] = cut_at_stops(self._continuation_text(prompt, t), until)
        self._count("generate_until", len(requests))
        return out

    def _continuation_text(self, prompt: List[int], generated: List[int]) -> str:
        """The text the tokens add after the prompt: decoded alone, SentencePiece would drop a
        leading space that the continuation has."""
        before, whole = self.tokenizer.decode(prompt), self.tokenizer.decode(prompt + generated)
        return whole[len(before):] if whole.startswith(before) else self.tokenizer.decode(generated)


def cut_at_stops(text: str, until: List[str]) -> str:
    """The text before the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
