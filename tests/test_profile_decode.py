"""benchmarks/profile_decode.py: a row per configuration, its operator time split into groups that
add up to what the profiler saw, and D-LLM's routers among its matrix products."""
import json

import pytest

from benchmarks import profile_decode

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_the_groups_add_up_and_only_dllm_has_routers(tmp_path):
    out = tmp_path / "profile.json"
    config = profile_decode.ProfileConfig(dim=64, n_layers=4, n_heads=4, vocab_size=128, router_hdim=16, context=32,
                                          batch=4, warmup=1, decode_steps=2, out=str(out))
    profile_decode.main(config)
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "dllm@0.50"} and rows["dense"]["x_dense"] == 1.0
    for row in rows.values():
        assert row["attention_ms"] + row["products_ms"] + row["other_ops_ms"] == pytest.approx(row["ops_ms"])
        assert row["attention_calls"] > 0 and row["products_ms"] > 0 and row["kv_gb_s"] > 0
    assert rows["dllm@0.50"]["kv_read_mb"] < rows["dense"]["kv_read_mb"]
    assert rows["dense"]["routers_ms"] == 0 and rows["dllm@0.50"]["routers_ms"] > 0
