"""The shipping rule (dllm/curves.shipping_pick, tools/ship_by_rule.py): the lowest generation FLOPs
whose answers keep half of the base's first ten words, chosen on validation results only, and the
SmolLM2 adapter in assets/ is the pick its committed results file names."""
import json
import os

import pytest

from dllm.checkpoints.adapters import read_adapter
from dllm.curves import shipping_pick
from dllm.errors import InputError
from tools import ship_by_rule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ADAPTER = os.path.join(ROOT, "assets", "tiny-dllm", "checkpoint.pth")


def run(flops: float, first_words: float, kl: float, adapter: str = TINY_ADAPTER) -> dict:
    return {"adapter": adapter, "budget": None, "flops_generation": flops, "gen_first_words": first_words, "kl": kl,
            "top1_agreement": 1 - kl, "gen_rouge_l": first_words}


def test_the_rule_takes_the_cheapest_run_that_keeps_half_the_first_words():
    runs = {"dense": run(1.0, 0.8, 0.01), "dllm:0.9": run(0.93, 0.5, 0.1), "dllm:0.5": run(0.7, 0.2, 1.0),
            "static:1": run(0.93, 0.55, 0.08)}
    assert shipping_pick(runs) == "static:1"  # 0.93 ties dllm:0.9's FLOPs; the lower KL wins
    assert shipping_pick(runs, min_first_words=0.6) == "dense"
    assert shipping_pick(runs, min_first_words=0.9) is None


def results_file(path, split: str, runs: dict, dataset: str = "smol") -> str:
    with open(path, "w") as f:
        json.dump({"meta": {"split": split, "dataset": dataset, "records": 40}, "runs": runs}, f)
    return str(path)


def test_ship_by_rule_ships_the_pick_and_records_every_candidate(tmp_path):
    a = results_file(tmp_path / "a.json", "validation", {"static:1": run(0.95, 0.6, 0.1)})
    b = results_file(tmp_path / "b.json", "validation", {"static:1": run(0.8, 0.3, 0.5), "dense": run(1.0, 0.9, 0.0)})
    out_dir, out = tmp_path / "shipped", tmp_path / "shipped.json"
    ship_by_rule.main([str(out_dir), str(out), a, b])
    record = json.loads(out.read_text())
    assert len(record["candidates"]) == 3  # one label in two files is two candidates
    assert record["pick"]["candidate"].endswith("a.json:static:1")
    shipped = read_adapter(str(out_dir / "checkpoint.pth"))
    assert shipped["adapter_sha256"] == read_adapter(TINY_ADAPTER)["adapter_sha256"] == record["pick"]["adapter_sha256"]
    assert (out_dir / "params.json").is_file()


@pytest.mark.parametrize("split, dataset, message", [("test", "smol", "the rule chooses on validation only"),
                                                     ("validation", "demo", "dataset 'demo'")])
def test_ship_by_rule_refuses_results_of_another_split_or_dataset(tmp_path, split, dataset, message):
    good = results_file(tmp_path / "good.json", "validation", {"dense": run(1.0, 0.9, 0.0)})
    bad = results_file(tmp_path / "bad.json", split, {"static:1": run(0.9, 0.9, 0.0)}, dataset)
    with pytest.raises(InputError, match=message):
        ship_by_rule.main([str(tmp_path / "shipped"), str(tmp_path / "out.json"), good, bad])
    assert not (tmp_path / "shipped").exists() and not (tmp_path / "out.json").exists()


def test_ship_by_rule_refuses_a_share_outside_0_to_1(tmp_path):
    only = results_file(tmp_path / "a.json", "validation", {"dense": run(1.0, 0.9, 0.0)})
    with pytest.raises(InputError, match="--min_first_words 50.0: a share of the prompts"):
        ship_by_rule.main([str(tmp_path / "shipped"), str(tmp_path / "out.json"), only, "--min_first_words", "50"])


def test_ship_by_rule_ships_nothing_when_no_run_qualifies(tmp_path):
    only = results_file(tmp_path / "a.json", "validation", {"static:1": run(0.9, 0.2, 0.3)})
    with pytest.raises(InputError, match="no run meets the rule"):
        ship_by_rule.main([str(tmp_path / "shipped"), str(tmp_path / "out.json"), only])
    assert not (tmp_path / "shipped").exists()


def test_the_shipped_smollm2_adapter_is_the_pick_of_its_results_file():
    with open(os.path.join(ROOT, "benchmarks", "results", "shipped_smollm2.json")) as f:
        pick = json.load(f)["pick"]
    shipped = read_adapter(os.path.join(ROOT, pick["shipped_to"], "checkpoint.pth"))
    assert shipped["adapter_sha256"] == pick["adapter_sha256"]
