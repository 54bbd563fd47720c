"""Distillation from a frozen teacher (dllm/training/teacher.py, --distill_teacher / --distill_weight)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import finetuning
from dllm.training import teacher
from dllm.checkpoints import adapters, base_model, model_params
from dllm.generation import Llama
from dllm.core.objective import distill_loss, row_relative_loss
from dllm.training.loop import Trainer
from helpers import one_line_error, read_log, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


def argv(tiny, out, *extra, **options):
    return train_argv(tiny["base"], tiny["data"], str(out), *extra, **options)


def test_distill_loss_is_the_mean_kl_from_the_teacher_over_the_positions_given():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert distill_loss(student, teacher).item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert distill_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(student[:0], teacher[:0]).item() == 0.0  # no response token in the batch


def test_the_row_relative_loss_is_the_mean_of_row_means_and_steps_each_row_by_its_relative_change():
    """Rows of losses 1 and 9 (positions 2 and 1): the value is their mean, 5; each row's gradient is
    its positions' share of the row divided by the row's loss, times that mean."""
    losses = torch.tensor([0.5, 1.5, 9.0], requires_grad=True)
    rows = torch.tensor([0, 0, 2])  # row 1 has no scored position and counts for nothing
    loss = row_relative_loss(losses, rows, 3)
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert losses.grad.tolist() == pytest.approx([5.0 / 2 / 2 / 1.0, 5.0 / 2 / 2 / 1.0, 5.0 / 2 / 9.0])


@pytest.mark.slow
def test_the_row_relative_loss_trains_and_a_resume_must_keep_it(tiny, tmp_path, capsys):
    out, plain = tmp_path / "relative", tmp_path / "plain"
    for run, extra in ((out, ["--row_relative_loss"]), (plain, [])):
        Trainer(finetuning.parse_args(argv(tiny, run, *extra, epochs=1, dynamic_active_target=0.7,
                                           dynamic_budget_range=[0.4, 1.0]))).train()
    relative, same_seed = (adapters.read_adapter(str(run / "checkpoint-last.pth"))["model"] for run in (out, plain))
    assert any(not torch.equal(relative[k], same_seed[k]) for k in relative)
    line = one_line_error(capsys, argv(tiny, out, resume=str(out), epochs=2, dynamic_active_target=0.7,
                                       dynamic_budget_range=[0.4, 1.0]))
    assert "was trained with --row_relative_loss True but this run has --row_relative_loss False" in line


def test_base_teacher_is_the_base_model_without_lora_or_routing(tiny):
    args = model_params.load_params(tiny["base"], lora_rank=4, routing="dllm", dynamic_start_layer=1, max_seq_len=48)
    frozen = teacher.build_teacher("base", args, tiny["base"], torch.device("cpu"), torch.float32)
    plain = base_model.build_model(dataclasses.replace(args, routing="dense", lora_rank=0), tiny["base"]).eval()
    tokens = torch.randint(0, 320, (2, 12))
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert all(layer.router is None and layer.attention.lora_q is None for layer in frozen.layers)
    assert torch.equal(frozen(tokens)[0], plain(tokens)[0])


@pytest.fixture(scope="module")
def dense_run(tiny):
    out = tiny["root"] / "distill_dense_teacher"
    Trainer(finetuning.parse_args(argv(tiny, out, routing="dense", epochs=1))).train()
    return str(out)


@pytest.mark.slow
def test_adapter_teacher_predicts_as_its_adapter_loads_for_inference(tiny, dense_run):
    args = model_params.load_params(tiny["base"], lora_rank=4, routing="dllm", dynamic_start_layer=1, max_seq_len=48)
    frozen = teacher.build_teacher(dense_run, args, tiny["base"], torch.device("cpu"), torch.float32)
    generator = Llama.build(tiny["base"], dense_run, max_seq_len=48, max_batch_size=2, model_parallel_size=1)
    tokens = torch.randint(0, 320, (2, 12))
    with torch.no_grad():  # the generator merged LoRA into the weights: equal up to rounding
        torch.testing.assert_close(frozen(tokens)[0], generator.model(tokens)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_teacher_at_weight_zero_changes_nothing_and_at_weight_one_trains_toward_it(tiny, dense_run, tmp_path):
    runs = {}
    for name, options in (("labels", {}), ("weight0", dict(distill_teacher=dense_run, distill_weight=0.0)),
                          ("weight1", dict(distill_teacher=dense_run, distill_weight=1.0))):
        out = tmp_path / name
        Trainer(finetuning.parse_args(argv(tiny, out, epochs=1, **options))).train()
        runs[name] = (adapters.read_adapter(str(out / "checkpoint-last.pth"))["model"], read_log(str(out)))
    labels, weight0, weight1 = (runs[n][0] for n in ("labels", "weight0", "weight1"))
    assert all(torch.equal(labels[k], weight0[k]) for k in labels)  # the teacher's forward draws no randomness
    assert any(not torch.equal(labels[k], weight1[k]) for k in labels)
    steps = [r for r in runs["weight1"][1] if "step" in r]
    assert steps and all(r["distill_loss"] > 0 for r in steps)
    assert all("distill_loss" not in r for r in runs["labels"][1])


def test_a_missing_teacher_is_one_line_before_the_model_loads(tiny, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    line = one_line_error(capsys, argv(tiny, tmp_path / "run", distill_teacher=str(missing)))
    assert line == f"error: adapter checkpoint not found: {missing}"
    assert not (tmp_path / "run").exists()
