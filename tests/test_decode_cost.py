"""What a decode step costs beyond its arithmetic: reads from the device, cache reallocations, and
the packing a dense forward must not do.

A read from the device stalls a GPU stream until the device catches up: a decode step does at most
one per routed block and none when dense. Reads are counted at the dispatcher, so the count is the
same on the CPU: copies to the host, reads of single values (`item`, `bool`, `int`), comparisons
answered on the host, and ops whose output shape depends on tensor values.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dllm.core import kv_cache
from dllm.core.kv_cache import LayerKVCache
from dllm.core.model import Transformer
from helpers import ATTENTION_ROUTES, randomize, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")
aten = torch.ops.aten
VALUE_READS = {
    aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default,
    aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default,
    aten.bincount.default, aten.repeat_interleave.Tensor,
}


class HostReads(TorchDispatchMode):
    """Records every op that needs tensor values on the host."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in VALUE_READS or self._copies_to_host(func, args, kwargs) or self._bool_index(func, args):
            self.ops.append(func.__name__)
        return func(*args, **kwargs)

    @staticmethod
    def _copies_to_host(func, args, kwargs) -> bool:
        """A copy into host memory (under inference mode `Tensor.to` arrives undecomposed). On
        the CPU, where nothing needs copying, an explicit copy to the CPU stands for that read."""
        if func is aten.copy_.default:
            return args[0].device.type == "cpu" and args[1].device.type != "cpu"
        if func.overloadpacket not in (aten._to_copy, aten.to):
            return False
        device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, torch.device)), None))
        if device is None or torch.device(device).type != "cpu":
            return False
        copy = func.overloadpacket is aten._to_copy or kwargs.get("copy", False) or (len(args) > 4 and args[4] is True)
        return copy or args[0].device.type != "cpu"

    @staticmethod
    def _bool_index(func, args) -> bool:
        """x[mask] and x[mask] = y find the True entries on the host."""
        if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            return False
        return any(i is not None and i.dtype == torch.bool for i in args[1])


@pytest.mark.parametrize("inference", [True, False], ids=["inference_mode", "grad_mode"])
def test_counter_sees_host_reads(inference):
    """Control: the usual ways of reading a tensor on the host are all counted."""
    x = torch.tensor([0.0, 1.0, 2.0])
    with torch.inference_mode(inference), HostReads() as reads:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x[x > 0]
        x.to("cpu", copy=True)
        torch.unique(x)
    assert len(reads.ops) == 6, reads.ops


def decode_reads(routing: str, batch: int):
    """Host reads of one decode step after a prefill, and the model's routed block count."""
    torch.manual_seed(0)
    model = randomize(Transformer(tiny_args(n_layers=5, routing=routing)), seed=1, router_scale=3.0).eval()
    tokens = torch.randint(0, 320, (batch, 9), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(batch)
    with torch.inference_mode():
        model(tokens[:, :8], 0, cache)
        with HostReads() as reads:
            _, activation = model(tokens[:, 8:], 8, cache)
    routed = sum(layer.router is not None for layer in model.layers)
    return reads.ops, routed, activation


@pytest.mark.parametrize("route", ATTENTION_ROUTES)
@pytest.mark.parametrize("batch", [1, 3])
def test_routed_decode_step_reads_the_device_once_per_routed_block(batch, route, monkeypatch):
    monkeypatch.setitem(kv_cache.CALL_COST_BYTES, "cpu", ATTENTION_ROUTES[route])
    ops, routed, activation = decode_reads("dllm", batch)
    assert routed == 4
    if batch == 3:  # some rows execute a routed block and some skip it, so packing is exercised
        executed = activation[:, 0, 1:]
        assert 0 < executed.mean() < 1
    assert len(ops) == routed, ops


def test_dense_decode_step_never_reads_the_device():
    ops, _, _ = decode_reads("dense", 3)
    assert ops == []


def test_dense_forward_takes_the_plain_path(monkeypatch):
    """No packing in dense mode, in prefill or decode, ragged batch or not."""
    def no_packing(*args, **kwargs):
        raise AssertionError("a dense forward packed its tokens")

    monkeypatch.setattr(LayerKVCache, "pack", no_packing)
    torch.manual_seed(0)
    model = randomize(Transformer(tiny_args(routing="dense")), seed=1).eval()
    cache = model.new_cache(3)
    tokens = torch.randint(0, 320, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(tokens[:, :5], 0, cache)
        model(tokens[:, 5:6], 5, cache)
        model(tokens[:, 6:], 6, cache)
    assert cache.tokens_kept().eq(7).all()


def test_decode_reallocates_the_cache_only_when_its_longest_row_doubles():
    torch.manual_seed(0)
    model = Transformer(tiny_args(routing="dense", n_layers=1, max_seq_len=140)).eval()
    cache = model.new_cache(1)
    kv = cache.layers[0]
    buffer, reallocations, capacities = None, 0, []
    with torch.inference_mode():
        for t in range(135):
            model(torch.tensor([[t]]), t, cache)
            reallocations += kv.k.data_ptr() != buffer
            buffer = kv.k.data_ptr()
            capacities.append(kv.capacity)
    assert sorted(set(capacities)) == [64, 128, 140]  # doubling from the chunk, capped at max_seq_len
    assert reallocations == 3


def test_room_made_after_a_prefill_lets_the_following_steps_copy_no_cache():
    torch.manual_seed(0)
    model = Transformer(tiny_args(routing="dense", n_layers=2, max_seq_len=140)).eval()
    cache = model.new_cache(2)
    with torch.inference_mode():
        model(torch.randint(0, 320, (2, 64)), 0, cache)  # fills the first chunk exactly
        cache.reserve_room(10)
        buffers = [kv.k.data_ptr() for kv in cache.layers]
        for t in range(64, 74):
            model(torch.randint(0, 320, (2, 1)), t, cache)
    assert [kv.k.data_ptr() for kv in cache.layers] == buffers
    assert all(kv.capacity >= 74 for kv in cache.layers)
