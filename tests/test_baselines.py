"""benchmarks/baselines.py: the runs the sweep makes (its smoke run is in the report of issue 9)."""
from conftest import load_script

baselines = load_script("benchmarks/baselines.py")


def test_default_plan_is_every_method_at_every_target_with_seeds_where_the_spread_is_asked():
    runs = baselines.plan(baselines.parse_args([]))
    assert runs[0] == ("dense", 1.0, 0) and sum(m == "dense" for m, _, _ in runs) == 1
    for method in ("dllm", "mod", "static_ppl", "static_taylor", "early_exit"):
        mine = [(t, s) for m, t, s in runs if m == method]
        spread = [0, 1, 2] if method in ("dllm", "static_ppl", "static_taylor") else [0]
        assert mine == [(0.4, 0)] + [(0.5, s) for s in spread] + [(0.7, 0)]
    assert len(runs) == len(set(runs)) == 1 + 5 * 3 + 3 * 2
