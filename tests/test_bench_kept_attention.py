"""benchmarks/bench_kept_attention.py: its routes compute the same attention (it checks them itself
before timing) and it reports the route the cache's cost rule takes."""
import json

import pytest

from benchmarks import bench_kept_attention

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_every_route_agrees_and_the_rule_runs_rows_one_by_one_only_where_rows_are_long(tmp_path):
    out = tmp_path / "attention.json"
    config = bench_kept_attention.KeptAttentionConfig(batches=[1, 8], contexts=[4, 4096], repeats=1, out=str(out))
    bench_kept_attention.main(config)
    chosen = {(r["batch"], r["context"]): (r["rows_run"], r["chosen"]) for r in json.loads(out.read_text())["rows"]}
    assert chosen == {(1, 4): (1, "batched"), (1, 4096): (1, "batched"), (8, 4): (4, "batched"),
                      (8, 4096): (4, "row_by_row")}
    assert "| 8 | 4096 | 0.50 | 4 |" in (tmp_path / "attention.md").read_text()
