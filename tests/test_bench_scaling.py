"""benchmarks/bench_scaling.py on a tiny random shape: which cells it measures, which it skips and
why, and what it writes."""
import json

import pytest

from benchmarks import bench_scaling

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_cells_past_the_caps_are_skipped_with_why_and_the_rest_written(tmp_path):
    out = tmp_path / "scaling.json"
    config = bench_scaling.ScalingConfig(
        dim=64, n_layers=3, n_heads=4, vocab_size=320, router_hdim=16, start_layer=1, shares=[0.5],
        contexts=[8, 16], batches=[1, 2], prefill_tokens=8, decode_tokens=16, decode_steps=2, repeats=1,
        out=str(out), png=str(tmp_path / "scaling.png"))
    bench_scaling.main(config)
    cells = {(c["batch"], c["context"]): c for c in json.loads(out.read_text())["cells"]}
    assert "decode_tokens 16" in cells[2, 16]["skipped"] and "configs" not in cells[2, 16]
    assert "prefill_tokens 8" in cells[1, 16]["prefill_skipped"]
    assert "prefill_ms_per_token" not in cells[2, 8]["configs"]["dense"]
    dense, dllm = cells[1, 8]["configs"]["dense"], cells[1, 8]["configs"]["dllm@0.50"]
    assert "prefill_ms_per_token" in dense and dense["bytes_ideal_x"] == 1
    assert 0 < dllm["exec_share_routed"] < 1 and dllm["kv_mb_per_row"] < dense["kv_mb_per_row"]
    assert dllm["bytes_ideal_x"] > 1
    table = (tmp_path / "scaling.md").read_text()
    assert "python" in table.splitlines()[2] and "| 2 | 16 | skipped" in table
    assert (tmp_path / "scaling.png").stat().st_size > 0
