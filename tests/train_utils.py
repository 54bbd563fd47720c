"""Tiny inputs for the fine-tuning tests: a random base model in Meta's layout, an alpaca-layout
dataset, and the finetuning.py command line over them (tests/test_train.py, tests/train_worker.py).
"""
import json
import os
import random
import shutil

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# base architecture: vocab 320 is the conftest tokenizer's n_words; 4 heads / 2 KV heads split
# over model-parallel size 2
BASE = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32, max_seq_len=48)
N_TRAIN, N_TEST, BATCH = 32, 8, 4

_WORDS = ("the quick brown fox jumps over lazy dog she sold 48 clips in April and half as many May "
          "which option is correct answer true false").split()
_INSTRUCTIONS = ("Continue the passage.", "Answer the question.", "Write a response.")


def make_base(directory: str, tokenizer_path: str, mp_sizes=(1,)) -> dict:
    """A random dense Llama-2 saved as `directory/mp{N}/` for each model-parallel size N."""
    from conftest import tiny_args
    from dllm.checkpoints.meta_layout import save_meta_checkpoint
    from dllm.core.model import Transformer

    torch.manual_seed(1234)
    model = Transformer(tiny_args(**BASE))
    with torch.no_grad():  # make the blocks matter: Llama's init is small for a 3-layer toy
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    out = {}
    for mp in mp_sizes:
        path = os.path.join(directory, f"mp{mp}")
        save_meta_checkpoint(model, path, dtype=torch.float32, mp_size=mp)
        shutil.copy(tokenizer_path, os.path.join(path, "tokenizer.model"))
        out[mp] = path
    return out


def records(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = lambda lo, hi: " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
        out.append({"instruction": rng.choice(_INSTRUCTIONS), "input": words(0, 4), "output": words(2, 8)})
    return out


def make_dataset(directory: str, name: str = "demo") -> str:
    """`directory/name/{train,test,prompt}.json` in the alpaca layout; returns `directory`."""
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    shutil.copy(os.path.join(ROOT, "datasets", "demo", "prompt.json"), os.path.join(directory, name, "prompt.json"))
    for split, n, seed in (("train", N_TRAIN, 1), ("test", N_TEST, 2)):
        with open(os.path.join(directory, name, f"{split}.json"), "w") as f:
            json.dump(records(n, seed), f, indent=1)
    return directory


def train_argv(base: str, data: str, out: str, *extra: str, **options) -> list:
    """finetuning.py arguments for a tiny run; keyword options override the defaults below."""
    values = dict(
        llama_ckpt_dir=base, dataset_path=data, dataset_name="demo", output_dir=out,
        max_seq_len=48, lora_rank=4, dynamic_router_hdim=16, dynamic_start_layer=1, dynamic_reserve_initials=2,
        dynamic_active_target=0.5, lambda_active=1.0, batch_size=BATCH, epochs=2, warmup_epochs=0.5,
        lr=5e-3, router_lr=2e-2, min_lr=1e-4, weight_decay=0.02, seed=0, log_freq=1,
    )
    values.update(options)
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv += [f"--{key}", str(list(value)) if isinstance(value, (list, tuple)) else str(value)]
    return argv + list(extra)


def read_log(out: str) -> list:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def one_line_error(capsys, argv: list) -> str:
    """finetuning.py's entry point in process: exit status 1 and exactly one line on stderr, no traceback."""
    import finetuning
    from dllm.errors import run_cli
    from dllm.training.loop import train

    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        run_cli(lambda: train(finetuning.parse_args(argv)))
    assert excinfo.value.code == 1
    err = capsys.readouterr().err  # progress bars may precede it
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    message = err[err.index("error: "):]
    assert message.endswith("\n") and message.count("\n") == 1, message
    return message.rstrip("\n")
