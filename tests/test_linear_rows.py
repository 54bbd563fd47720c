"""The block projections' product by row count (layers.linear): the transposed product where the
device's BLAS runs it faster, in inference only, the same numbers as F.linear within rounding;
and benchmarks/bench_linear_rows.py, which measures where that is."""
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_linear_rows
from dllm.core.layers import TRANSPOSED_ROWS, linear
from dllm.core.routing import Router

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 9, 12])
def test_inference_takes_the_transposed_product_for_the_listed_rows_and_matches_f_linear(rows):
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 1, 48), torch.randn(40, 48)
    with torch.inference_mode():
        out = linear(x, weight)
        expected = torch.mm(weight, x[:, 0].T).T if rows in TRANSPOSED_ROWS["cpu"] else F.linear(x[:, 0], weight)
    assert out.shape == (rows, 1, 40) and out.is_contiguous()
    assert torch.equal(out[:, 0], expected)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4])
def test_a_bias_is_added_on_either_product(rows):
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 1, 48), torch.randn(40, 48), torch.randn(40)
    with torch.inference_mode():
        out = linear(x, weight, bias)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_router_takes_the_transposed_product_for_a_decode_steps_rows():
    torch.manual_seed(0)
    router, x = Router(48, 16, 1e-5, (0.1, 2.0)), torch.randn(TRANSPOSED_ROWS["cpu"][-1], 1, 48)
    first = router.linear_1
    with torch.inference_mode():
        logits = router(x)
        hidden = torch.addmm(first.bias.unsqueeze(1), first.weight, x[:, 0].T).T.contiguous().unsqueeze(1)
        expected = router.linear_2(F.silu(router.norm(hidden)))
    assert torch.equal(logits, expected)
    torch.testing.assert_close(logits, router.linear_2(F.silu(router.norm(first(x)))), rtol=1e-5, atol=1e-5)


def test_training_keeps_f_linear_and_its_gradient():
    torch.manual_seed(0)
    rows = TRANSPOSED_ROWS["cpu"][0]
    x, weight = torch.randn(rows, 48), torch.randn(40, 48, requires_grad=True)
    out = linear(x, weight)
    assert torch.equal(out, F.linear(x, weight))
    out.sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(40, 48))


def test_the_benchmark_checks_both_products_and_marks_the_rows_sent_transposed(tmp_path):
    out = tmp_path / "rows.json"
    bench_linear_rows.main(bench_linear_rows.LinearRowsConfig(n_layers=1, vocab_size=64, rows=[1, 3], repeats=1, out=str(out)))
    rows = {r["rows"]: r for r in json.loads(out.read_text())["rows"]}
    assert [rows[1]["sent_transposed"], rows[3]["sent_transposed"]] == [False, True]
    # one repeat: its pair of timings is the best of each, so the range is that one ratio
    assert all(r["ratio_low"] == r["ratio_high"] == pytest.approx(r["transposed_x_linear"]) for r in rows.values())
    assert "| 3 |" in (tmp_path / "rows.md").read_text()
