"""What an adapter keeps of its base (dllm/fidelity.py): the base against itself keeps everything at
full compute; a routed model's compute splits into prompt and response, prefill and decode."""
import pytest

from conftest import make_generator
from dllm.data import Record
from dllm.fidelity import Sums, generation, summary, teacher_forced
from dllm.generation import Llama
from dllm.routing import DenseRouting

RECORDS = [Record("The quick brown fox", " jumps over the lazy dog."),
           Record("She sold 48 clips in April and", " half as many in May."),
           Record("Question: Which option is correct? Answer:", " A")]


@pytest.fixture(scope="module")
def models(tokenizer_path):
    routed = make_generator(tokenizer_path)
    base = make_generator(tokenizer_path)
    base.model.routing = DenseRouting()
    return routed, base


def measure(model: Llama, base: Llama) -> dict:
    sums = Sums()
    teacher_forced(model.model, base.model, model.tokenizer, RECORDS, sums, batch_size=2)
    generation(model, base, RECORDS, sums, max_gen_len=6, stop_ids=model.tokenizer.stop_ids)
    return summary(sums, model.model.n_layers)


def test_the_base_against_itself_keeps_everything_at_full_compute(models):
    _, base = models
    result = measure(base, base)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    for key in ("top1_agreement", "gen_exact", "gen_first_words", "gen_rouge_l", "share_prompt", "share_response",
                "share_prefill", "share_decode"):
        assert result[key] == 1.0, key
    for key in ("flops_prompt", "flops_response", "flops_all", "flops_prefill", "flops_decode", "flops_generation"):
        assert result[key] == pytest.approx(1.0, rel=1e-12), key


def test_a_routed_model_loses_some_of_the_base_and_saves_compute(models):
    routed, base = models
    result = measure(routed, base)
    assert result["kl"] > 0.01 and result["top1_agreement"] < 1
    assert 0 < result["share_prompt"] < 1 and 0 < result["share_response"] < 1
    assert result["flops_all"] < 1 and result["flops_generation"] < 1
    assert 0 < result["share_prefill"] < 1 and 0 < result["share_decode"] < 1
    assert result["answers"] == len(RECORDS)
