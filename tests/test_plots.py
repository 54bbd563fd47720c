"""The pictures draw the data they are given: training curves from a known log.jsonl, quality
against FLOPs ratio from known results, the routing grid from known cells; the command-line tools
and the training hook around them."""
import json
import os

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from dllm.errors import InputError
from dllm.plots import curves_figure, quality_flops_figure, read_log, routing_grid_figure, scaling_figure, \
    write_curves, write_curves_or_warn
from dllm.token_view import ALWAYS_ON, EXECUTED, RESERVED, SKIPPED, SequenceRouting
from tools import plot_quality_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step(n, epoch, c_loss, act_ratio):
    return {"step": n, "epoch": epoch, "c_loss": c_loss, "a_loss": abs(act_ratio - 0.4), "act_ratio": act_ratio,
            "lambda": n / 10, "lr": 1e-3 / n, "tokens_per_s": 100.0}


# two epochs of 3 logged steps; the run was resumed at step 5, which it logged again
LOG = [
    step(2, 0, 3.0, 0.9), step(4, 0, 2.8, 0.7), step(6, 0, 2.7, 0.6),
    {"epoch": 0, "val_c_loss": 2.9, "val_a_loss": 0.3, "val_act_ratio": 0.65},
    step(8, 1, 2.6, 0.5), step(10, 1, 9.9, 9.9),
    step(10, 1, 2.5, 0.45), step(12, 1, 2.4, 0.42),
    {"epoch": 1, "val_c_loss": 2.5, "val_a_loss": 0.1, "val_act_ratio": 0.43},
]


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LOG))
    (tmp_path / "params.json").write_text(json.dumps({"dynamic_active_target": 0.4}))
    return tmp_path


def xy(line):
    return list(line.get_xdata()), list(line.get_ydata())


def test_curves_draw_the_log(run_dir):
    steps, epochs = read_log(str(run_dir / "log.jsonl"))
    assert [s["step"] for s in steps] == [2, 4, 6, 8, 10, 12]
    assert steps[4]["c_loss"] == 2.5  # the line logged after the resume replaces the earlier one
    (ce, ratio), (lam, lr) = np.reshape(curves_figure(steps, epochs, 0.4).axes, (2, 2))
    x = [2, 4, 6, 8, 10, 12]
    assert xy(ce.lines[0]) == (x, [3.0, 2.8, 2.7, 2.6, 2.5, 2.4])
    assert xy(ce.lines[1]) == ([6, 12], [2.9, 2.5])  # validation at its epoch's last logged step
    assert xy(ratio.lines[0]) == (x, [0.9, 0.7, 0.6, 0.5, 0.45, 0.42])
    assert xy(ratio.lines[1]) == ([6, 12], [0.65, 0.43])
    assert list(ratio.lines[2].get_ydata()) == [0.4, 0.4]  # the target
    assert xy(lam.lines[0]) == (x, [n / 10 for n in x])
    assert xy(lr.lines[0]) == (x, [1e-3 / n for n in x])


@pytest.mark.slow
def test_write_curves_writes_a_png_beside_the_log(run_dir):
    path = write_curves(str(run_dir))
    assert path == str(run_dir / "curves.png")
    height, width, _ = imread(path).shape
    assert width > 600 and height > 400
    assert sorted(os.listdir(run_dir)) == ["curves.png", "log.jsonl", "params.json"]  # no temporary file left


def test_training_hook_warns_instead_of_failing(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "epoch": 0\n')
    warnings = []
    write_curves_or_warn(str(tmp_path), warnings.append)
    assert warnings == [f"curves.png not written: InputError: {tmp_path}/log.jsonl:1: not a JSON line"]
    assert not (tmp_path / "curves.png").exists()


def test_shipped_demo_log():
    steps, epochs = read_log(os.path.join(ROOT, "assets", "tiny-dllm", "log.jsonl"))
    assert len(steps) == 75 and len(epochs) == 3
    fig = curves_figure(steps, epochs, 0.5)
    assert list(fig.axes[1].lines[1].get_xdata()) == [250, 500, 750]
    assert list(fig.axes[1].lines[1].get_ydata()) == [e["val_act_ratio"] for e in epochs]


def results(tmp_path, name, rows):
    """evaluate.py's results.json; the dense run's in the bare-list layout of files written before
    results carried their provenance."""
    directory = tmp_path / name
    directory.mkdir()
    data = [{"dataset": d, "metric": m, "value": v, "flops_ratio": f, "kv_ratio": f, "n": 8} for d, m, v, f in rows]
    (directory / "results.json").write_text(json.dumps(data if name == "dense" else {"provenance": {}, "rows": data}))
    return str(directory)


def test_quality_flops_one_line_per_method(tmp_path):
    dense = results(tmp_path, "dense", [("demo", "ppl", 84.6, 1.0), ("piqa", "acc (loglik)", 0.5, 1.0)])
    high = results(tmp_path, "t05", [("demo", "ppl", 72.4, 0.6), ("piqa", "acc (loglik)", 0.5, 0.59)])
    low = results(tmp_path, "t03", [("demo", "ppl", 80.0, 0.45), ("piqa", "acc (loglik)", 0.375, 0.44)])
    runs = [plot_quality_flops.parse_run(r) for r in (f"dense={dense}", f"D-LLM={high}", f"D-LLM={low}/results.json")]
    fig = quality_flops_figure(runs)
    demo, piqa = [ax for ax in fig.axes if ax.get_visible()]
    assert demo.get_title() == "demo: ppl (lower is better)" and piqa.get_title() == "piqa: acc (loglik)"
    assert [line.get_label() for line in demo.lines] == ["dense", "D-LLM"]
    assert xy(demo.lines[0]) == ([1.0], [84.6])
    assert xy(demo.lines[1]) == ([0.45, 0.6], [80.0, 72.4])  # in FLOPs order, not command-line order
    assert xy(piqa.lines[1]) == ([0.44, 0.59], [0.375, 0.5])


def test_quality_flops_cli(tmp_path, monkeypatch):
    dense = results(tmp_path, "dense", [("demo", "ppl", 84.6, 1.0), ("piqa", "acc (loglik)", 0.5, 1.0)])
    out = tmp_path / "q.png"
    drawn = []
    monkeypatch.setattr(plot_quality_flops, "quality_flops_figure", lambda runs: drawn.append(runs) or Figure())
    plot_quality_flops.main([str(out), f"dense={dense}", "--datasets", "demo"])
    assert [(m, [r["dataset"] for r in rows]) for m, rows in drawn[0]] == [("dense", ["demo"])]
    assert imread(str(out)).shape[1] > 0
    with pytest.raises(InputError, match="expected METHOD=RESULTS_DIR"):
        plot_quality_flops.main([str(out), dense])
    with pytest.raises(InputError, match="no such results file"):
        plot_quality_flops.main([str(out), f"dense={tmp_path / 'missing'}"])


def baselines_table(tmp_path):
    """A benchmarks/baselines.py table of three runs, each with its evaluate.py results in eval/."""
    rows = []
    for method, seed, ppl in (("static_ppl", 0, 76.0), ("static_ppl", 1, 77.0), ("dllm", 0, 78.0)):
        run = tmp_path / f"{method}-0.5-s{seed}"
        run.mkdir()
        results(run, "eval", [("demo", "ppl", ppl, 0.57)])
        rows.append({"method": method, "target": 0.5, "seed": seed, "adapter": str(run / "checkpoint-last.pth")})
    table = tmp_path / "baselines.json"
    table.write_text(json.dumps(rows))
    return str(table)


def test_quality_flops_takes_the_seed_0_runs_of_a_baselines_table_under_their_methods_names(tmp_path):
    table = baselines_table(tmp_path)
    runs = plot_quality_flops.baseline_runs(table)
    assert [(label, [r["value"] for r in rows]) for label, rows in runs] == [
        ("static pruning (ppl)", [76.0]), ("D-LLM", [78.0])]
    assert [label for label, _ in plot_quality_flops.baseline_runs(f"D-LLM, per sequence={table}", ["dllm"])] == [
        "D-LLM, per sequence"]


@pytest.mark.parametrize("argv, message", [
    (["--baselines", "missing.json"], "missing.json: no such baselines file"),
    (["--baselines", "LABEL={table}"], "a LABEL names one line, but the table holds dllm, static_ppl"),
    (["--baselines", "{table}", "--methods", "dllm,static"], "--methods: unknown static; known: dense, dllm"),
    (["--baselines", "{bad}"], "not a benchmarks/baselines.py table"),
    ([], "nothing to plot"),
])
def test_quality_flops_refuses_a_bad_baselines_request_in_one_line(tmp_path, monkeypatch, argv, message):
    table = baselines_table(tmp_path)
    (tmp_path / "bad.json").write_text('[{"method": "dllm"}]')
    monkeypatch.chdir(tmp_path)
    argv = [a.format(table=table, bad=tmp_path / "bad.json") for a in argv]
    with pytest.raises(InputError, match=message):
        plot_quality_flops.main([str(tmp_path / "q.png")] + argv)


def test_routing_grid_draws_the_cells():
    kinds = [[ALWAYS_ON, RESERVED, RESERVED], [ALWAYS_ON, EXECUTED, SKIPPED], [ALWAYS_ON, SKIPPED, EXECUTED]]
    seq = SequenceRouting(pieces=["<s>", "A", " b"], n_prompt=2, kinds=kinds, exec_ratio=7 / 9, kv_ratio=7 / 9,
                          flops_ratio=0.8)
    ax = routing_grid_figure([seq]).axes[0]
    assert ax.images[0].get_array().tolist() == [[ALWAYS_ON] * 3, [RESERVED, EXECUTED, SKIPPED], [RESERVED, SKIPPED, EXECUTED]]
    assert list(ax.lines[0].get_xdata()) == [1.5, 1.5]  # generation starts after the 2 prompt tokens
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<s>", "A", " b"]
    assert ax.get_title().startswith("executed 77.8% | KV kept 77.8% | FLOPs 80.0%")


def scaling_cell(batch, context, dense_ms, dllm_ms, kv_mb):
    configs = {"dense": {"decode_ms_per_token": dense_ms, "decode_x_dense": 1.0, "kv_mb_per_row": 2 * kv_mb},
               "dllm@0.50": {"decode_ms_per_token": dllm_ms, "decode_x_dense": dense_ms / dllm_ms, "kv_mb_per_row": kv_mb}}
    return {"batch": batch, "context": context, "configs": configs}


def test_scaling_draws_each_configuration_against_context_and_leaves_out_skipped_cells():
    meta = {"model": "m", "dim": 8, "n_layers": 2, "device": "cpu"}
    cells = [scaling_cell(1, 256, 2.0, 1.0, 3.0), scaling_cell(1, 512, 4.0, 2.0, 6.0), scaling_cell(8, 256, 1.0, 0.5, 3.0),
             {"batch": 8, "context": 512, "skipped": "too long"}]
    fig = scaling_figure({"meta": meta, "cells": cells})
    decode_1, decode_8, kv, _, _, speed = fig.axes
    assert decode_1.get_title() == "decode, batch 1"
    assert [line.get_label() for line in decode_1.lines] == ["dense", "dllm@0.50"]
    assert xy(decode_1.lines[1]) == ([256, 512], [1.0, 2.0])
    assert xy(decode_8.lines[0]) == ([256], [1.0])  # the skipped cell is not drawn
    assert xy(kv.lines[0]) == ([256, 512], [6.0, 12.0])
    assert [line.get_label() for line in speed.lines[:2]] == ["dllm@0.50, batch 1", "dllm@0.50, batch 8"]
    with pytest.raises(InputError, match="no measured cells"):
        scaling_figure({"meta": meta, "cells": cells[3:]})
