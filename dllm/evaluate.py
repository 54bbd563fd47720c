"""The paper's table: a quality number and the FLOPs and KV ratios per benchmark.

Perplexity over response tokens (teacher forced) for alpaca/samsum/demo; accuracy by generating
and extracting the final number for gsm8k/mawps; for the choice benchmarks accuracy both by
generating and parsing the label, and by comparing the log-likelihood of each option. Every
forward runs with inference routing (real skipping); the FLOPs ratio is counted from the routing
that happened (dllm/core/flops.py), summed over all tokens of the dataset.
"""
import datetime
import importlib.metadata
import json
import math
import os
import re
import subprocess
from dataclasses import asdict, dataclass, replace
from typing import List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from dllm import distributed
from dllm.core import flops
from dllm.checkpoints import adapters
from dllm.atomic_io import atomic_write_text, check_writable_dir
from dllm.chat import ChatFormat
from dllm.config import setting
from dllm.data import TASKS, Record, load_records, task
from dllm.errors import InputError
from dllm.generation import Llama, ModelSettings
from dllm.core.routing import DenseRouting
from dllm.scoring import encode_pair, teacher_forced
from dllm.tokenizer import Tokenizer

# the checkout this code runs from, if it runs from one: its commit is the results' code version
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_FILES = ("results.json", "results.md")

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> Optional[str]:
    """The last number in the text, commas dropped ("1,234.5" -> "1234.5")."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def numbers_match(predicted: Optional[str], gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(gold)) < 1e-4 * max(1.0, abs(float(gold)))
    except ValueError:
        return False


def extract_choice(text: str, choices: List[str]) -> Optional[str]:
    """The first option label standing as a word in the text: "2", "B" (exact, so the article
    "a" is no answer), "true"/"True" (words case-insensitively)."""
    for word in re.findall(r"[A-Za-z]+|\d+", text):
        for choice in choices:
            if word == choice or (len(choice) > 1 and word.lower() == choice.lower()):
                return choice
    return None


@dataclass
class Tally:
    """Sums that add across batches and data-parallel ranks."""

    value_num: float = 0.0  # CE sum, or correct answers
    value_den: float = 0.0  # response tokens, or questions
    flops: float = 0.0
    flops_dense: float = 0.0
    kv_kept: float = 0.0
    kv_dense: float = 0.0

    def add_routing(self, args, activation: torch.Tensor, token_mask: torch.Tensor, routing: DenseRouting):
        self.flops += flops.forward_flops(args, activation, token_mask, routing)
        self.flops_dense += flops.forward_flops(args, torch.ones_like(activation), token_mask)
        kept, dense = flops.kv_pairs(activation, token_mask)
        self.kv_kept += kept
        self.kv_dense += dense

    def all_reduce(self, device) -> "Tally":
        values = torch.tensor(list(asdict(self).values()), dtype=torch.float64, device=device)
        if distributed.dp_size() > 1:
            dist.all_reduce(values, group=distributed.dp_group())
        return Tally(*values.tolist())


@dataclass
class Row:
    dataset: str
    metric: str
    value: float
    flops_ratio: float
    kv_ratio: float
    n: int = 0
    n_unit: str = "records"  # what n counts: "tokens" (perplexity, top-1 agreement) or "records" (accuracy)


def task_records(dataset_path: str, name: str, n_shot: int, chat: ChatFormat, split: str = "test") -> List[Record]:
    """A dataset's records of `split`, each prompt led by the first `n_shot` training examples, checked
    for what scoring needs (a gold number, an answer among the options)."""
    records = load_records(dataset_path, name, split, chat)
    if n_shot:
        shots = load_records(dataset_path, name, "train", chat)
        if len(shots) < n_shot:
            raise InputError(f"{os.path.join(dataset_path, name, 'train.json')}: {len(shots)} records, fewer than "
                             f"--n_shot {n_shot}")
        prefix = "".join(s.prompt + s.response + "\n\n" for s in shots[:n_shot])
        records = [Record(prefix + r.prompt, r.response, r.choices, r.option_texts, r.answer) for r in records]
    metric = task(name).metric
    for i, r in enumerate(records):
        if metric == "math" and r.answer is None:
            raise InputError(f"{name}/{split}.json: record {i} has no gold number to score")
        if metric == "choice" and (not r.choices or r.answer not in r.choices):
            raise InputError(f"{name}/{split}.json: record {i} has no options or its answer is not one of them")
    return records


class Evaluator:
    def __init__(self, generator: Llama, batch_size: int, max_gen_len: int, n_shot: int, dataset_path: str,
                 split: str = "test"):
        self.generator = generator
        self.model = generator.model
        self.tokenizer = generator.tokenizer
        self.args = self.model.params
        self.batch_size = batch_size
        self.max_gen_len = max_gen_len
        self.n_shot = n_shot
        self.dataset_path = dataset_path
        self.split = split

    def records(self, name: str) -> List[Record]:
        """This data-parallel rank's share, strided so every rank sees a similar mix."""
        records = task_records(self.dataset_path, name, self.n_shot, ChatFormat(self.tokenizer), self.split)
        return records[distributed.dp_rank():: distributed.dp_size()]

    def _batches(self, items, desc):
        for start in tqdm(range(0, len(items), self.batch_size), desc=desc, disable=not distributed.is_main(), leave=False):
            yield items[start : start + self.batch_size]

    def _score(self, prompts: List[str], continuations: List[str], tally: Tally):
        """Teacher-forced log-likelihood, token count and top-1 hits (argmax = the next token) of each
        continuation after its prompt, eos included (dllm/scoring.py, its truncation rule)."""
        pairs = [encode_pair(self.tokenizer, prompt, continuation, eos=True)
                 for prompt, continuation in zip(prompts, continuations)]
        scored = teacher_forced(self.model, pairs, self.args.max_seq_len)
        tally.add_routing(self.args, scored.activation, scored.token_mask, self.model.routing)
        return scored.loglik(), scored.n_scored(), scored.top1()

    def _generate(self, prompts: List[str], tally: Tally) -> List[str]:
        tokens = [self.tokenizer.encode(p, bos=True, eos=False)[-(self.args.max_seq_len - 1):] for p in prompts]
        generation = self.generator.generate(tokens, self.max_gen_len, temperature=0.0, actprobs=False)
        tally.add_routing(self.args, generation.routing.activation, generation.routing.token_mask, self.model.routing)
        return [self.tokenizer.decode(t) for t in generation.tokens]

    def perplexity(self, name: str, records: List[Record]) -> List[Row]:
        """Perplexity of the responses, and top-1 agreement: the share of response tokens that are the
        model's argmax given the reference prefix (on a self-distilled set, agreement with the teacher)."""
        tally, hits = Tally(), 0.0
        for batch in self._batches(records, f"{name} ppl"):
            logp, count, top1 = self._score([r.prompt for r in batch], [r.response for r in batch], tally)
            tally.value_num -= sum(logp)
            tally.value_den += sum(count)
            hits += sum(top1)
        return [self._row(name, "ppl", tally, "tokens", transform=lambda ce: math.exp(ce)),
                self._row(name, "top-1 agreement", replace(tally, value_num=hits), "tokens")]

    def math_accuracy(self, name: str, records: List[Record]) -> List[Row]:
        tally = Tally()
        for batch in self._batches(records, f"{name} generate"):
            for record, text in zip(batch, self._generate([r.prompt for r in batch], tally)):
                tally.value_num += numbers_match(extract_number(text), record.answer)
                tally.value_den += 1
        return [self._row(name, "acc (generate)", tally, "records")]

    def choice_accuracy(self, name: str, records: List[Record]) -> List[Row]:
        generated, loglik = Tally(), Tally()
        for batch in self._batches(records, f"{name} generate"):
            for record, text in zip(batch, self._generate([r.prompt for r in batch], generated)):
                generated.value_num += extract_choice(text, record.choices) == record.answer
                generated.value_den += 1
        for batch in self._batches(records, f"{name} loglik"):
            prompts = [r.prompt for r in batch for _ in r.option_texts]
            options = [o for r in batch for o in r.option_texts]
            scores, _, _ = self._score(prompts, options, loglik)
            at = 0
            for record in batch:
                own = scores[at : at + len(record.option_texts)]
                at += len(own)
                loglik.value_num += record.choices[max(range(len(own)), key=own.__getitem__)] == record.answer
                loglik.value_den += 1
        return [self._row(name, "acc (generate)", generated, "records"),
                self._row(name, "acc (loglik)", loglik, "records")]

    def _row(self, name, metric, tally: Tally, n_unit: str, transform=lambda x: x) -> Row:
        total = tally.all_reduce(self.generator.device)
        return Row(
            dataset=name, metric=metric, value=transform(total.value_num / max(total.value_den, 1)),
            flops_ratio=total.flops / max(total.flops_dense, 1), kv_ratio=total.kv_kept / max(total.kv_dense, 1),
            n=int(total.value_den), n_unit=n_unit,
        )

    def evaluate(self, name: str) -> List[Row]:
        records = self.records(name)
        run = {"ppl": self.perplexity, "math": self.math_accuracy, "choice": self.choice_accuracy}[task(name).metric]
        return run(name, records)


def markdown(rows: List[Row], title: str, provenance: Optional[dict] = None) -> str:
    lines = [f"### {title}", ""]
    if provenance:
        lines += [f"- {k}: {v}" for k, v in provenance.items()] + [""]
    lines += ["| dataset | metric | value | FLOPs ratio | KV ratio | n |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r.value:.2f}" if r.metric == "ppl" else f"{100 * r.value:.1f}%"
        lines.append(f"| {r.dataset} | {r.metric} | {value} | {r.flops_ratio:.3f} | {r.kv_ratio:.3f} | {r.n} {r.n_unit} |")
    return "\n".join(lines) + "\n"


def write_results(rows: List[Row], output_dir: str, title: str, provenance: Optional[dict] = None):
    """results.md and results.json ({"provenance": ..., "rows": [...]}), each written whole or not at
    all; rank 0 prints the table and writes."""
    if not distributed.is_main():
        return
    table = markdown(rows, title, provenance)
    print(table)
    data = {"provenance": provenance or {}, "rows": [asdict(r) for r in rows]}
    atomic_write_text(json.dumps(data, indent=2) + "\n", os.path.join(output_dir, "results.json"))
    atomic_write_text(table, os.path.join(output_dir, "results.md"))


def read_results(path: str) -> List[dict]:
    """The rows of a results.json (or of the one in a results directory); files written before
    results.json carried its provenance are a bare list of rows."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such results file")
    with open(path) as f:
        data = json.load(f)
    return data["rows"] if isinstance(data, dict) else data


def check_output_dir(output_dir: str, overwrite: bool):
    """Before any evaluation: earlier results are kept unless --overwrite, and the directory takes files."""
    existing = [name for name in RESULT_FILES if os.path.exists(os.path.join(output_dir, name))]
    if existing and not overwrite:
        raise InputError(f"{output_dir} already holds {' and '.join(existing)} of an earlier evaluation; choose "
                         f"another --output_dir or pass --overwrite to replace them")
    check_writable_dir(output_dir, f"--output_dir {output_dir}")


def code_version() -> str:
    """The git commit of this code (marked when tracked files differ from it) when it runs from its
    repository, else the installed package's version."""
    if os.path.exists(os.path.join(REPO, ".git")):
        try:
            def git(*args):
                return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True,
                                      timeout=10).stdout.strip()
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return f"git {git('rev-parse', 'HEAD')}" + (" with uncommitted changes" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return f"dllm {importlib.metadata.version('dllm')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class EvalConfig(ModelSettings):
    dataset_path: str = setting("datasets", "directory with one NAME/{train,test,prompt}.json per dataset")
    datasets: List[str] = setting(["demo"], f"datasets to evaluate, comma-separated (demo,piqa) or a list "
                                  f"(\"['demo', 'piqa']\"); known: {', '.join(sorted(TASKS))}", choices=sorted(TASKS))
    split: str = setting("test", "the split evaluated: validation to choose a recipe or an operating point, test "
                         "for the reported table", choices=["validation", "test"])
    output_dir: str = setting("results/eval", "where results.md and results.json are written")
    overwrite: bool = setting(False, "replace results an earlier evaluation left in --output_dir")
    n_shot: int = setting(0, "training examples put before each test prompt", low=0)
    batch_size: int = setting(8, "records per forward pass", low=1)
    max_gen_len: int = setting(32, "most tokens generated per answer (math and choice datasets)", low=1)

    def __post_init__(self):
        self.datasets = [name.strip() for item in self.datasets for name in item.split(",") if name.strip()]
        if not self.datasets:
            raise InputError(f"--datasets: no dataset named; known: {', '.join(sorted(TASKS))}")
        super().__post_init__()


def evaluate(config: EvalConfig):
    """evaluate.py: what can fail without the model (output directory, dataset files and records) is
    checked first; then every dataset is evaluated and the table written with its provenance."""
    check_output_dir(config.output_dir, config.overwrite)
    chat = ChatFormat(Tokenizer(config.tokenizer_path or config.llama_ckpt_dir))
    for name in config.datasets:
        task_records(config.dataset_path, name, config.n_shot, chat, config.split)
    adapter = config.adapter()
    generator = config.build(adapter, config.batch_size)
    evaluator = Evaluator(generator, config.batch_size, config.max_gen_len, config.n_shot, config.dataset_path,
                          config.split)
    rows = [row for name in config.datasets for row in evaluator.evaluate(name)]
    routing = generator.model.routing
    label = f"{routing.label} ({adapter})" if adapter else f"dense base model ({config.llama_ckpt_dir})"
    provenance = {
        "base_model": os.path.abspath(config.llama_ckpt_dir),
        "adapter": os.path.abspath(adapters.adapter_file(adapter)) if adapter else None,
        "routing": routing.label if adapter else "none (base model)",
        "execute_threshold": routing.threshold if adapter else None,
        "budget": config.budget,
        "n_shot": config.n_shot,
        "datasets": config.datasets,
        "split": config.split,
        "dataset_path": os.path.abspath(config.dataset_path),
        "code_version": code_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_results(rows, config.output_dir, f"{label}, {config.n_shot}-shot, {config.split} split", provenance)
