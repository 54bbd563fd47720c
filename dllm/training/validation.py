"""Held-out loss and execution share with inference routing, and the threshold fit that meets a
target share on such batches."""
import torch
import torch.distributed as dist
from tqdm import tqdm

from dllm import distributed
from dllm.core.model import Transformer
from dllm.core.objective import compute_loss
from dllm.training.data_loading import trim_padding


def _dp_sum(tensor: torch.Tensor) -> list:
    """Summed over data-parallel ranks and read to the host once."""
    if distributed.dp_size() > 1:
        dist.all_reduce(tensor, group=distributed.dp_group())
    return tensor.tolist()


def counted_tokens(example_masks: torch.Tensor, label_masks: torch.Tensor, share_on: str) -> torch.Tensor:
    """The tokens an execution share is counted over: all real ones, or ("response", "prompt") one phase's."""
    if share_on == "response":
        return label_masks
    return example_masks - label_masks if share_on == "prompt" else example_masks


@torch.no_grad()
def validate(model: Transformer, loader, device, share_on: str = "all") -> dict:
    """CE, rate loss and execution ratio on held-out data with inference routing (real skipping).
    `share_on` "response": the ratio and rate loss over the response tokens alone, the ones a
    user's decode pays for (a dial calibrated there, dllm/dial.py). The model is left in the mode it
    came in: training resumes where it was, a calibration or a generation goes on in inference."""
    training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for _, examples, labels, example_masks, label_masks in tqdm(loader, desc="validate", disable=not distributed.is_main(), leave=False):
        examples, labels, example_masks, label_masks = [t.to(device) for t in trim_padding((examples, labels, example_masks, label_masks))]
        counted = counted_tokens(example_masks, label_masks, share_on)
        c_loss, a_loss, metrics = compute_loss(model, examples, labels, counted, label_masks)
        c, a, act, n_labels, n_tokens = (t.double() for t in (c_loss, a_loss, metrics["act_ratio"], metrics["n_labels"],
                                                              metrics["n_tokens"]))
        sums += torch.stack([c * n_labels, n_labels, a * n_tokens, act * n_tokens, n_tokens])
    model.train(training)
    c, n_labels, a, act, n_tokens = _dp_sum(sums)
    return {"val_c_loss": c / max(n_labels, 1), "val_a_loss": a / max(n_tokens, 1), "val_act_ratio": act / max(n_tokens, 1)}


def calibrate_threshold(model: Transformer, loader, target: float, device, steps: int = 12,
                        set_threshold=None, share_on: str = "all") -> float:
    """Bisection on the policy's inference threshold in [0, 1] (higher: fewer tokens execute) until
    the executed share on these batches (over the tokens `share_on` counts, as `validate`) meets the
    target: for policies whose training has no signal for their compute (early exit), and for a
    D-LLM adapter's dial (dllm/dial.py, whose `set_threshold` sets a quantile level instead)."""
    def set_policy_threshold(value: float):
        model.routing.threshold = value

    set_threshold = set_threshold or set_policy_threshold
    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        set_threshold(middle)
        ratio = validate(model, loader, device, share_on)["val_act_ratio"]
        low, high = (middle, high) if ratio > target else (low, middle)
    set_threshold((low + high) / 2)
    return (low + high) / 2
