"""Run by tests/test_train.py under torchrun: fine-tune with finetuning.py's arguments, then have
every rank write what it ended with, so the test can check that the ranks agree.

usage: torchrun --nproc_per_node N tests/train_worker.py OUT_DIR FINETUNING_ARGS...
Writes OUT_DIR/rank{R}.pt: {"adapter": full router/LoRA tensors, "exp_avg": {name: local tensor},
"dp_rank", "mp_rank", "indices": {epoch: the training record indices this rank saw}}.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import finetuning  # noqa: E402
from dllm import distributed  # noqa: E402
from dllm.checkpoints.adapters import adapter_state_dict  # noqa: E402
from dllm.errors import run_cli  # noqa: E402
from dllm.training.loop import Trainer  # noqa: E402


def main(out_dir, argv):
    trainer = Trainer(finetuning.parse_args(argv))
    trainer.train()
    adapter = adapter_state_dict(trainer.model)  # a collective over the model-parallel group
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    exp_avg = {names[id(p)]: state["exp_avg"].clone() for p, state in trainer.optimizer.state.items()}
    sampler, indices = trainer.train_loader.sampler, {}
    for epoch in range(trainer.config.epochs):
        sampler.set_epoch(epoch)
        indices[epoch] = list(sampler)
    torch.save({"adapter": adapter, "exp_avg": exp_avg, "dp_rank": distributed.dp_rank(),
                "mp_rank": distributed.mp_rank(), "indices": indices},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.barrier()


if __name__ == "__main__":
    run_cli(main, sys.argv[1], sys.argv[2:])
