"""benchmarks/baselines.py: the runs the sweep makes."""
import argparse
import json
import math
import os
import re

import pytest

from benchmarks import baselines
from benchmarks import dllm_attempts as attempts
from dllm.errors import InputError
from helpers import ROOT


def test_default_plan_is_every_method_at_every_target_with_seeds_where_the_spread_is_asked():
    runs = baselines.plan(baselines.parse_args([]))
    assert runs[0] == ("dense", 1.0, 0) and sum(m == "dense" for m, _, _ in runs) == 1
    for method in ("dllm", "mod", "static_ppl", "static_taylor", "early_exit"):
        mine = [(t, s) for m, t, s in runs if m == method]
        spread = [0, 1, 2] if method in ("dllm", "static_ppl", "static_taylor") else [0]
        assert mine == [(0.4, 0)] + [(0.5, s) for s in spread] + [(0.7, 0)]
    assert len(runs) == len(set(runs)) == 1 + 5 * 3 + 3 * 2


def test_every_recipe_variable_is_one_finetuning_sh_reads_and_others_are_refused():
    """--recipe passes its variables to finetuning.sh: each name it accepts must be one the script reads
    (a misspelt or dropped variable would train with the default silently), e.g. the dial recipe's
    ROW_RELATIVE_LOSS for static pruning's runs."""
    with open(os.path.join(ROOT, "finetuning.sh")) as f:
        read = {line.split("=", 1)[0] for line in f if re.match(r"^[A-Z_]+=\$\{[A-Z_]+", line)}
    assert baselines.FINETUNING_VARIABLES <= read, baselines.FINETUNING_VARIABLES - read
    assert baselines.parse_recipe("EPOCHS=1 ROW_RELATIVE_LOSS=1") == {"EPOCHS": "1", "ROW_RELATIVE_LOSS": "1"}
    with pytest.raises(argparse.ArgumentTypeError, match="'ROW_RELATIVE=1': expected NAME=VALUE"):
        baselines.parse_recipe("ROW_RELATIVE=1")


def test_extra_runs_follow_the_plan_and_a_malformed_one_is_refused():
    runs = baselines.plan(baselines.parse_args(["--methods", "dllm", "--targets", "0.5", "--spread_methods", "none",
                                                "--extra_runs", "static_ppl:0.54,dllm:0.6:2"]))
    assert runs == [("dllm", 0.5, 0), ("static_ppl", 0.54, 0), ("dllm", 0.6, 2)]
    for bad in ("static:0.5", "dllm:half", "dllm", "dllm:0.5:1:2"):
        with pytest.raises(InputError, match=f"--extra_runs '{bad}': expected METHOD:TARGET"):
            baselines.plan(baselines.parse_args(["--extra_runs", bad]))


@pytest.mark.parametrize("retime", [False, True])
def test_a_finished_run_is_reused_and_retime_replaces_only_its_speedups(tmp_path, monkeypatch, retime):
    """Its quality comes from evaluate.py's results (top-1 agreement too), its timings from row.json
    unless --retime times them again."""
    args = baselines.parse_args(["--work_dir", str(tmp_path)] + (["--retime"] if retime else []))
    row = {"method": "dllm", "target": 0.5, "seed": 0, "flops_ratio": 0.6, "kv_ratio": 0.5, "val_ce": 4.3,
           "val_ppl": 73.7, "prefill_speedup": 1.1, "decode_speedup": 1.2, "blocks_per_token": 4.2,
           "blocks_std_in_sequence": 0.7,
           "adapter": "runs/x/dllm-0.5-s0/checkpoint-last.pth"}
    os.makedirs(tmp_path / "dllm-0.5-s0" / "eval")
    (tmp_path / "dllm-0.5-s0" / "row.json").write_text(json.dumps(row))
    results = [{"dataset": "demo", "metric": "ppl", "value": 70.0, "flops_ratio": 0.61, "kv_ratio": 0.52},
               {"dataset": "demo", "metric": "top-1 agreement", "value": 0.2, "flops_ratio": 0.61, "kv_ratio": 0.52}]
    (tmp_path / "dllm-0.5-s0" / "eval" / "results.json").write_text(json.dumps({"rows": results}))
    built = []
    monkeypatch.setattr(baselines, "fine_tune", lambda *a: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(baselines, "build", lambda args, adapter=None: built.append(adapter) or "generator")
    monkeypatch.setattr(baselines, "speedups", lambda dense, generator, text, args: (2.0, 3.0))
    measured = baselines.measure(args, "dense", [], None, "dllm", 0.5, 0)
    expected = dict(row, flops_ratio=0.61, kv_ratio=0.52, val_ce=pytest.approx(math.log(70.0)), val_ppl=70.0,
                    top1_agreement=0.2)
    if retime:
        expected.update(prefill_speedup=2.0, decode_speedup=3.0)
    assert measured == expected
    assert json.loads((tmp_path / "dllm-0.5-s0" / "row.json").read_text()) == expected
    assert built == ([os.path.join(ROOT, row["adapter"])] if retime else [])
    assert "| 0.200 |" in baselines.markdown([measured], args)


def test_a_fine_tune_sees_the_recipe_flags_and_not_the_callers_shell(tmp_path, monkeypatch, capsys):
    """A stray MODEL_PATH, LR or ROUTING in the caller's environment never reaches a baseline run; the
    recipe comes from --recipe alone."""
    for name, value in (("MODEL_PATH", "/elsewhere"), ("LR", "1.0"), ("ROUTING", "mod"), ("EPOCHS", "9")):
        monkeypatch.setenv(name, value)
    args = baselines.parse_args(["--recipe", "EPOCHS=1 ROUTER_BIAS='1.0 1.0' ROUTER_LR="])
    started = []
    monkeypatch.setattr(baselines, "run", lambda command, env: started.append((command, env)))
    baselines.fine_tune(args, "dllm", 0.5, 3, str(tmp_path / "run"))
    (command, env), = started
    assert command == ["bash", "finetuning.sh"]
    assert "LR" not in env and env["MODEL_PATH"] == args.llama_ckpt_dir and env["ROUTING"] == "dllm"
    assert (env["EPOCHS"], env["ROUTER_BIAS"], env["ROUTER_LR"], env["SEED"]) == ("1", "1.0 1.0", "", "3")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT
    with pytest.raises(SystemExit):
        baselines.parse_args(["--recipe", "MODEL_PATH=/elsewhere"])
    assert "--recipe: 'MODEL_PATH=/elsewhere': expected NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("left", ["nothing", "a directory", "a checkpoint"])
def test_a_sweep_stopped_mid_fine_tune_continues_it(tmp_path, monkeypatch, left):
    """A run with a checkpoint resumes from it; one stopped before its first checkpoint starts over."""
    out_dir = tmp_path / "run"
    if left != "nothing":
        out_dir.mkdir()
        (out_dir / "log.jsonl").write_text("")
    if left == "a checkpoint":
        (out_dir / "checkpoint-last.pth").write_bytes(b"")
    started = []
    monkeypatch.setattr(baselines, "run", lambda command, env: started.append(env))
    baselines.fine_tune(baselines.parse_args([]), "dllm", 0.5, 0, str(out_dir))
    (env,) = started
    assert (env.get("RESUME"), env.get("OVERWRITE")) == {"nothing": (None, None), "a directory": (None, "1"),
                                                         "a checkpoint": (str(out_dir), None)}[left]


def test_each_run_is_measured_against_the_base_once_per_split(tmp_path, monkeypatch):
    import benchmarks.fidelity

    out = tmp_path / "b.json"
    args = baselines.parse_args(["--out", str(out), "--fidelity_splits", "validation,test", "--fidelity_records", "40"])
    (tmp_path / "b_fidelity_validation.json").write_text(json.dumps({"runs": {"dllm:0.5-s1": {}}}))
    measured = []
    monkeypatch.setattr(benchmarks.fidelity, "main", lambda config, command: measured.append(
        (config.split, config.records, config.runs, config.out, config.append)))
    baselines.fidelity(args, {"method": "dllm", "target": 0.5, "seed": 1, "adapter": "runs/a/checkpoint-last.pth"})
    assert measured == [("test", 40, f"dllm:0.5-s1={os.path.join(ROOT, 'runs/a/checkpoint-last.pth')}",
                         str(tmp_path / "b_fidelity_test.json"), True)]


def test_every_attempt_sets_only_variables_finetuning_sh_reads_and_the_teacher_runs_first():
    with open(os.path.join(ROOT, "finetuning.sh")) as f:
        script = f.read()
    for attempt in attempts.ATTEMPTS:
        for name in attempt.variables:
            assert f"{name}=${{{name}" in script, (attempt.name, name)
    names = [a.name for a in attempts.ATTEMPTS]
    users = [n for a, n in zip(attempts.ATTEMPTS, names) if attempts.TEACHER in a.variables.values()]
    assert users and all(names.index("dense") < names.index(n) for n in users)


def test_attempts_are_set_against_static_pruning_interpolated_at_their_flops():
    sweep = [dict(method="static_ppl", target=0.4, flops_ratio=0.4, val_ce=5.0),
             dict(method="static_ppl", target=0.5, flops_ratio=0.5, val_ce=4.0),
             dict(method="static_ppl", target=0.5, flops_ratio=0.5, val_ce=4.2),
             dict(method="dllm", target=0.5, flops_ratio=0.6, val_ce=0.0)]
    curve = attempts.static_curve(sweep)
    assert curve == [(0.4, 5.0), (0.5, 4.1)]
    assert attempts.interpolate(curve, 0.45) == pytest.approx(4.55)
    assert attempts.interpolate(curve, 0.6) is None


def test_the_results_file_keeps_every_finished_run_of_the_plan_whatever_is_still_running(tmp_path):
    """A sweep restarted with more seeds rewrites its file after each run: the runs planned after the
    one in progress are in it already when they are done, so stopping the sweep loses none."""
    args = baselines.parse_args(["--work_dir", str(tmp_path), "--methods", "static_kl", "--targets", "0.9,0.5",
                                 "--spread_methods", "static_kl", "--spread_target", "0.9", "--spread_seeds", "0,1"])
    runs = baselines.plan(args)
    assert runs == [("static_kl", 0.9, 0), ("static_kl", 0.9, 1), ("static_kl", 0.5, 0)]
    for method, target, seed in (runs[0], runs[2]):
        os.makedirs(baselines.run_dir(args, method, target, seed))
        (tmp_path / f"{method}-{target:g}-s{seed}" / "row.json").write_text(json.dumps({"target": target, "seed": seed}))
    assert baselines.finished_rows(args, runs) == [{"target": 0.9, "seed": 0}, {"target": 0.5, "seed": 0}]
