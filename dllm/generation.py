"""Meta's Llama generation API on the D-LLM model, with real skipping and the evicting KV cache."""
from dataclasses import dataclass
from typing import Collection, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from dllm import distributed
from dllm.checkpoints import adapters, base_model, layouts, model_params
from dllm import assets
from dllm.chat import ChatFormat
from dllm.checkpoints.dial_file import LoraStrength, dial_path, read_dial, read_lora_strength
from dllm.config import Settings, setting
from dllm.errors import InputError
from dllm.core.flops import RoutingStats
from dllm.core.model import Transformer
from dllm.tokenizer import Tokenizer


class Generation(NamedTuple):
    """What generate() returns: per prompt its tokens, their log-probabilities and block shares (None
    unless asked), and the call's routing record."""

    tokens: List[List[int]]
    logprobs: Optional[List[List[float]]]
    actprobs: Optional[List[List[float]]]
    routing: RoutingStats


@dataclass
class ModelPaths(Settings):
    """Which base model, tokenizer and adapter: the flags every entry point that loads a model shares."""

    preset: str = setting("", "a named recipe, one of the presets the entry point offers: its settings replace the "
                          "defaults (--help with it shows them; the entry point may use one when no "
                          "--llama_ckpt_dir is given)")
    llama_ckpt_dir: str = setting("", "base model directory: Meta layout (params.json, consolidated.NN.pth, "
                                  "tokenizer.model) or Hugging Face (config.json, *.safetensors, tokenizer.json)",
                                  required=True)
    dynamic_ckpt_dir: Optional[str] = setting(None, "the adapter: a checkpoint file or a fine-tuning output directory "
                                              "(its checkpoint-last.pth), e.g. output/tiny-dllm (default: the adapter "
                                              "shipped for this base under --shipped_adapters, if any)")
    shipped_adapters: Optional[str] = setting(None, "a directory of adapters, one folder each (params.json, "
                                              "checkpoint.pth): the one trained on this base runs when no "
                                              "--dynamic_ckpt_dir is given")
    tokenizer_path: Optional[str] = setting(None, "tokenizer.model or tokenizer.json (default: the one in "
                                            "--llama_ckpt_dir)")

    def adapter(self) -> Optional[str]:
        """--dynamic_ckpt_dir, else the adapter shipped for this base, if any."""
        if self.dynamic_ckpt_dir or not self.shipped_adapters:
            return self.dynamic_ckpt_dir
        return assets.default_adapter(self.llama_ckpt_dir, self.shipped_adapters)


@dataclass
class ModelSettings(ModelPaths):
    """The flags example.py and evaluate.py share: which model, which adapter, how it runs."""

    model_args_path: Optional[str] = setting(None, "params.json for an adapter that carries none (neither in its "
                                             "checkpoint nor next to it); must agree with the adapter's own otherwise "
                                             "(default: the adapter's own)")
    dense: bool = setting(False, "run the base model alone, every block executed (ignores any adapter)")
    execute_threshold: Optional[float] = setting(None, "p(execute) at or above which a routed block runs (default: "
                                                 "the adapter's own, 0.5 for D-LLM)", low=0.0, high=1.0)
    budget: Optional[float] = setting(None, "the share of blocks to execute, chosen now: a budget-conditioned D-LLM "
                                      "adapter takes it as its routers' input; any D-LLM adapter meets it through the "
                                      "dial calibrated beside it (python -m tools.calibrate_dial) (default: the adapter "
                                      "routes as trained)", low=0.0, low_open=True, high=1.0)
    max_seq_len: int = setting(512, "longest sequence in tokens, prompt and answer", low=1)
    model_parallel_size: Optional[int] = setting(None, "model-parallel processes (default: the base checkpoint's shard "
                                                 "count; further torchrun processes are data parallel)", low=1)
    seed: int = setting(1, "random seed (sampling, dropout)")

    def adapter(self) -> Optional[str]:
        """The adapter to run: as ModelPaths says, but none with --dense."""
        return None if self.dense else super().adapter()

    def build(self, adapter: Optional[str], max_batch_size: int) -> "Llama":
        return Llama.build(self.llama_ckpt_dir, adapter, self.model_args_path, self.tokenizer_path, self.max_seq_len,
                           max_batch_size, self.model_parallel_size, self.seed, self.dense, self.execute_threshold,
                           self.budget)


class Llama:
    @staticmethod
    def build(
        llama_ckpt_dir: str,
        dynamic_ckpt_dir: Optional[str] = None,
        model_args_path: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 8,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        dense: bool = False,
        execute_threshold: Optional[float] = None,
        budget: Optional[float] = None,
        keep_lora: bool = False,
    ) -> "Llama":
        """Load the base checkpoint (Meta or Hugging Face layout) and the adapter (a checkpoint file, or a
        fine-tuning output directory: its NAME-last.pth), merge LoRA. The tokenizer is found in
        `llama_ckpt_dir` unless `tokenizer_path` is given. The adapter runs with its own model args,
        its routing policy included (those its checkpoint records, else the params.json next to it);
        `model_args_path` is for adapters that have neither, and must agree with them otherwise.
        The model-parallel size defaults to the base checkpoint's shard count; processes beyond it
        are data parallel.

        Without an adapter, or with `dense` (which ignores the adapter), every block executes: the
        plain base model, the reference D-LLM is measured against. Model args, tokenizer and their
        agreement are checked before the process group starts and the weights load.

        `budget`: the share of blocks every forward executes unless `generate` asks another per
        prompt (routing.DLLMRouting); the adapter's dial (dllm/dial.py), if calibrated, is read and
        used whenever a budget is asked. An adapter with a LoRA strength schedule beside it
        (NAME.lora_strength.json, tools/calibrate_lora_strength.py) has its LoRA merged at the
        strength of the budget asked, merged again when the budget changes (Transformer.merge_lora_at);
        `keep_lora` keeps the LoRA unmerged (its strength then set per budget, Transformer.set_lora_strength),
        for calibrating it.
        """
        if dense:
            dynamic_ckpt_dir = None
        base_args = model_params.load_params(llama_ckpt_dir)
        tokenizer = Tokenizer(tokenizer_path or llama_ckpt_dir)
        sizes = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size, execute_threshold=execute_threshold)
        if dynamic_ckpt_dir:
            args, args_path = adapters.adapter_args(dynamic_ckpt_dir, model_args_path, **sizes)
            model_params.check_args_match(args, base_args, args_path, layouts.params_file(llama_ckpt_dir))
        else:
            args = model_params.load_params(llama_ckpt_dir, lora_rank=0, routing="dense", **sizes)
        args = model_params.with_vocab(args, tokenizer, tokenizer_path or llama_ckpt_dir)
        device = distributed.setup(model_parallel_size or layouts.default_model_parallel_size(llama_ckpt_dir))
        torch.manual_seed(seed)
        model = base_model.build_model(args, llama_ckpt_dir, dynamic_ckpt_dir, device, distributed.base_dtype(device))
        strength = None
        if dynamic_ckpt_dir and model.routing.name == "dllm":
            model.routing.dial = read_dial(dynamic_ckpt_dir, model.n_layers)
            if model.routing.dial and model.routing.dial.inputs is not None and not args.dynamic_budget_range:
                raise InputError(f"{dial_path(dynamic_ckpt_dir)}: an input dial (router_inputs) is for a "
                                 f"budget-conditioned adapter; this one was trained for one target")
            strength = read_lora_strength(dynamic_ckpt_dir)
        # a budget-conditioned LoRA's update follows each row's budget: it stays unmerged
        keep_lora = keep_lora or args.dynamic_budget_lora > 0
        if strength is None and not keep_lora:
            model.merge_lora()
        generator = Llama(model.eval(), tokenizer, dynamic_ckpt_dir, strength, merge_lora=not keep_lora)
        generator.set_budget(budget)
        return generator

    def __init__(self, model: Transformer, tokenizer: Tokenizer, adapter: Optional[str] = None,
                 lora_strength: Optional[LoraStrength] = None, merge_lora: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.lora_strength = lora_strength
        self.merge_lora = merge_lora  # a strength schedule's LoRA: merged at each strength, or kept unmerged
        self.adapter = adapter

    def set_budget(self, budget: Optional[float]):
        """The share of blocks every forward executes from now on, unless a forward asks another
        (None: the adapter's own target)."""
        if budget is not None:
            if not self.adapter:
                raise InputError(f"--budget {budget}: needs a D-LLM adapter; the base model alone runs every block")
            self.model.routing.check_budget([budget])
            self.model.routing.budget = budget
        self.set_lora_strength_for(budget)

    def set_lora_strength_for(self, budget: Optional[float]):
        """The LoRA at the strength its schedule gives `budget` (None: the adapter's own target), if it has one."""
        if self.lora_strength is not None:
            asked = self.model.params.dynamic_active_target if budget is None else budget
            strength = self.lora_strength.at(asked)
            if self.merge_lora:
                self.model.merge_lora_at(strength)
            else:
                self.model.set_lora_strength(strength)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _check_batch(self, prompt_tokens: List[List[int]]):
        params = self.model.params
        if len(prompt_tokens) > params.max_batch_size:
            raise InputError(f"{len(prompt_tokens)} prompts but max_batch_size is {params.max_batch_size}")
        for i, tokens in enumerate(prompt_tokens):
            if not tokens:
                raise InputError(f"prompt {i} is empty")
            if len(tokens) > params.max_seq_len:
                raise InputError(f"prompt {i} has {len(tokens)} tokens, longer than max_seq_len {params.max_seq_len}")

    def _row_budget(self, budget, n_rows: int) -> Optional[torch.Tensor]:
        """The per-row budget tensor for a generate call, checked against what the adapter meets."""
        if budget is None:
            return None
        budgets = [float(b) for b in budget] if isinstance(budget, (list, tuple)) else [float(budget)] * n_rows
        if len(budgets) != n_rows:
            raise InputError(f"{len(budgets)} budgets for {n_rows} prompts; give one budget, or one per prompt")
        if self.lora_strength is not None and len(set(budgets)) > 1:
            raise InputError(f"budgets {budgets}: this adapter's LoRA strength follows the budget "
                             f"(NAME.lora_strength.json), one for the whole batch; give one budget per call")
        self.model.routing.check_budget(budgets)
        return torch.tensor(budgets, dtype=torch.float32, device=self.device)

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
        stop_ids: Optional[Collection[int]] = None,
        budget: Union[None, float, Sequence[float]] = None,
    ) -> Generation:
        """Meta's loop over a fresh evicting cache. actprobs: per returned token, the share of
        blocks it executed. A row ends at the first of `stop_ids` (default: the tokenizer's).
        `budget`: the share of blocks to execute, one for all prompts or one per prompt (a batch
        serving requests at different budgets; each row routes as it would alone); default: the
        one given to `build`. The returned routing record holds what this call executed and kept."""
        self._check_batch(prompt_tokens)
        row_budget = self._row_budget(budget, len(prompt_tokens))
        if row_budget is not None:
            self.set_lora_strength_for(float(row_budget[0]))
        stop = torch.tensor(sorted(self.tokenizer.stop_ids if stop_ids is None else stop_ids), device=self.device)
        bsz, n_layers = len(prompt_tokens), self.model.n_layers
        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        total_len = min(self.model.params.max_seq_len, max_gen_len + max_prompt_len)
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=self.device)
        # from the lengths, not `tokens != pad_id`: a chat prompt may hold the pad token itself
        input_text_mask = torch.zeros(bsz, total_len, dtype=torch.bool, device=self.device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
            input_text_mask[k, : len(t)] = True
        token_logprobs = torch.zeros(bsz, total_len, device=self.device)
        activation = torch.zeros(bsz, total_len, n_layers, device=self.device)
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        cache = self.model.new_cache(bsz)

        def step(begin: int, end: int) -> torch.Tensor:
            # a step past every prompt marks nothing: all its tokens are the answer's (Transformer.forward)
            response = ~input_text_mask[:, begin:end] if begin < max_prompt_len else None
            logits, activation[:, begin:end] = self.model(tokens[:, begin:end], begin, cache, row_budget, response)
            return logits

        prev_pos = 0
        try:
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
                eos_reached |= (~input_text_mask[:, cur_pos]) & torch.isin(next_token, stop)
                prev_pos = cur_pos
                if bool(eos_reached.all()):  # the loop's one read from the device per step
                    break
            # the last token has not been through the model yet; its routing is part of the answer
            fed = max(prev_pos + 1, min_prompt_len)
            step(prev_pos, fed)
        finally:  # a call's own budget sets the LoRA strength for the call only, even if it fails
            if row_budget is not None:
                self.set_lora_strength_for(self.model.routing.budget)

        executed = activation.sum(-1)
        stop_set = set(stop.tolist())
        out_tokens, out_logprobs, out_actprobs, lengths, fed_tokens = [], [], [], [], []
        for i, toks in enumerate(tokens[:, :fed].tolist()):
            start = 0 if echo else len(prompt_tokens[i])
            end = min(len(prompt_tokens[i]) + max_gen_len, fed)
            stops = [j for j in range(len(prompt_tokens[i]), end) if toks[j] in stop_set]
            if stops:
                end = stops[0]
            out_tokens.append(toks[start:end])
            out_logprobs.append(token_logprobs[i, start:end].tolist())
            out_actprobs.append((executed[i, start:end] / n_layers).tolist())
            lengths.append(end)
            fed_tokens.append(toks[:end])
        routing = RoutingStats(activation[:, :fed].cpu(), lengths, cache.pair_bytes(), cache.bytes_kept(),
                               fed_tokens, [len(t) for t in prompt_tokens])
        return Generation(out_tokens, out_logprobs if logprobs else None, out_actprobs if actprobs else None, routing)

    def _completions(self, generation: Generation, logprobs: bool) -> List[dict]:
        out = []
        for i, t in enumerate(generation.tokens):
            item = {
                "generation": self.tokenizer.decode(t),
                "actprobs": generation.actprobs[i],
                "exec_share": generation.routing.exec_share(i),
            }
            if logprobs:
                item["tokens"] = [self.tokenizer.decode([x]) for x in t]
                item["logprobs"] = generation.logprobs[i]
            out.append(item)
        return out

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False,
                        budget: Union[None, float, Sequence[float]] = None, return_routing: bool = False):
        """Meta's completions, one dict per prompt; with `return_routing`, (completions, the call's
        RoutingStats)."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        generation = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, True, echo, budget=budget)
        completions = self._completions(generation, logprobs)
        return (completions, generation.routing) if return_routing else completions

    def chat_completion(self, dialogs: List[List[dict]], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False,
                        budget: Union[None, float, Sequence[float]] = None, return_routing: bool = False):
        """Dialogs in the model's own chat template (Llama-2's [INST] format when it has none);
        generation stops at the template's end-of-turn token. `return_routing` as for text_completion."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        chat = ChatFormat(self.tokenizer)
        prompt_tokens = [chat.encode_dialog(d) for d in dialogs]
        generation = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, True,
                                   stop_ids=chat.stop_ids, budget=budget)
        completions = [
            {"generation": {"role": "assistant", "content": c.pop("generation")}, **c}
            for c in self._completions(generation, logprobs)
        ]
        return (completions, generation.routing) if return_routing else completions


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[(probs_sum - probs_sort) > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token).reshape(-1)
