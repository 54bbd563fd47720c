"""benchmarks/bench_skip.py's outside reference: transformers' Llama on dllm's weights."""
import pytest
import torch

from conftest import load_script, max_diff, randomize, tiny_args
from dllm.model import Transformer

bench_skip = load_script("benchmarks/bench_skip.py")


@pytest.mark.parametrize("tied", [False, True])
def test_the_transformers_reference_computes_dllms_dense_logits(tied):
    """Tied embeddings (SmolLM2) too: the head is the embedding under both names."""
    torch.manual_seed(0)
    model = randomize(Transformer(tiny_args(routing="dense", tie_word_embeddings=tied)), seed=0).eval()
    runner = bench_skip.TransformersRunner(model, torch.float32)
    tokens = torch.randint(0, model.params.vocab_size, (2, 12))
    with torch.no_grad():
        ours = model(tokens)[0]
        theirs = runner.hf(tokens).logits
    assert max_diff(ours, theirs) < 1e-4
    assert (runner.hf.lm_head.weight.data_ptr() == runner.hf.model.embed_tokens.weight.data_ptr()) == tied
