"""Bad inputs and faults on the training side (finetuning.py, finetuning.sh, the launcher, adapter
checkpoints): each is refused with one line naming what is wrong and what is allowed, with no
traceback and a non-zero exit status, before the model loads where it can be, and nothing of value
is lost: the earlier run in the output directory is byte for byte what it was.
"""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import finetuning
from dllm.checkpoints import adapters, base_model
from dllm.errors import InputError
from dllm.checkpoints import model_params
from helpers import ROOT, free_port, one_line_error, one_torch_thread, read_log, subprocess_env, train_argv

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(directory) -> dict:
    """Every file of a run but its lock (which holds the pid of whoever holds it)."""
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory)) if name != ".lock"}


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished one-epoch run: what a bad command must leave alone."""
    out = tmp_path_factory.mktemp("bad-inputs") / "finished"
    with one_torch_thread():
        finetuning_run(tiny, out)
    return out


def finetuning_run(tiny, out, *extra, **options):
    from dllm.training.loop import train
    train(finetuning.parse_args(argv(tiny, out, *extra, **options)))


def argv(tiny, out, *extra, **options):
    return train_argv(tiny["base"], tiny["data"], str(out), *extra, **dict(dict(epochs=1), **options))


@pytest.fixture
def used(finished, tmp_path):
    """A copy of the finished run, and its files as they were."""
    out = tmp_path / "used"
    shutil.copytree(finished, out)
    return out, snapshot(out)


# 1. settings out of range or inconsistent, even with --overwrite_output_dir on a used directory:
# refused before anything of the earlier run is removed

@pytest.mark.parametrize("options, message", [
    (dict(epochs=0), "--epochs 0: must be >= 1"),
    (dict(save_freq=0), "--save_freq 0: must be >= 1"),
    (dict(batch_size=0), "--batch_size 0: must be >= 1"),
    (dict(accum_iter=0), "--accum_iter 0: must be >= 1"),
    (dict(dynamic_active_target=1.5), "--dynamic_active_target 1.5: must be >= 0.0 and <= 1.0"),
    (dict(dynamic_active_target=-0.1), "--dynamic_active_target -0.1: must be >= 0.0 and <= 1.0"),
    (dict(lora_rank=-1), "--lora_rank -1: must be >= 0"),
    (dict(dynamic_reserve_initials=-2), "--dynamic_reserve_initials -2: must be >= 0"),
    (dict(lr=0), "--lr 0.0: must be > 0.0"),
    (dict(warmup_epochs=-1), "--warmup_epochs -1.0: must be >= 0.0"),
    (dict(max_seq_len=1), "--max_seq_len 1: must be >= 2"),
    (dict(save_steps=-5), "--save_steps -5: must be >= 0"),
    (dict(dynamic_router_bias="[0.1]"), "--dynamic_router_bias [0.1]: must be two numbers, [skip, execute]"),
    (dict(dynamic_start_layer=3), "--dynamic_start_layer 3: must be < n_layers = 3 ({base}/params.json)"),
    (dict(routing="static", static_skip_layers="[1, 7]"), "--static_skip_layers 7: must be < n_layers = 3 ({base}/params.json)"),
    (dict(accum_iter=100), "demo: 32 training records give fewer batches than --accum_iter"),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "")
def test_a_bad_setting_is_one_line_and_the_earlier_run_stays(tiny, used, capsys, options, message):
    out, before = used
    line = one_line_error(capsys, argv(tiny, out, "--overwrite_output_dir", **options))
    assert line == "error: " + message.format(base=tiny["base"])
    assert snapshot(out) == before


@pytest.mark.parametrize("args, message", [
    (["--epoch", "2"], "unrecognized arguments: --epoch 2"),
    (["--batch_size", "two"], "argument --batch_size: expected an integer, got 'two'"),
    (["--routing", "fast"], "argument --routing: invalid choice: 'fast'"),
    (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
])
def test_a_misspelled_or_mistyped_flag_stops_before_any_work(tiny, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        finetuning.parse_args(argv(tiny, tmp_path / "out") + args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err), err
    assert not (tmp_path / "out").exists()


# 2. model files

def _params_with(tiny, tmp_path, **changes) -> str:
    params = json.loads(open(os.path.join(tiny["base"], "params.json")).read())
    params.update(changes)
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    return str(path)


@pytest.mark.parametrize("changes, message", [
    (dict(dim="32"), 'dim is "32"; expected an integer'),
    (dict(norm_eps=None), "norm_eps is null; expected a number"),
    (dict(n_layers=3.5), "n_layers is 3.5; expected an integer"),
    (dict(n_kv_heads=True), "n_kv_heads is true; expected an integer or null"),
])
def test_params_json_with_a_wrong_type_names_file_key_value_and_type(tiny, used, tmp_path, capsys, changes, message):
    out, before = used
    path = _params_with(tiny, tmp_path, **changes)
    line = one_line_error(capsys, argv(tiny, out, "--overwrite_output_dir", llama_param_path=path))
    assert line == f"error: {path}: {message}"
    assert snapshot(out) == before


def test_config_json_with_a_wrong_type(tiny, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    config = dict(model_type="llama", hidden_size="32", num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, intermediate_size=96, rms_norm_eps=1e-5)
    (hf / "config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, argv(tiny, tmp_path / "out", llama_param_path=str(hf / "config.json")))
    assert line == f'error: {hf / "config.json"}: hidden_size is "32"; expected an integer'
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_of_another_size_than_the_vocabulary(tiny, used, tmp_path, capsys):
    out, before = used
    path = _params_with(tiny, tmp_path, vocab_size=2048)
    line = one_line_error(capsys, argv(tiny, out, "--overwrite_output_dir", llama_param_path=path))
    assert line == (f"error: {tiny['base']}: 320 tokens but the model's vocab_size is 2048 "
                    f"(the tokenizer does not belong to this model)")
    assert snapshot(out) == before


def test_a_text_file_named_tokenizer_model(tiny, tmp_path, capsys):
    fake = tmp_path / "tokenizer.model"
    fake.write_text("not a tokenizer\n")
    line = one_line_error(capsys, argv(tiny, tmp_path / "out", tokenizer_path=str(fake)))
    assert line.startswith(f"error: {fake}: not a SentencePiece model")


def test_a_shard_count_mismatch_says_how_many_processes_to_run(tiny, tmp_path, capsys):
    line = one_line_error(capsys, train_argv(tiny["base_mp2"], tiny["data"], str(tmp_path / "out")))
    assert line == (f"error: {tiny['base_mp2']} has 2 checkpoint shard(s) but model parallel size is 1; "
                    f"run it with 2 model-parallel processes (or reshard it)")


def _damaged_copy(tiny, tmp_path, change) -> str:
    base = tmp_path / "base"
    shutil.copytree(tiny["base"], base)
    weights = torch.load(base / "consolidated.00.pth", weights_only=True)
    change(weights)
    torch.save(weights, base / "consolidated.00.pth")
    return str(base)


def test_base_weights_holding_nan_are_blamed_and_nothing_is_saved(tiny, tmp_path, capsys):
    def poison(weights):
        weights["layers.0.feed_forward.w1.weight"][0, 0] = float("nan")

    base, out = _damaged_copy(tiny, tmp_path, poison), tmp_path / "out"
    line = one_line_error(capsys, train_argv(base, tiny["data"], str(out), epochs=1, save_steps=1))
    assert line == (f"error: non-finite loss at epoch 0 step 0: the base weights in {base} hold NaN or inf: the "
                    f"base checkpoint is damaged, re-download or re-convert it; no checkpoint was written to {out}")
    assert not list(out.glob("*.pth"))


# 3. the output directory

def test_a_fresh_run_into_a_used_directory_is_refused(tiny, used, capsys):
    out, before = used
    line = one_line_error(capsys, argv(tiny, out))
    assert line == (f"error: {out} already holds a run (checkpoint-0.pth, checkpoint-last.pth, log.jsonl); continue it "
                    f"with --resume {out}, or start over with --overwrite_output_dir")
    assert snapshot(out) == before


def test_a_directory_in_use_by_another_run_is_refused(tiny, used, capsys):
    out, before = used
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        line = one_line_error(capsys, argv(tiny, out, "--overwrite_output_dir"))
    assert line == (f"error: {out} is in use by another training run (pid 4242); wait for it to end, or choose "
                    f"another output directory")
    assert snapshot(out) == before


def test_an_output_directory_that_is_a_file(tiny, tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("precious\n")
    line = one_line_error(capsys, argv(tiny, blocker))
    assert line.startswith(f"error: cannot use output directory {blocker}: ")
    assert blocker.read_text() == "precious\n"


def test_overwrite_starts_over(tiny, used):
    out, before = used
    finetuning_run(tiny, out, "--overwrite_output_dir", seed=3)
    log = read_log(str(out))
    assert [r["step"] for r in log if "step" in r] == list(range(1, 9)) and len(log) == 9  # the new run's lines only
    assert adapters.read_adapter(str(out / "checkpoint-last.pth"))["args"]["seed"] == 3
    assert snapshot(out)["checkpoint-last.pth"] != before["checkpoint-last.pth"]


# 4. resume

@pytest.mark.parametrize("options, name, saved, given", [
    (dict(batch_size=8), "batch_size", 4, 8),
    (dict(dataset_name="alpaca"), "dataset_name", "demo", "alpaca"),
    (dict(dynamic_active_target=0.3), "dynamic_active_target", 0.5, 0.3),
])
def test_resuming_with_another_recipe_names_both_values(tiny, used, capsys, options, name, saved, given):
    out, before = used
    line = one_line_error(capsys, argv(tiny, out, resume=str(out), epochs=2, **options))
    assert line == (f"error: {out / 'checkpoint-last.pth'} was trained with --{name} {saved} but this run has "
                    f"--{name} {given}; resume with the same value, or start a new run elsewhere")
    assert snapshot(out) == before


def test_a_checkpoint_with_flipped_bytes_is_a_checksum_mismatch(tiny, used, capsys):
    out, _ = used
    path = out / "checkpoint-last.pth"
    ckpt = torch.load(path, weights_only=True)
    name = sorted(ckpt["model"])[0]
    raw = path.read_bytes()
    # flip the bytes of the first tensor's first value where torch stored them
    value = ckpt["model"][name].flatten()[0:2].numpy().tobytes()
    assert raw.count(value) == 1
    path.write_bytes(raw.replace(value, bytes(b ^ 0xFF for b in value)))
    line = one_line_error(capsys, argv(tiny, out, resume=str(out), epochs=2))
    assert line == f"error: checksum mismatch in {path}: its tensors changed after it was written (a damaged copy)"
    with pytest.raises(InputError, match="checksum mismatch in"):
        adapters.read_adapter(str(path))


def test_an_adapter_on_another_base_of_the_same_shape_names_both_fingerprints(tiny, finished, tmp_path, capsys):
    other = _damaged_copy(tiny, tmp_path, lambda w: [t.neg_() for t in w.values() if t.ndim == 2])
    params = model_params.read_args(str(finished / "params.json"))
    with pytest.raises(InputError) as e:
        base_model.build_model(params, other, str(finished / "checkpoint-last.pth"))
    saved = adapters.read_adapter(str(finished / "checkpoint-last.pth"))["base_fingerprint"]
    message = str(e.value)
    assert message.startswith(f"{finished / 'checkpoint-last.pth'}: trained on another base model "
                              f"({adapters.fingerprint_text(saved)}) than the one loaded (params ")
    assert adapters.fingerprint_text(saved) != message.split("than the one loaded (")[1].rstrip(")")
    # on its own base it loads
    base_model.build_model(params, tiny["base"], str(finished / "checkpoint-last.pth"))


def test_resuming_a_finished_run_says_there_is_nothing_left_to_do(tiny, used, capsys):
    out, before = used
    finetuning_run(tiny, out, resume=str(out))
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("nothing left to do: ")
    assert snapshot(out) == before
    assert [r["epoch"] for r in read_log(str(out)) if "val_c_loss" in r] == [0]


# 5. finetuning.sh and the launcher: the worker's line last, the worker's exit status

def _finetuning_sh(tiny, out, timeout=600, **env):
    variables = dict(MODEL_PATH=tiny["base"], DATASET_PATH=tiny["data"], OUTPUT_PATH=str(out), MAX_SEQ_LEN="48",
                     DYNAMIC_ROUTER_HDIM="16", DYNAMIC_START_LAYER="1", BATCH_SIZE="4", EPOCHS="1",
                     MASTER_PORT=str(free_port()))
    variables.update(env)
    environment = dict(subprocess_env(), **variables)
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment["PATH"]
    return subprocess.run(["bash", os.path.join(ROOT, "finetuning.sh")], env=environment, capture_output=True,
                          text=True, timeout=timeout)


def _last_line(proc) -> str:
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", ["1", "2"])
def test_finetuning_sh_passes_the_workers_exit_status_and_line(tiny, used, nproc):
    out, before = used
    proc = _finetuning_sh(tiny, out, NPROC=nproc, OVERWRITE="1", SAVE_FREQ="0")
    assert proc.returncode == 1 and _last_line(proc) == "error: --save_freq 0: must be >= 1", proc.stderr[-2000:]
    assert proc.stderr.count("error: ") == 1
    if nproc != "1":  # argparse's status 2 through the launcher (python itself passes it on)
        proc = _finetuning_sh(tiny, out, NPROC=nproc, EXTRA_ARGS="--epoch 2")
        assert proc.returncode == 2 and _last_line(proc).endswith("error: unrecognized arguments: --epoch 2")
    assert snapshot(out) == before


@pytest.mark.slow
def test_a_diverging_run_ends_on_its_error_line_with_a_finite_checkpoint(tiny, tmp_path):
    out = tmp_path / "out"
    proc = _finetuning_sh(tiny, out, NPROC="1", LR="1e12", ROUTER_LR="1e12", WARMUP_EPOCHS="0", SAVE_STEPS="1")
    assert proc.returncode == 1 and proc.stderr.count("error: ") == 1
    line = _last_line(proc)
    assert line.startswith("error: non-finite loss at epoch 0 step ") and "lower the learning rate" in line, line
    assert proc.stderr.endswith(line + "\n")  # no progress bar redrawn after it
    for path in out.glob("*.pth"):
        assert all(torch.isfinite(t).all() for t in adapters.read_adapter(str(path))["model"].values())


@pytest.mark.slow
def test_finetuning_sh_refuses_a_used_directory_under_the_launcher(tiny, used):
    out, before = used
    proc = _finetuning_sh(tiny, out, NPROC="2")
    assert proc.returncode == 1
    assert _last_line(proc).startswith(f"error: {out} already holds a run") and proc.stderr.count("error: ") == 1
    assert snapshot(out) == before


@pytest.mark.slow
def test_killing_the_launcher_ends_its_workers_and_frees_the_directory(tiny, tmp_path):
    out = tmp_path / "out"
    variables = dict(MODEL_PATH=tiny["base"], DATASET_PATH=tiny["data"], OUTPUT_PATH=str(out), MAX_SEQ_LEN="48",
                     DYNAMIC_ROUTER_HDIM="16", DYNAMIC_START_LAYER="1", BATCH_SIZE="4", EPOCHS="1000",
                     NPROC="2", MASTER_PORT=str(free_port()))
    environment = dict(subprocess_env(), **variables)
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment["PATH"]
    launcher = subprocess.Popen(["bash", os.path.join(ROOT, "finetuning.sh")], env=environment,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600  # generous: a loaded machine starts two workers slowly
        while not (out / "log.jsonl").exists():
            assert launcher.poll() is None and time.time() < deadline, "the run never started training"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGKILL)  # bash exec'd the launcher: this is it
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    # an orphaned worker would train on for 1000 epochs holding the lock; a dead one has let it go
    # (a process releases its files when its last thread has exited, so poll the lock itself)
    deadline = time.time() + 120
    with open(out / ".lock", "a+") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() < deadline, "a worker outlived its launcher: the directory is still locked"
                time.sleep(0.2)
