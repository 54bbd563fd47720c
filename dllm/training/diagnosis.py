"""Why a loss went non-finite, found by elimination on every rank: the base weights, then the
batch's loss at the initial adapter (the data), else the optimisation (the learning rate)."""
import os

import torch
import torch.distributed as dist

from dllm.core.model import Transformer, is_adapter_key
from dllm.core import objective


def all_ranks(ok: bool, device) -> bool:
    """True where every rank's ok is."""
    if dist.get_world_size() == 1:
        return ok  # no device round trip
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not flag.item()


@torch.no_grad()
def non_finite_cause(model: Transformer, initial_adapter: dict, indices, batch, config, lr: float, device) -> str:
    """The words after "non-finite loss at ...: ", for the one-line error. Leaves the model at its
    initial adapter (the run stops)."""
    base_finite = all(torch.isfinite(p).all() for name, p in model.state_dict().items()
                      if not is_adapter_key(name) and p.is_floating_point())
    if not all_ranks(base_finite, device):
        return (f"the base weights in {config.llama_ckpt_dir} hold NaN or inf: the base checkpoint is "
                f"damaged, re-download or re-convert it")
    model.load_state_dict(initial_adapter, strict=False)
    # one example at a time (model-parallel peers hold the same batch and compute together)
    own = []
    for row, index in enumerate(indices.tolist()):
        c_loss, a_loss, _ = objective.compute_loss(model, *[t[row:row + 1] for t in batch])
        if not torch.isfinite(c_loss + a_loss).item():
            own.append(index)
    where = [None] * dist.get_world_size()
    dist.all_gather_object(where, own)
    bad = sorted(set(i for rank in where for i in rank))
    train_json = os.path.join(config.dataset_path, config.dataset_name, "train.json")
    if bad:
        return (f"the loss of examples {bad} of {train_json} is not finite even at the initial adapter and the "
                f"base weights are finite: check those records")
    return (f"the base weights are finite and the same examples give a finite loss at the initial adapter: the "
            f"training diverged, lower the learning rate (lr {lr:.3g}: --blr/--lr)")
