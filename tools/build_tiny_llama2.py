"""Build the demo model the project ships: a tiny Llama-2 trained from scratch on CPU.

Llama-2 weights and Meta's tokenizer cannot be downloaded here (docs/offline.md), so the real
loading code is proven on this model: a SentencePiece BPE tokenizer with Llama's conventions and
a dense Llama-2 (GQA, RoPE, SwiGLU) trained on public-domain text, saved in Meta's layout.

    python -m tools.build_tiny_llama2 --out_dir assets/tiny-llama2

Everything is written into a temp directory beside `out_dir` and renamed at the end, so an
interrupted run never leaves a half-written model where loaders look for one.
"""
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import fire
import sentencepiece as spm
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dllm import distributed
from dllm.checkpoints.base_model import load_base
from dllm.checkpoints.model_params import load_params
from dllm.checkpoints.meta_layout import save_meta_checkpoint
from dllm.errors import InputError, run_cli
from dllm.core.model import ModelArgs, Transformer
from dllm.core.routing import DenseRouting
from tools.corpus import load_corpus

# Llama's SentencePiece conventions; same values as tests/conftest.py (tests is not importable here)
LLAMA_SPM_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True,
)


def train_tokenizer(docs, vocab_size: int) -> bytes:
    """SentencePiece trains on lines, so documents are split on newlines (which byte-fall-back).

    Trained from an iterator into memory: no file path is recorded in the model, so the bytes
    are the same on every run.
    """
    lines = (line for doc in docs for line in doc.split("\n") if line.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
                                   minloglevel=2, num_threads=2, **LLAMA_SPM_OPTIONS)
    return model.getvalue()


def pack(sp: spm.SentencePieceProcessor, docs, seq_len: int) -> torch.Tensor:
    """bos + doc + eos, concatenated and cut into [n, seq_len] (the tail that does not fill one is dropped)."""
    stream = []
    for ids in sp.encode(docs):
        stream += [sp.bos_id(), *ids, sp.eos_id()]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def next_token_ce(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)[0]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def perplexity(model: Transformer, seqs: torch.Tensor, batch: int) -> float:
    """exp(mean token CE) over all sequences, in eval mode (the KV-cache inference path)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        n = chunk[:, 1:].numel()
        total += next_token_ce(model, chunk).item() * n
        count += n
    return math.exp(total / count)


def lr_at(step: int, steps: int, warmup: int, lr: float, min_lr_ratio: float) -> float:
    """Linear warm-up, then half-cycle cosine down to min_lr_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build(out_dir="assets/tiny-llama2", steps=600, batch=16, seq_len=256, lr=1e-3, warmup=30,
          min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, seed=0, vocab_size=4096, dim=256,
          n_layers=8, n_heads=8, n_kv_heads=4, eval_batch=16, threads=2, force=False):
    """Train tokenizer and model, evaluate the saved bf16 weights, write out_dir atomically."""
    started = time.time()
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise InputError(f"{out_dir} exists; pass --force to replace it")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # a kill becomes SystemExit, so the temp directory is removed below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(out_dir)}-")
    try:
        train_docs, heldout_docs = load_corpus()
        proto = train_tokenizer(train_docs, vocab_size)
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(proto)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        train, heldout = pack(sp, train_docs, seq_len), pack(sp, heldout_docs, seq_len)
        print(f"train {tuple(train.shape)} held-out {tuple(heldout.shape)} sequences", file=sys.stderr)

        args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=vocab_size, multiple_of=256, max_seq_len=seq_len, lora_rank=0,
                         dynamic_start_layer=n_layers, lora_dropout=0.0)
        distributed.setup_if_needed()
        model = Transformer(args)
        model.use_routing(DenseRouting())
        n_params = sum(p.numel() for p in model.parameters())
        # no weight decay on norm gains (the only 1-d parameters)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

        gen = torch.Generator().manual_seed(seed)
        order, cursor, losses = torch.randperm(len(train), generator=gen), 0, []
        model.train()
        train_start = time.time()
        bar = tqdm(range(steps), desc="train", dynamic_ncols=True)
        for step in bar:
            if cursor + batch > len(order):  # new epoch, new shuffle
                order, cursor = torch.randperm(len(train), generator=gen), 0
            tokens = train[order[cursor : cursor + batch]]
            cursor += batch
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, warmup, lr, min_lr_ratio)
            loss = next_token_ce(model, tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds = time.time() - train_start

        save_meta_checkpoint(model, tmp, dtype=torch.bfloat16)
        # the reported number is that of the shipped (bf16) weights, loaded as a user would load them
        reloaded = Transformer(load_params(tmp, lora_rank=0, dynamic_start_layer=n_layers), init_weights=False)
        load_base(reloaded, tmp)
        reloaded.use_routing(DenseRouting())
        heldout_ppl = perplexity(reloaded, heldout, eval_batch)
        tail = losses[-20:]  # mean of the last 20 steps: one batch is noisy
        info = {
            "seed": seed, "steps": steps, "tokens_seen": steps * batch * seq_len, "batch": batch,
            "seq_len": seq_len, "lr": lr, "warmup": warmup, "min_lr_ratio": min_lr_ratio,
            "weight_decay": weight_decay, "grad_clip": grad_clip,
            "train_sequences": len(train), "heldout_sequences": len(heldout),
            "train_loss_end": round(sum(tail) / len(tail), 4),
            "heldout_perplexity": round(heldout_ppl, 3), "n_params": n_params,
            "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
            "torch": torch.__version__, "threads": threads,
            "command": "python -m tools.build_tiny_llama2 " + " ".join(sys.argv[1:]),
        }
        with open(os.path.join(tmp, "build_info.json"), "w") as f:
            f.write(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):  # --force: swap, then drop the old one
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps(info, indent=2))
    return None


def main():
    run_cli(fire.Fire, build)


if __name__ == "__main__":
    main()
