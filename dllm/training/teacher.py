"""Distillation: a frozen teacher's next-token distributions as a second training signal.

The lever layer-skipping papers use when a routed student falls behind its dense model: besides
the labels, the student matches the teacher's whole distribution on every response token, which
says how wrong each wrong token is. The teacher is the base model itself (`base`: every block,
no LoRA) or a fine-tuned adapter of the same base (typically a `--routing dense` run: the dense
model after the same fine-tune). The loss itself is `objective.distill_loss`, next to the CE.
"""
import dataclasses

from dllm.checkpoints import adapters, base_model, model_params
from dllm.core.model import Transformer

BASE_TEACHER = "base"


def check_teacher(spec: str):
    """The cheap check, before any model loads: an adapter teacher must exist."""
    if spec and spec != BASE_TEACHER:
        adapters.adapter_file(spec)


def build_teacher(spec: str, base_args, base_dir: str, device, dtype) -> Transformer:
    """The frozen teacher in eval mode (its own routing at inference, no dropout, no gradients)."""
    if spec == BASE_TEACHER:
        args, adapter = dataclasses.replace(base_args, routing="dense", lora_rank=0), None
    else:
        args, args_path = adapters.adapter_args(spec, max_seq_len=base_args.max_seq_len,
                                                  max_batch_size=base_args.max_batch_size)
        model_params.check_args_match(args, base_args, args_path, base_dir)
        adapter = spec
    teacher = base_model.build_model(args, base_dir, adapter, device, dtype).eval()
    teacher.requires_grad_(False)
    return teacher
