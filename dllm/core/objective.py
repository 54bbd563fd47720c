"""The training objective in one place: CE on the response tokens, the routing policy's auxiliary
loss (D-LLM: the rate loss) under its weight schedule, and the optional distillation KL from a
frozen teacher. `Objective` is the whole loss as a module's forward, so DDP's hooks see it."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dllm.core.model import Transformer


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at each position given: [n, vocab]
    each, the positions that predict a response token (`scored_positions`) -> [n]."""
    student = F.log_softmax(student_logits.float(), -1)
    teacher = F.log_softmax(teacher_logits.float(), -1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def position_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of a loss over its positions [n]; 0 where a batch has none (no response token)."""
    return values.sum() / max(values.numel(), 1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """distill_kl averaged over the positions given."""
    return position_mean(distill_kl(student_logits, teacher_logits))


def row_relative_loss(position_loss: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The mean over rows of each row's mean loss, each row's gradient divided by its own loss: the
    value is the plain mean over rows, the step follows every row's relative change alike. For a
    budget-conditioned D-LLM, whose rows drawn at low budgets lose several times what those near
    the top do, so that the low budgets do not set the shared LoRA and routers by themselves.
    position_loss [n] with its graph, rows [n] the row of each position."""
    sums = position_loss.new_zeros(n_rows).index_add(0, rows, position_loss)
    counts = torch.bincount(rows, minlength=n_rows).to(position_loss.dtype)
    scored = counts > 0
    row_loss = sums[scored] / counts[scored]
    size = row_loss.detach().clamp(min=1e-6)
    return (row_loss / size).mean() * size.mean()


def scored_positions(label_masks: torch.Tensor) -> torch.Tensor:
    """Flat indices into [b * s] of the positions that predict a response token (position t
    predicts token t + 1): the only positions the losses read, so the only ones projected to
    the vocabulary. Finding them is this step's one wait for the device, before the forward."""
    predicts = torch.zeros_like(label_masks, dtype=torch.bool)
    predicts[:, :-1] = label_masks[:, 1:].bool()
    return predicts.flatten().nonzero().squeeze(1)


def compute_loss(model: Transformer, examples, labels, example_masks, label_masks, teacher_logits=None,
                 distill_weight: float = 1.0, row_relative: bool = False):
    """The objective's pieces: CE on response tokens and the routing policy's aux loss (D-LLM:
    the L1 execution-rate loss), over real tokens past the reserved initial ones.

    The vocabulary projection and the CE run only at the positions that predict a response
    token. Metrics are 0-d tensors, so the caller decides when to wait for the device: act_ratio
    is the mean over those tokens of the share of all blocks executed (always-on blocks count as
    executed), n_labels and n_tokens the counts the means are over. With `teacher_logits`
    ([n, vocab] at `scored_positions(label_masks)`, dllm/training/teacher.py) the metrics also hold
    `distill_loss`, with its graph: KL from the teacher on the response tokens. With `row_relative`
    they also hold `task_loss`, with its graph: CE + distill_weight * KL per row, through
    `row_relative_loss`.
    """
    positions = scored_positions(label_masks)
    # the response tokens: for a rate loss counted on them alone, and a dial calibrated per phase
    h, activation, state = model.hidden_states(examples, state={"response_tokens": label_masks.float()})
    logits = model.project_vocab(h.flatten(0, 1)[positions]).float()
    c_tokens = F.cross_entropy(logits, labels.flatten()[positions + 1], reduction="none")
    c_loss = position_mean(c_tokens)
    token_weight = example_masks.float().clone()
    token_weight[:, : model.params.dynamic_reserve_initials] = 0
    a_loss = model.routing.aux_loss(model, state, activation, h, token_weight)
    n_tokens = token_weight.sum()
    act_ratio = (activation.detach().mean(-1) * token_weight).sum() / n_tokens.clamp(min=1)
    metrics = {"act_ratio": act_ratio, "n_labels": n_tokens.new_tensor(float(len(positions))), "n_tokens": n_tokens}
    task_tokens = c_tokens
    if teacher_logits is not None:
        kl = distill_kl(logits, teacher_logits)
        metrics["distill_loss"] = position_mean(kl)
        task_tokens = c_tokens + distill_weight * kl
    if row_relative:
        metrics["task_loss"] = row_relative_loss(task_tokens, positions // examples.shape[1], examples.shape[0])
    return c_loss, a_loss, metrics


class Objective(nn.Module):
    """loss = CE + aux_weight * aux loss + distill_weight * KL, with the pieces as metrics (0-d tensors,
    read by the caller when it chooses); with `row_relative`, CE + distill_weight * KL taken per row
    through `row_relative_loss`."""

    def __init__(self, model: Transformer, distill_weight: float = 1.0, row_relative: bool = False):
        super().__init__()
        self.model = model
        self.distill_weight = distill_weight
        self.row_relative = row_relative

    def forward(self, examples, labels, example_masks, label_masks, teacher_logits: Optional[torch.Tensor] = None,
                aux_weight: float = 0.0):
        c_loss, a_loss, metrics = compute_loss(self.model, examples, labels, example_masks, label_masks, teacher_logits,
                                               self.distill_weight, self.row_relative)
        if self.row_relative:
            loss = metrics.pop("task_loss") + aux_weight * a_loss
        else:
            loss = c_loss + aux_weight * a_loss
            if "distill_loss" in metrics:
                loss = loss + self.distill_weight * metrics["distill_loss"]
        return loss, {"c_loss": c_loss, "a_loss": a_loss, **metrics}
