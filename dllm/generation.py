"""Meta's Llama generation API on the D-LLM model, with real skipping and the evicting KV cache."""
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from dllm import checkpoint, distributed
from dllm.errors import InputError
from dllm.model import Transformer
from dllm.routing import DenseRouting
from dllm.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_BASE = os.path.join(ROOT, "assets", "tiny-llama2")
DEMO_ADAPTER = os.path.join(ROOT, "assets", "tiny-dllm", "checkpoint.pth")
DEMO_ARGS = os.path.join(ROOT, "assets", "tiny-dllm", "params.json")
DEMO_TOKENIZER = os.path.join(DEMO_BASE, "tokenizer.model")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@dataclass
class RoutingStats:
    """What one generate() call executed and kept, per prompt, up to the end of its output."""

    activation: torch.Tensor  # [b, tokens fed, n_layers] on the CPU, 1 = executed (= K/V kept)
    lengths: List[int]  # per row, the tokens up to the end of its output
    pair_bytes: int  # one token's K and V at one block
    cache_bytes_kept: int  # the whole batch's cache as it ended (every token fed, past eos too)

    @property
    def n_layers(self) -> int:
        return self.activation.shape[2]

    @property
    def token_mask(self) -> torch.Tensor:
        """[b, tokens fed], 1 up to the end of each row's output."""
        return (torch.arange(self.activation.shape[1])[None, :] < torch.tensor(self.lengths)[:, None]).float()

    def exec_pairs(self, row: int) -> int:
        return int(self.activation[row, : self.lengths[row]].sum())

    def exec_share(self, row: int) -> float:
        return self.exec_pairs(row) / max(1, self.lengths[row] * self.n_layers)

    def kv_bytes(self, row: int) -> int:
        return self.exec_pairs(row) * self.pair_bytes

    def kv_bytes_dense(self, row: int) -> int:
        return self.lengths[row] * self.n_layers * self.pair_bytes


class Llama:
    @staticmethod
    def build(
        llama_ckpt_dir: str = DEMO_BASE,
        dynamic_ckpt_dir: Optional[str] = DEMO_ADAPTER,
        model_args_path: Optional[str] = DEMO_ARGS,
        tokenizer_path: str = DEMO_TOKENIZER,
        max_seq_len: int = 512,
        max_batch_size: int = 8,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        dense: bool = False,
        execute_threshold: Optional[float] = None,
    ) -> "Llama":
        """Load the base checkpoint and the D-LLM adapter (a directory or one file), merge LoRA.

        Without an adapter, or with `dense` (which ignores the adapter), every block executes: the
        plain base model, the reference D-LLM is measured against.
        """
        if dense:
            dynamic_ckpt_dir = None
        device = distributed.setup(model_parallel_size)
        torch.manual_seed(seed)
        tokenizer = Tokenizer(tokenizer_path)
        base_args = checkpoint.load_params(llama_ckpt_dir)
        sizes = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size, execute_threshold=execute_threshold)
        if dynamic_ckpt_dir and model_args_path:
            args = checkpoint.load_params(model_args_path, **sizes)
            checkpoint.check_args_match(args, base_args, model_args_path, os.path.join(llama_ckpt_dir, "params.json"))
        else:
            args = checkpoint.load_params(llama_ckpt_dir, lora_rank=0, **sizes)
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words
        if args.vocab_size != tokenizer.n_words:
            raise InputError(f"{tokenizer_path}: {tokenizer.n_words} words but the model's vocab_size is {args.vocab_size}")
        model = checkpoint.build_model(args, llama_ckpt_dir, dynamic_ckpt_dir, device, distributed.base_dtype(device))
        model.merge_lora()
        if not dynamic_ckpt_dir:
            model.routing = DenseRouting()
        return Llama(model.eval(), tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.last_stats: Optional[RoutingStats] = None

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    def _check_batch(self, prompt_tokens: List[List[int]]):
        params = self.model.params
        if len(prompt_tokens) > params.max_batch_size:
            raise InputError(f"{len(prompt_tokens)} prompts but max_batch_size is {params.max_batch_size}")
        for i, tokens in enumerate(prompt_tokens):
            if not tokens:
                raise InputError(f"prompt {i} is empty")
            if len(tokens) > params.max_seq_len:
                raise InputError(f"prompt {i} has {len(tokens)} tokens, longer than max_seq_len {params.max_seq_len}")

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        actprobs: bool = True,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]], Optional[List[List[float]]]]:
        """Meta's loop over a fresh evicting cache. actprobs: per returned token, the share of
        blocks it executed. `self.last_stats` keeps what this call executed and kept."""
        self._check_batch(prompt_tokens)
        bsz, n_layers = len(prompt_tokens), self.model.n_layers
        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        total_len = min(self.model.params.max_seq_len, max_gen_len + max_prompt_len)
        pad_id = self.tokenizer.pad_id
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=self.device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
        token_logprobs = torch.zeros(bsz, total_len, device=self.device)
        activation = torch.zeros(bsz, total_len, n_layers, device=self.device)
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        input_text_mask = tokens != pad_id
        cache = self.model.new_cache(bsz)

        def step(begin: int, end: int) -> torch.Tensor:
            logits, activation[:, begin:end] = self.model(tokens[:, begin:end], begin, cache)
            return logits

        prev_pos = 0
        for cur_pos in range(min_prompt_len, total_len):
            logits = step(prev_pos, cur_pos)
            if temperature > 0:
                next_token = sample_top_p(torch.softmax(logits[:, -1] / temperature, dim=-1), top_p)
            else:
                next_token = torch.argmax(logits[:, -1], dim=-1)
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none"
                )
            eos_reached |= (~input_text_mask[:, cur_pos]) & (next_token == self.tokenizer.eos_id)
            prev_pos = cur_pos
            if all(eos_reached):
                break
        # the last token has not been through the model yet; its routing is part of the answer
        fed = max(prev_pos + 1, min_prompt_len)
        step(prev_pos, fed)

        executed = activation.sum(-1)
        out_tokens, out_logprobs, out_actprobs, lengths = [], [], [], []
        for i, toks in enumerate(tokens[:, :fed].tolist()):
            start = 0 if echo else len(prompt_tokens[i])
            end = min(len(prompt_tokens[i]) + max_gen_len, fed)
            if self.tokenizer.eos_id in toks[start:end]:
                end = start + toks[start:end].index(self.tokenizer.eos_id)
            out_tokens.append(toks[start:end])
            out_logprobs.append(token_logprobs[i, start:end].tolist())
            out_actprobs.append((executed[i, start:end] / n_layers).tolist())
            lengths.append(end)
        self.last_stats = RoutingStats(activation[:, :fed].cpu(), lengths, cache.pair_bytes(), cache.bytes_kept())
        return out_tokens, out_logprobs if logprobs else None, out_actprobs if actprobs else None

    def _completions(self, generation_tokens, generation_logprobs, generation_actprobs, logprobs: bool):
        stats = self.last_stats
        out = []
        for i, t in enumerate(generation_tokens):
            item = {
                "generation": self.tokenizer.decode(t),
                "actprobs": generation_actprobs[i],
                "exec_share": stats.exec_share(i),
            }
            if logprobs:
                item["tokens"] = [self.tokenizer.decode([x]) for x in t]
                item["logprobs"] = generation_logprobs[i]
            out.append(item)
        return out

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False):
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        result = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, True, echo)
        return self._completions(*result, logprobs)

    def chat_completion(self, dialogs: List[List[dict]], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False):
        """Llama-2 chat format: [INST] ... [/INST] turns, an optional system message in the first."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self._encode_dialog(d) for d in dialogs]
        result = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, True)
        return [
            {"generation": {"role": "assistant", "content": c.pop("generation")}, **c}
            for c in self._completions(*result, logprobs)
        ]

    def _encode_dialog(self, dialog: List[dict]) -> List[int]:
        if dialog and dialog[0]["role"] == "system":
            dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
        if [m["role"] for m in dialog[::2]] != ["user"] * len(dialog[::2]) or any(
            m["role"] != "assistant" for m in dialog[1::2]
        ):
            raise InputError("a dialog alternates user and assistant turns (an optional system message first)")
        if dialog[-1]["role"] != "user":
            raise InputError("the last message of a dialog must be from the user")
        tokens = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
            tokens += self.tokenizer.encode(text, bos=True, eos=True)
        tokens += self.tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[(probs_sum - probs_sort) > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token).reshape(-1)
