"""benchmarks/bench_train_step.py: its "at share" configuration's routers execute the share asked in
training, as an adapter trained to that target does (the table's second D-LLM row stands for it)."""
import pytest
import torch

from benchmarks.bench_train_step import route_at_share
from dllm.core.model import Transformer
from helpers import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("share", [0.3, 0.7])
def test_routers_at_a_share_execute_it_in_training(share):
    torch.manual_seed(0)
    args = tiny_args(dynamic_reserve_initials=0)
    model = Transformer(args)
    route_at_share(model, share)
    model.train()
    tokens = torch.randint(0, args.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, activation = model(tokens)
    routed = activation[..., args.dynamic_start_layer:]
    assert float(routed.mean()) == pytest.approx(share, abs=0.03)
