"""What an adapter keeps of its base (dllm/fidelity.py): the base against itself keeps everything at
full compute; a routed model's compute splits into prompt and response, prefill and decode."""
import json

import pytest

from dllm.data import Record
from dllm.fidelity import Sums, generation, summary, teacher_forced
from dllm.generation import Llama
from dllm.core.routing import DenseRouting
from helpers import make_generator

RECORDS = [Record("The quick brown fox", " jumps over the lazy dog."),
           Record("She sold 48 clips in April and", " half as many in May."),
           Record("Question: Which option is correct? Answer:", " A")]


@pytest.fixture(scope="module")
def models(tokenizer_path):
    routed = make_generator(tokenizer_path)
    base = make_generator(tokenizer_path)
    base.model.use_routing(DenseRouting())
    return routed, base


def measure(model: Llama, base: Llama) -> dict:
    sums = Sums()
    teacher_forced(model.model, base.model, model.tokenizer, RECORDS, sums, batch_size=2)
    generation(model, base, RECORDS, sums, max_gen_len=6, stop_ids=model.tokenizer.stop_ids)
    return summary(sums, model.model.n_layers)


@pytest.mark.slow
def test_the_base_against_itself_keeps_everything_at_full_compute(models):
    _, base = models
    result = measure(base, base)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    for key in ("top1_agreement", "gen_exact", "gen_first_words", "gen_rouge_l", "share_prompt", "share_response",
                "share_prefill", "share_decode"):
        assert result[key] == 1.0, key
    for key in ("flops_prompt", "flops_response", "flops_all", "flops_prefill", "flops_decode", "flops_generation"):
        assert result[key] == pytest.approx(1.0, rel=1e-12), key


@pytest.mark.slow
def test_a_routed_model_loses_some_of_the_base_and_saves_compute(models):
    routed, base = models
    result = measure(routed, base)
    assert result["kl"] > 0.01 and result["top1_agreement"] < 1
    assert 0 < result["share_prompt"] < 1 and 0 < result["share_response"] < 1
    assert result["flops_all"] < 1 and result["flops_generation"] < 1
    assert 0 < result["share_prefill"] < 1 and 0 < result["share_decode"] < 1
    assert result["answers"] == len(RECORDS)


def _row(routing: str, flops_all: float, flops_generation: float, kl: float) -> dict:
    return {"routing": routing, "flops_all": flops_all, "flops_generation": flops_generation, "kl": kl,
            "gen_first_words": 1 - kl, "gen_rouge_l": 1 - kl / 2}


def test_runs_are_set_against_static_pruning_at_equal_flops():
    from benchmarks.fidelity import against_static
    from dllm.curves import curve_points, interpolate

    rows = {"static_ppl:14": _row("static", 0.6, 0.62, 0.5), "static_ppl:10": _row("static", 0.8, 0.81, 0.2),
            "dllm:a": _row("dllm", 0.7, 0.75, 0.3), "dllm:b": _row("dllm", 0.9, 0.9, 0.1)}
    assert interpolate(curve_points(rows, "static_ppl", "flops_all", "kl"), 0.7) == pytest.approx(0.35)
    assert against_static(rows, "dllm:a", "flops_all", "static_ppl") == "-0.050"
    # in generation the same run sits further along static's curve
    assert against_static(rows, "dllm:a", "flops_generation", "static_ppl") == f"{0.3 - (0.5 - 0.3 * 13 / 19):+.3f}"
    assert against_static(rows, "dllm:b", "flops_all", "static_ppl") == "outside its curve"
    assert against_static(rows, "static_ppl:14", "flops_all", "static_ppl") == ""
    # another reference method: its own runs, not static_ppl's
    rows["static_kl:1"], rows["static_kl:6"] = _row("static", 0.6, 0.62, 0.4), _row("static", 0.8, 0.81, 0.1)
    assert against_static(rows, "dllm:a", "flops_all", "static_kl") == "+0.050"


def test_seeds_of_one_point_are_averaged_on_its_curve():
    from dllm.curves import curve_points, interpolate, point_of

    assert point_of("static_kl:0.93-s1") == point_of("static_kl:0.93-s0") == "static_kl:0.93"
    assert point_of("dllm:t0.85") == "dllm:t0.85"
    rows = {"static_kl:0.93-s0": _row("static", 0.9, 0.9, 0.2), "static_kl:0.93-s1": _row("static", 0.92, 0.92, 0.4),
            "static_kl:0.8-s0": _row("static", 0.7, 0.7, 0.8), "dllm:0.85-s0": _row("dllm", 0.8, 0.8, 0.1)}
    points = curve_points(rows, "static_kl", "flops_all", "kl")
    assert [(p.x, p.y, p.low, p.high, p.seeds) for p in points] == [
        (0.7, 0.8, 0.8, 0.8, 1), (pytest.approx(0.91), pytest.approx(0.3), 0.2, 0.4, 2)]
    # between the single seed at 0.7 and the two seeds' mean at 0.91, not the zig-zag through each seed
    assert interpolate(points, 0.8) == pytest.approx(0.8 + (0.3 - 0.8) * 0.1 / 0.21)
    assert interpolate(points, 0.95) is None


def test_a_run_may_name_its_budget_and_a_malformed_one_is_one_line():
    from benchmarks.fidelity import parse_runs
    from dllm.errors import InputError

    assert parse_runs("dial:0.6=runs/a.pth@0.6; dllm:t=runs/b.pth") == [("dial:0.6", "runs/a.pth", 0.6),
                                                                         ("dllm:t", "runs/b.pth", None)]
    for bad in ("x=runs/a.pth@high", "x=@0.5", "=runs/a.pth", "runs/a.pth"):
        with pytest.raises(InputError, match="expected label=adapter or label=adapter@budget"):
            parse_runs(bad)


def test_fidelity_picture_has_a_line_per_method_through_the_mean_of_its_seeds():
    from dllm.plots import fidelity_figure

    rows = {"static_ppl:14": _row("static", 0.6, 0.62, 0.5), "static_ppl:10": _row("static", 0.8, 0.81, 0.2),
            "dllm:a-s0": _row("dllm", 0.7, 0.75, 0.3), "dllm:a-s1": _row("dllm", 0.7, 0.75, 0.5)}
    kl_panel = fidelity_figure(rows).axes[0]
    lines = {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in kl_panel.containers}
    assert lines == {"static_ppl": ([0.62, 0.81], [0.5, 0.2]), "dllm": ([0.75], [pytest.approx(0.4)])}


def test_append_refuses_a_run_measured_another_way(tmp_path):
    from benchmarks.fidelity import FidelityConfig, earlier
    from dllm.errors import InputError

    out = tmp_path / "f.json"
    out.write_text('{"meta": {"base_model": "m", "dataset": "smol", "split": "validation", "max_gen_len": 96, '
                   '"records": 3, "commands": []}, "runs": {"dllm:a": {}}}')
    config = FidelityConfig(llama_ckpt_dir="m", runs="x=y", out=str(out), append=True, split="test")
    with pytest.raises(InputError, match="its runs have split 'validation', this one 'test'"):
        earlier(config, ["dllm:b"])
    config = FidelityConfig(llama_ckpt_dir="m", runs="x=y", out=str(out), append=True)
    with pytest.raises(InputError, match="already has runs dllm:a"):
        earlier(config, ["dllm:a"])
    assert list(earlier(config, ["dllm:b"])[1]) == ["dllm:a"]
    with pytest.raises(InputError, match="exists; pass --append"):
        earlier(FidelityConfig(llama_ckpt_dir="m", runs="x=y", out=str(out)), ["dllm:b"])


def test_plot_fidelity_draws_a_file_as_another_method_and_refuses_a_label_two_files_share(tmp_path):
    from dllm.errors import InputError
    from tools.plot_fidelity import load_runs

    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"runs": {"dllm:0.85-s0": _row("dllm", 0.9, 0.9, 0.2)}}))
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    assert sorted(load_runs([a, f"{b}=dllm_response"])) == ["dllm:0.85-s0", "dllm_response:0.85-s0"]
    with pytest.raises(InputError, match=r"b.json: run 'dllm:0.85-s0' is in an earlier file too"):
        load_runs([a, b])
