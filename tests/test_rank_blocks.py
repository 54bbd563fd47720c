"""tools/rank_blocks.py: Shortened-LLaMA's block criteria against independent computations, and the
blocks a target prunes."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dllm.data import InstructionDataset, Record
from dllm.core.model import Transformer
from dllm.core.routing import DenseRouting
from dllm.tokenizer import Tokenizer
from helpers import randomize, records, tiny_args
from tools.rank_blocks import blocks_to_skip, rank_blocks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranked(tokenizer_path):
    torch.manual_seed(0)
    model = randomize(Transformer(tiny_args(n_layers=4, lora_rank=0, routing="dense")), seed=1)
    data = [Record(f"{r['instruction']} {r['input']}\n", r["output"]) for r in records(12, seed=3)]
    dataset = InstructionDataset(data, Tokenizer(tokenizer_path), max_seq_len=32)
    batches = [list(batch) for batch in DataLoader(dataset, batch_size=4)]
    reference = copy.deepcopy(model)
    return rank_blocks(model, batches, start_layer=1), reference, batches


def mean_ce(model, batches) -> torch.Tensor:
    """Mean CE over response tokens, written out: position t predicts token t + 1 where it is a label."""
    total, count = 0.0, 0
    for examples, labels, _, label_masks in batches:
        logits, _ = model(examples)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        total = total + (ce * label_masks[:, 1:]).sum()
        count += int(label_masks[:, 1:].sum())
    return total / count


def test_ppl_criterion_is_the_model_with_the_block_deleted(ranked):
    ranking, reference, batches = ranked
    for block in (1, 2, 3):
        model = copy.deepcopy(reference).eval()
        del model.layers[block]
        with torch.no_grad():
            assert ranking["ppl"][str(block)] == pytest.approx(math.exp(mean_ce(model, batches).item()), rel=1e-5)
    with torch.no_grad():
        assert ranking["base_ppl"] == pytest.approx(math.exp(mean_ce(reference.eval(), batches).item()), rel=1e-5)


def test_taylor_criterion_is_gradient_times_weight(ranked):
    ranking, reference, batches = ranked
    model = copy.deepcopy(reference).train()
    model.use_routing(DenseRouting())
    for block in (1, 2, 3):
        weights = [p for p in model.layers[block].parameters() if p.ndim == 2]
        grads = torch.autograd.grad(mean_ce(model, batches), weights)
        expected = sum((g * w.detach()).abs().sum().item() for g, w in zip(grads, weights))
        assert ranking["taylor"][str(block)] == pytest.approx(expected, rel=1e-4)


def test_kl_criterion_is_the_base_against_the_model_with_the_block_deleted(ranked):
    ranking, reference, batches = ranked
    for block in (1, 2, 3):
        pruned = copy.deepcopy(reference).eval()
        del pruned.layers[block]
        total, count = 0.0, 0
        with torch.no_grad():
            for examples, _, _, label_masks in batches:
                base = F.log_softmax(reference.eval()(examples)[0][:, :-1], -1)
                model = F.log_softmax(pruned(examples)[0][:, :-1], -1)
                kl = (base.exp() * (base - model)).sum(-1)
                total += (kl * label_masks[:, 1:]).sum().item()
                count += int(label_masks[:, 1:].sum())
        assert ranking["kl"][str(block)] == pytest.approx(total / count, rel=1e-4)


def test_order_and_blocks_to_skip(ranked):
    ranking, _, _ = ranked
    assert all("0" not in ranking[criterion] for criterion in ("ppl", "taylor", "kl"))  # below the start layer
    for criterion in ("ppl", "taylor", "kl"):
        order = ranking["order"][criterion]
        scores = [ranking[criterion][str(b)] for b in order]
        assert sorted(order) == [1, 2, 3] and scores == sorted(scores)
        assert blocks_to_skip(ranking, criterion, 0.5) == sorted(order[:2])  # round(0.5 * 4) blocks
        assert blocks_to_skip(ranking, criterion, 0.7) == order[:1]  # round(1.2)
        assert blocks_to_skip(ranking, criterion, 0.0) == [1, 2, 3]  # at most the candidates
