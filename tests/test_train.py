"""Fine-tuning end to end on a tiny random Llama-2: the rate loss, the schedules, resume, atomic
checkpoints under failure, data parallel and model parallel under torchrun, one-line errors for
bad input, and what the run writes (log.jsonl, params.json, checkpoints).

The base model (3 layers, dim 32), tokenizer (vocab 320) and dataset (32 train / 8 test records,
max_seq_len 48) are built once per session; see tests/helpers.py.
"""
import dataclasses
import glob
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

import finetuning
from dllm.core import objective
from dllm.training import schedule
from dllm.checkpoints import adapters, base_model, model_params
from dllm.checkpoints.adapters import read_adapter
from dllm.atomic_io import atomic_save
from dllm.errors import InputError
from dllm.core.model import Transformer
from dllm.core.routing import rate_loss_weight
from dllm.training.loop import Trainer, train
from dllm.training.config import TrainConfig
from helpers import (BATCH, N_TRAIN, ROOT, free_port, one_line_error, one_torch_thread, read_log, subprocess_env,
                     tiny_args, train_argv)

WORKER = os.path.join(ROOT, "tests", "train_worker.py")
STEPS_PER_EPOCH = N_TRAIN // BATCH  # 8 with one process
SAVE_STEPS = 4
STEP_KEYS = {"step", "epoch", "c_loss", "a_loss", "act_ratio", "lambda", "lr", "tokens_per_s"}
EPOCH_KEYS = {"epoch", "val_c_loss", "val_a_loss", "val_act_ratio"}


pytestmark = pytest.mark.usefixtures("one_thread")


def argv(tiny, out, *extra, **options):
    return train_argv(tiny["base"], tiny["data"], str(out), *extra, **options)


@pytest.fixture(scope="session")
def run_a(tiny):
    """Uninterrupted: 2 epochs of 8 steps, checkpoint-last.pth also written every 4 steps."""
    out = tiny["root"] / "run_a"
    with one_torch_thread():  # a session fixture starts before the module's one_thread: resumed runs compare to it bit for bit
        Trainer(finetuning.parse_args(argv(tiny, out, save_steps=SAVE_STEPS))).train()
    return out


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# 1. the rate loss alone pulls the execution ratio to the target, from above and from below

def _eval_act_ratio(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        _, _, metrics = objective.compute_loss(model, *batch)
    model.train()
    return metrics["act_ratio"]


@pytest.mark.slow
@pytest.mark.parametrize("start_layer", [0, 1])
@pytest.mark.parametrize("bias, direction", [((0.1, 2.0), "down"), ((2.0, 0.1), "up")])
def test_rate_loss_pulls_execution_ratio_to_target(bias, direction, start_layer):
    target = 0.5
    torch.manual_seed(7)
    args = tiny_args(dim=32, n_layers=4, n_heads=2, n_kv_heads=1, lora_rank=0, max_seq_len=32,
                     dynamic_start_layer=start_layer, dynamic_router_bias=bias, dynamic_active_target=target)
    model = Transformer(args)
    model.set_adapter_trainable(True)
    routers = [p for p in model.parameters() if p.requires_grad]
    assert routers and all(".router." in n for n, p in model.named_parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(8)
    tokens, held_out = torch.randint(3, 320, (8, 24), generator=g), torch.randint(3, 320, (8, 24), generator=g)
    ones = torch.ones(8, 24)
    batch, held_out_batch = (tokens, tokens, ones, ones), (held_out, held_out, ones, ones)

    before = _eval_act_ratio(model, held_out_batch)
    # inference thresholds p(execute) at 0.5: the initial bias decides (nearly) every token
    always_on = start_layer / args.n_layers
    if direction == "down":
        assert before >= 0.95
    else:
        assert always_on <= before <= always_on + 0.05
    optimizer = torch.optim.AdamW(routers, lr=0.05, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(40):
        _, a_loss, _ = objective.compute_loss(model, *batch)  # loss = rate loss only
        optimizer.zero_grad()
        a_loss.backward()
        optimizer.step()
        losses.append(a_loss.item())
    after = _eval_act_ratio(model, held_out_batch)
    assert abs(after - target) <= 0.1, (before, after)
    assert abs(_eval_act_ratio(model, batch) - target) <= 0.1
    assert sum(losses[-5:]) / 5 < losses[0] / 2, losses


# 2. schedules, by hand

def test_learning_rate_schedule_by_hand():
    lr, min_lr, warmup, epochs = 1e-3, 1e-5, 2.0, 10.0
    f = lambda e: schedule.learning_rate(e, lr, min_lr, warmup, epochs)  # noqa: E731
    assert f(0.0) == 0.0
    assert f(0.5) == pytest.approx(2.5e-4, rel=1e-12)  # linear warm-up
    assert f(1.0) == pytest.approx(5e-4, rel=1e-12)
    assert f(2.0) == pytest.approx(1e-3, rel=1e-12)  # end of warm-up: the peak
    assert f(6.0) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)  # half-way through the cosine
    assert f(4.0) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.sqrt(0.5)) / 2, rel=1e-12)  # cos(pi/4)
    assert f(10.0) == pytest.approx(1e-5, rel=1e-12)
    assert f(12.0) == pytest.approx(1e-5, rel=1e-12)  # past the end: stays at min_lr
    values = [f(e / 10) for e in range(101)]
    assert all(a <= b for a, b in zip(values[:21], values[1:21]))  # rises during warm-up
    assert all(a >= b for a, b in zip(values[20:], values[21:]))  # then only falls
    # no warm-up: the peak at epoch 0
    assert schedule.learning_rate(0.0, lr, min_lr, 0.0, epochs) == pytest.approx(1e-3, rel=1e-12)


def test_rate_loss_weight_schedule_by_hand():
    lam, epochs = 5.0, 10.0
    f = lambda e: rate_loss_weight(e, lam, epochs)  # noqa: E731
    assert f(0.0) == 0.0
    assert f(5.0) == pytest.approx(5.0 * math.sqrt(0.5), rel=1e-12)  # lambda * sin(pi/4)
    assert f(10.0 / 3) == pytest.approx(2.5, rel=1e-12)  # sin(pi/6) = 1/2
    assert f(10.0) == pytest.approx(5.0, rel=1e-12)
    assert f(11.0) == pytest.approx(5.0, rel=1e-12)
    values = [f(e / 10) for e in range(101)]
    assert all(a < b for a, b in zip(values, values[1:]))


# 3. resume

class Stop(Exception):
    """Stands for a kill right after a checkpoint was written."""


def run_until_saved(monkeypatch, argv_, stop_at):
    original = Trainer.save

    def save(self, epoch, step, name):
        original(self, epoch, step, name)
        if (epoch, step) == stop_at:
            raise Stop

    with monkeypatch.context() as m:
        m.setattr(Trainer, "save", save)
        with pytest.raises(Stop):
            Trainer(finetuning.parse_args(argv_)).train()


def _step_record(record):
    return {k: v for k, v in record.items() if k != "tokens_per_s"}


@pytest.mark.slow
@pytest.mark.parametrize("stop_at, resumes_at", [
    ((0, 4), (0, 4)),  # mid-epoch 0
    ((1, 4), (1, 4)),  # mid-epoch 1, after an epoch-end save
    ((0, 8), (0, 8)),  # the save at the last step of epoch 0: resumes to validate and save epoch 0
], ids=["epoch0-step4", "epoch1-step4", "epoch0-last-step"])
def test_resume_continues_exactly(tiny, run_a, tmp_path, monkeypatch, stop_at, resumes_at):
    out = tmp_path / "run_b"
    run_argv = argv(tiny, out, save_steps=SAVE_STEPS)
    run_until_saved(monkeypatch, run_argv, stop_at)
    saved = read_adapter(str(out / "checkpoint-last.pth"))
    assert (saved["epoch"], saved["step"]) == stop_at

    trainer = Trainer(finetuning.parse_args(run_argv + ["--resume", str(out / "checkpoint-last.pth")]))
    assert (trainer.start_epoch, trainer.start_step) == resumes_at
    # adapter, optimizer moments and RNG are the saved ones
    assert max_diff(adapters.adapter_state_dict(trainer.model), saved["model"]) == 0.0
    state, saved_state = trainer.optimizer.state_dict()["state"], saved["optimizer"]["state"]
    assert sorted(state) == sorted(saved_state) and len(state) > 0
    for key in state:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][moment], saved_state[key][moment]), (key, moment)
        assert float(state[key]["step"]) == float(saved_state[key]["step"])
    assert torch.equal(torch.get_rng_state(), saved["rank_states"][0]["rng"])
    trainer.train()

    # same data order, noise and optimizer path: the resumed run ends where the uninterrupted one did
    final_a = read_adapter(str(run_a / "checkpoint-last.pth"))
    final_b = read_adapter(str(out / "checkpoint-last.pth"))
    assert (final_b["epoch"], final_b["step"]) == (2, 0)
    diff = max_diff(final_b["model"], final_a["model"])
    assert diff <= 1e-6, f"resumed adapter differs from the uninterrupted run by {diff}"
    for key in final_a["optimizer"]["state"]:
        assert torch.allclose(final_b["optimizer"]["state"][key]["exp_avg"],
                              final_a["optimizer"]["state"][key]["exp_avg"], rtol=0, atol=1e-6)
    # and logged the same steps with the same values, each once
    log_a, log_b = read_log(str(run_a)), read_log(str(out))
    steps_a = [_step_record(r) for r in log_a if "step" in r]
    steps_b = [_step_record(r) for r in log_b if "step" in r]
    assert [r["step"] for r in steps_b] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert steps_b == steps_a
    # every epoch was validated and got its checkpoint-EPOCH.pth, as in the uninterrupted run
    assert [r["epoch"] for r in log_b if "val_c_loss" in r] == [0, 1], "an epoch was never validated after resume"
    assert [r for r in log_b if "val_c_loss" in r] == [r for r in log_a if "val_c_loss" in r]
    assert sorted(os.listdir(out)) == sorted(os.listdir(run_a)), "an epoch's checkpoint was never written after resume"


@pytest.mark.slow
def test_resume_from_output_directory_takes_the_newest_checkpoint(tiny, run_a, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run_a, out)
    os.utime(out / "checkpoint-0.pth", (1, 1))  # older than checkpoint-last.pth / checkpoint-1.pth
    trainer = Trainer(finetuning.parse_args(argv(tiny, out, "--resume", str(out))))
    assert (trainer.start_epoch, trainer.start_step) == (2, 0)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    capsys.readouterr()
    trainer.train()
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"nothing left to do: {out / 'checkpoint-last.pth'} finished all 2 epochs (raise --epochs to train longer)")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


class Interrupt(Exception):
    """Stands for a kill between two saves."""


@pytest.mark.slow
def test_resumed_log_has_each_step_once(tiny, run_a, tmp_path, monkeypatch):
    """Killed at step 6 after the save at step 4: steps 5 and 6 are logged again on resume, once."""
    out = tmp_path / "run"
    run_argv = argv(tiny, out, save_steps=SAVE_STEPS)
    original = Trainer.write_log

    def write_log(self, record):
        original(self, record)
        if record.get("step") == 6:
            raise Interrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "write_log", write_log)
        with pytest.raises(Interrupt):
            Trainer(finetuning.parse_args(run_argv)).train()
    assert [r["step"] for r in read_log(str(out))] == [1, 2, 3, 4, 5, 6]
    Trainer(finetuning.parse_args(run_argv + ["--resume", str(out)])).train()
    log = read_log(str(out))
    assert [r["step"] for r in log if "step" in r] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [r["epoch"] for r in log if "val_c_loss" in r] == [0, 1]
    assert [_step_record(r) for r in log] == [_step_record(r) for r in read_log(str(run_a))]


@pytest.mark.slow
def test_closing_summary_says_where_the_adapter_is_and_how_to_use_it(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    train(finetuning.parse_args(argv(tiny, out, epochs=1)))
    lines = capsys.readouterr().out.strip().splitlines()[-4:]
    final = read_log(str(out))[-1]
    assert lines[0].startswith("done in ") and lines[0].endswith(
        f"s: adapter in {out}/ (checkpoint-last.pth, params.json, log.jsonl, curves.png)"), lines[0]
    assert lines[1] == (f"final validation (test.json): executed {final['val_act_ratio']:.3f} of the blocks, CE "
                        f"{final['val_c_loss']:.3f}, perplexity {math.exp(final['val_c_loss']):.1f}")
    use = f"--llama_ckpt_dir {tiny['base']} --dynamic_ckpt_dir {out}"
    with open(os.path.join(tiny["data"], "demo", "test.json")) as f:
        first = json.load(f)[0]
    prompt = f"--prompt_path {os.path.join(tiny['data'], 'demo', 'prompt.json')} " \
             f"--instructs {shlex.quote(repr([first['instruction']]))}"
    if first["input"]:
        prompt += f" --inputs {shlex.quote(repr([first['input']]))}"
    assert lines[2] == f"generate with it: torchrun --nproc_per_node 1 example.py {use} {prompt}"
    assert lines[3] == f"evaluate it:      torchrun --nproc_per_node 1 evaluate.py {use} --datasets demo"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_restores_the_cuda_rng(tiny, tmp_path, monkeypatch):
    """On CUDA the Gumbel noise and LoRA dropout are drawn from the CUDA generator."""
    out = tmp_path / "run"
    run_argv = argv(tiny, out, save_steps=SAVE_STEPS)
    original, at_save = Trainer.save, {}

    def save(self, epoch, step, name):
        original(self, epoch, step, name)
        if (epoch, step) == (0, 4):
            at_save["cuda_rng"] = torch.cuda.get_rng_state()
            raise Stop

    with monkeypatch.context() as m:
        m.setattr(Trainer, "save", save)
        with pytest.raises(Stop):
            Trainer(finetuning.parse_args(run_argv)).train()
    Trainer(finetuning.parse_args(run_argv + ["--resume", str(out / "checkpoint-last.pth")]))
    assert torch.equal(torch.cuda.get_rng_state(), at_save["cuda_rng"])


# 4. a failure or a kill while saving leaves the previous checkpoint

def _partial_then(exc):
    def fake_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        fake_save.real(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise exc

    fake_save.real = torch.save
    return fake_save


@pytest.mark.parametrize("exc, raised", [(OSError(28, "No space left on device"), InputError),
                                         (KeyboardInterrupt(), KeyboardInterrupt)], ids=["disk-full", "ctrl-c"])
@pytest.mark.slow
def test_failed_save_keeps_previous_checkpoint(tiny, run_a, tmp_path, monkeypatch, exc, raised):
    out = tmp_path / "out"
    shutil.copytree(run_a, out)
    target = out / "checkpoint-last.pth"
    old = target.read_bytes()
    trainer = Trainer(finetuning.parse_args(argv(tiny, out, "--resume", str(target))))
    monkeypatch.setattr(torch, "save", _partial_then(exc))
    with pytest.raises(raised):
        trainer.save(5, 0, "checkpoint-last.pth")
    with pytest.raises(raised):
        atomic_save({"epoch": 5, "model": {}}, str(out / "checkpoint-new.pth"))
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert read_adapter(str(target))["epoch"] == 2
    assert sorted(os.listdir(out)) == sorted(os.listdir(run_a)), "temp files left behind"


_KILLED_SAVER = r"""
import io, os, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from dllm import atomic_io
real = torch.save
def half(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    print("half written", flush=True)
    time.sleep(120)
torch.save = half
atomic_io.atomic_save({"epoch": 99, "step": 0, "model": {"layers.1.router.linear_2.bias": torch.zeros(2)}}, sys.argv[1])
"""


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(run_a, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "checkpoint-last.pth"
    shutil.copy(run_a / "checkpoint-last.pth", target)
    old = target.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, str(target), ROOT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        line = proc.stdout.readline()
        assert line.strip() == "half written", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == old
    assert read_adapter(str(target))["epoch"] == 2
    # the torn temp file is hidden: resuming from the directory still finds the old checkpoint
    leftovers = [name for name in os.listdir(out) if name != target.name]
    assert all(name.startswith(".tmp-") for name in leftovers), leftovers
    assert adapters.adapter_file(str(out)) == str(target)
    assert read_adapter(str(out))["epoch"] == 2


# 5. torchrun: data parallel and model parallel

def _torchrun(tiny, out, base, *extra, **options):
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           WORKER, str(out)] + train_argv(base, tiny["data"], str(out / "run"), *extra, **options)
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
def test_torchrun_data_parallel_ranks_agree(tiny, tmp_path):
    ranks = _torchrun(tiny, tmp_path / "dp", tiny["base"], model_parallel_size=1, save_steps=2)
    r0, r1 = ranks
    assert (r0["dp_rank"], r1["dp_rank"]) == (0, 1)
    # each rank trains on its own half of the records, every record once per epoch
    for epoch in (0, 1):
        assert not set(r0["indices"][epoch]) & set(r1["indices"][epoch])
        assert sorted(r0["indices"][epoch] + r1["indices"][epoch]) == list(range(N_TRAIN))
    # gradients are averaged: identical adapters and optimizer moments on both ranks
    assert max_diff(r0["adapter"], r1["adapter"]) == 0.0
    assert max_diff(r0["exp_avg"], r1["exp_avg"]) == 0.0
    run = tmp_path / "dp" / "run"
    saved = read_adapter(str(run / "checkpoint-last.pth"))
    assert max_diff(saved["model"], r0["adapter"]) == 0.0
    assert (saved["epoch"], saved["step"]) == (2, 0)
    assert len(saved["rank_states"]) == 2
    # the noise differs across data-parallel ranks
    assert not torch.equal(saved["rank_states"][0]["rng"], saved["rank_states"][1]["rng"])
    steps_per_epoch = N_TRAIN // (BATCH * 2)
    log = read_log(str(run))
    assert [r["step"] for r in log if "step" in r] == list(range(1, 2 * steps_per_epoch + 1))
    assert [r["epoch"] for r in log if "val_c_loss" in r] == [0, 1]
    assert all(math.isfinite(r[k]) for r in log for k in r if k != "epoch")


@pytest.mark.slow
def test_torchrun_model_parallel_2_matches_one_process(tiny, tmp_path):
    ranks = _torchrun(tiny, tmp_path / "mp", tiny["base_mp2"], model_parallel_size=2)
    r0, r1 = ranks
    assert (r0["mp_rank"], r1["mp_rank"]) == (0, 1) and r0["dp_rank"] == r1["dp_rank"] == 0
    assert r0["indices"] == r1["indices"]
    assert max_diff(r0["adapter"], r1["adapter"]) == 0.0
    saved = read_adapter(str(tmp_path / "mp" / "run" / "checkpoint-last.pth"))
    assert max_diff(saved["model"], r0["adapter"]) == 0.0
    # the same run in one process: same data, same noise; only the sharded matmuls' rounding differs
    single = tmp_path / "single"
    Trainer(finetuning.parse_args(argv(tiny, single))).train()
    diff = max_diff(read_adapter(str(single / "checkpoint-last.pth"))["model"], saved["model"])
    assert diff <= 1e-5, f"model parallel 2 differs from one process by {diff}"


# 6. bad input: one line, exit status 1

@pytest.mark.slow
def test_cli_unknown_dataset_exits_with_one_line(tiny, tmp_path):
    cmd = [sys.executable, "finetuning.py"] + argv(tiny, tmp_path / "out", dataset_name="nosuch")
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("error: unknown dataset 'nosuch'; known: "), proc.stderr
    assert "demo" in lines[0] and "alpaca" in lines[0]


def _dataset_copy(tiny, tmp_path) -> str:
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    return str(data)


def test_missing_dataset_file(tiny, tmp_path, capsys):
    data = _dataset_copy(tiny, tmp_path)
    os.remove(os.path.join(data, "demo", "test.json"))
    line = one_line_error(capsys, argv(tiny, tmp_path / "out", dataset_path=data))
    assert line == f"error: file not found: {os.path.join(data, 'demo', 'test.json')}"


@pytest.mark.slow
def test_a_validation_split_is_validated_on_and_test_is_never_read(tiny, tmp_path, capsys):
    data = _dataset_copy(tiny, tmp_path)
    shutil.copy(os.path.join(data, "demo", "test.json"), os.path.join(data, "demo", "validation.json"))
    os.remove(os.path.join(data, "demo", "test.json"))
    capsys.readouterr()
    train(finetuning.parse_args(argv(tiny, tmp_path / "out", dataset_path=data, epochs=1)))
    out = capsys.readouterr().out
    assert "final validation (validation.json): executed" in out and "no validation.json" not in out


@pytest.mark.slow
def test_without_a_validation_split_the_run_says_it_validates_on_test(tiny, tmp_path, capsys):
    capsys.readouterr()
    train(finetuning.parse_args(argv(tiny, tmp_path / "out", epochs=1)))
    out = capsys.readouterr().out
    assert "warning: demo has no validation.json: validating on test.json" in out


def test_malformed_record_names_file_index_and_field(tiny, tmp_path, capsys):
    data = _dataset_copy(tiny, tmp_path)
    path = os.path.join(data, "demo", "train.json")
    with open(path) as f:
        raws = json.load(f)
    del raws[5]["output"]
    with open(path, "w") as f:
        json.dump(raws, f)
    line = one_line_error(capsys, argv(tiny, tmp_path / "out", dataset_path=data))
    assert line == f"error: {path}: record 5: missing field 'output'"


def test_missing_model_directory(tiny, tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    line = one_line_error(capsys, train_argv(missing, tiny["data"], str(tmp_path / "out")))
    assert line == f"error: checkpoint directory not found: {missing}"
    # the directory is named first even when the tokenizer is given elsewhere
    line = one_line_error(capsys, train_argv(missing, tiny["data"], str(tmp_path / "out"),
                                             tokenizer_path=os.path.join(tiny["base"], "tokenizer.model")))
    assert line == f"error: checkpoint directory not found: {missing}"


def test_model_directory_without_shards(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(os.path.join(tiny["base"], name), model / name)
    line = one_line_error(capsys, train_argv(str(model), tiny["data"], str(tmp_path / "out")))
    assert line == f"error: no consolidated.*.pth files in {model}"


@pytest.mark.slow
def test_resume_from_a_file_that_is_not_a_training_checkpoint(tiny, run_a, tmp_path, capsys):
    out = str(tmp_path / "out")
    adapter_only = tmp_path / "adapter.pth"
    atomic_save({"epoch": 2, "model": read_adapter(str(run_a / "checkpoint-last.pth"))["model"]}, str(adapter_only))
    line = one_line_error(capsys, argv(tiny, out, resume=str(adapter_only)))
    assert line == f"error: {adapter_only}: not a training checkpoint (no 'step'); use it as an adapter instead"

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    line = one_line_error(capsys, argv(tiny, out, resume=str(garbage)))
    assert line.startswith(f"error: {garbage}: ")

    line = one_line_error(capsys, argv(tiny, out, resume=str(tmp_path / "missing.pth")))
    assert line == f"error: adapter checkpoint not found: {tmp_path / 'missing.pth'}"

    empty = tmp_path / "empty-dir"
    empty.mkdir()
    line = one_line_error(capsys, argv(tiny, out, resume=str(empty)))
    assert line == f"error: no adapter checkpoint (*.pth) in {empty}"

    # saved by two processes, resumed by one
    ckpt = read_adapter(str(run_a / "checkpoint-last.pth"))
    ckpt["rank_states"] = ckpt["rank_states"] * 2
    two = tmp_path / "two.pth"
    atomic_save(ckpt, str(two))
    line = one_line_error(capsys, argv(tiny, out, resume=str(two)))
    assert line == f"error: {two}: saved by 2 processes, resuming with 1"


def test_accum_iter_larger_than_the_epoch(tiny, tmp_path, capsys):
    line = one_line_error(capsys, argv(tiny, tmp_path / "out", accum_iter=100))
    assert line == f"error: demo: {N_TRAIN} training records give fewer batches than --accum_iter"


def test_non_finite_loss_from_the_data_names_the_examples_and_keeps_the_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    """A record whose loss is NaN whatever the adapter: the data is blamed, by its record index."""
    out = tmp_path / "out"
    sampler = DistributedSampler(range(N_TRAIN), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(0)
    bad = list(sampler)[2 * BATCH + 1]  # in the batch of epoch 0, step 2
    config = finetuning.parse_args(argv(tiny, out, save_steps=2))
    trainer = Trainer(config)
    poisoned = trainer.train_loader.dataset[bad][1]
    original = objective.compute_loss

    def compute_loss(model, examples, *rest):
        c_loss, a_loss, metrics = original(model, examples, *rest)
        width = examples.shape[1]
        if (examples == poisoned[:width]).all(1).any():
            c_loss = c_loss * float("nan")
        return c_loss, a_loss, metrics

    monkeypatch.setattr(objective, "compute_loss", compute_loss)
    with pytest.raises(InputError) as e:
        trainer.train()
    train_json = os.path.join(tiny["data"], "demo", "train.json")
    assert str(e.value) == (
        f"non-finite loss at epoch 0 step 2: the loss of examples [{bad}] of {train_json} is not finite even at the "
        f"initial adapter and the base weights are finite: check those records; the last checkpoint, "
        f"{out / 'checkpoint-last.pth'} (epoch 0, step 2), is finite and kept: --resume {out} continues from it")
    saved = read_adapter(str(out / "checkpoint-last.pth"))
    assert (saved["epoch"], saved["step"]) == (0, 2)
    assert [name for name in os.listdir(out) if name.startswith(".tmp-")] == []


def test_a_huge_learning_rate_never_saves_nan_and_blames_the_learning_rate(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    line = one_line_error(capsys, argv(tiny, out, lr=1e12, router_lr=1e12, warmup_epochs=0, save_steps=1))
    assert "the training diverged, lower the learning rate (lr 1e+12: --blr/--lr)" in line
    saved = sorted(glob.glob(str(out / "*.pth")))
    for path in saved:  # whatever was written before the divergence is finite
        ckpt = read_adapter(path)
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    if saved:
        assert line.endswith(f"is finite and kept: --resume {out} continues from it"), line
    else:
        assert line.endswith(f"no checkpoint was written to {out}"), line
    assert [name for name in os.listdir(out) if name.startswith(".tmp-")] == []


# 7. what a run writes

@pytest.mark.slow
def test_log_params_and_checkpoints(tiny, run_a):
    log = read_log(str(run_a))
    steps = [r for r in log if "step" in r]
    epochs = [r for r in log if "val_c_loss" in r]
    assert len(steps) + len(epochs) == len(log)
    assert [r["step"] for r in steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for r in steps:
        assert set(r) == STEP_KEYS
        assert r["epoch"] == (r["step"] - 1) // STEPS_PER_EPOCH
        assert all(math.isfinite(r[k]) for k in STEP_KEYS)
        assert 0.0 <= r["act_ratio"] <= 1.0 and r["tokens_per_s"] > 0
        progress = (r["step"] - 1) / STEPS_PER_EPOCH
        assert r["lr"] == schedule.learning_rate(progress, 5e-3, 1e-4, 0.5, 2)
        assert r["lambda"] == rate_loss_weight(progress, 1.0, 2)
    assert steps[0]["lr"] == 0.0 and steps[0]["lambda"] == 0.0
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert set(r) == EPOCH_KEYS and all(math.isfinite(v) for v in r.values())
        assert 0.0 <= r["val_act_ratio"] <= 1.0
    # the epoch lines follow their epoch's last step
    assert log.index(epochs[0]) == STEPS_PER_EPOCH and log[-1] == epochs[-1]
    # the rate loss is doing its job: execution falls from ~0.9 toward the 0.5 target
    assert epochs[-1]["val_act_ratio"] < steps[0]["act_ratio"] - 0.05

    params = model_params.read_args(str(run_a / "params.json"))
    expected = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=320, max_seq_len=48, lora_rank=4,
                    dynamic_active_target=0.5, dynamic_start_layer=1, dynamic_router_hdim=16,
                    dynamic_reserve_initials=2, dynamic_router_bias=(0.1, 2.0))
    assert {k: getattr(params, k) for k in expected} == expected

    assert sorted(os.listdir(run_a)) == [".lock", "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth",
                                         "curves.png", "log.jsonl", "params.json"]
    for name, epoch in (("checkpoint-0.pth", 1), ("checkpoint-1.pth", 2), ("checkpoint-last.pth", 2)):
        ckpt = read_adapter(str(run_a / name))
        assert (ckpt["epoch"], ckpt["step"]) == (epoch, 0)
        assert ckpt["model_args"] == json.loads((run_a / "params.json").read_text())
    # the final adapter loads into the base model for inference
    model = base_model.build_model(params, tiny["base"], str(run_a / "checkpoint-last.pth"))
    assert max_diff(adapters.adapter_state_dict(model), read_adapter(str(run_a / "checkpoint-last.pth"))["model"]) == 0
    assert glob.glob(str(run_a / ".tmp-*")) == []


# 8. the settings: one dataclass

def test_help_describes_every_flag_with_its_default_and_range(capsys):
    with pytest.raises(SystemExit) as e:
        finetuning.parse_args(["--help"])
    assert e.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (at hyphens too)
    squeezed = lambda phrase: "".join(phrase.split())  # noqa: E731
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name}" in text and squeezed(field.metadata["help"]) in text, field.name
    for phrase in ("records per step and process (default: 1) [>= 1]",
                   "share of routed blocks a token should execute (default: 0.5) [>= 0.0 and <= 1.0]",
                   "--overwrite_output_dir, --no-overwrite_output_dir"):
        assert squeezed(phrase) in text, phrase


def test_a_config_built_directly_is_checked_and_gives_the_model_args_by_name(tiny):
    with pytest.raises(InputError, match="--epochs 0: must be >= 1"):
        TrainConfig(llama_ckpt_dir=tiny["base"], epochs=0)
    config = TrainConfig(llama_ckpt_dir=tiny["base"], lora_rank=4, dynamic_router_bias=[0.5, 1.5])
    overrides = config.model_overrides()
    assert set(overrides) == {"max_seq_len", "lora_rank", "dynamic_active_target", "dynamic_router_hdim",
                              "dynamic_start_layer", "dynamic_reserve_initials", "dynamic_router_bias", "gumbel_tau",
                              "rate_loss_unit", "rate_loss_gap", "routing", "static_skip_layers", "dynamic_budget_range",
                              "dynamic_budget_routers", "dynamic_budget_lora", "dynamic_budget_draw_power"}
    args = model_params.load_params(tiny["base"], **overrides)
    assert (args.lora_rank, args.dynamic_router_bias) == (4, (0.5, 1.5))
