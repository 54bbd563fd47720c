"""The lm-evaluation-harness model `dllm`, run by the harness on the committed tasks in
tests/lm_eval_tasks with the shipped demo model and adapter: its log-likelihoods are evaluate.py's
scoring of the same texts, generation stops at the stop strings, the ratios land in the results."""
import os

import pytest

from dllm.evaluate import Evaluator, Tally
from dllm.core.routing import DenseRouting

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "lm_eval_tasks")
DEMO = f"llama_ckpt_dir={ROOT}/assets/tiny-llama2,adapter={ROOT}/assets/tiny-dllm/checkpoint.pth"


class Request:
    """What the model reads of a harness Instance."""

    def __init__(self, *args):
        self.args = args


def harness_model(model_args: str):
    """The model as the harness's command line builds it (its `device` default included): a
    DLLMHarnessModel. lm-eval is imported here, not at collection, so the fast tier needs none."""
    from lm_eval.api.registry import get_model

    import dllm.lm_eval_model  # noqa: F401 -- registers the model "dllm"

    return get_model("dllm").create_from_arg_string(model_args, {"batch_size": "4", "device": "cuda:0"})


@pytest.fixture(scope="module")
def run():
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = harness_model(DEMO)
    results = simple_evaluate(model=lm, tasks=["dllm_test_choice", "dllm_test_rolling", "dllm_test_generate"],
                              task_manager=TaskManager(include_path=TASKS, include_defaults=False), log_samples=True)
    return lm, results


def evaluate_loglik(lm, contexts, continuations):
    """evaluate.py's scoring without its end: log p(continuation, eos | context) - log p(eos | context + continuation)."""
    evaluator = Evaluator(lm.generator, batch_size=8, max_gen_len=16, n_shot=0, dataset_path=os.path.join(ROOT, "datasets"))
    with_eos = evaluator._score(contexts, continuations, Tally())[0]
    eos = evaluator._score([c + x for c, x in zip(contexts, continuations)], [""] * len(contexts), Tally())[0]
    return [a - b for a, b in zip(with_eos, eos)]


def test_model_args_build_the_adapter_model(run):
    from dllm.lm_eval_model import DLLMHarnessModel

    lm, _ = run
    assert isinstance(lm, DLLMHarnessModel) and lm.batch_size == 4
    assert type(lm.model.routing) is not DenseRouting
    assert lm.model.params.dynamic_active_target == 0.5  # the adapter's params.json


def test_choice_logliks_equal_evaluate_scoring(run):
    lm, results = run
    samples = results["samples"]["dllm_test_choice"]
    assert len(samples) == 5
    contexts = [ctx for s in samples for ctx, _ in s["arguments"]]
    options = [option for s in samples for _, option in s["arguments"]]
    harness = [resp[0][0] for s in samples for resp in s["resps"]]
    assert len(harness) == 15 and options[:3] == [" earth.", " sea.", " king."]
    assert harness == pytest.approx(evaluate_loglik(lm, contexts, options), abs=1e-4)


def test_rolling_logliks_equal_evaluate_scoring(run):
    lm, results = run
    samples = results["samples"]["dllm_test_rolling"]
    texts = [s["arguments"][0][0] for s in samples]
    assert texts[0] == "In the beginning God created the heaven and the earth."
    harness = [s["resps"][0][0] for s in samples]
    assert harness == pytest.approx(evaluate_loglik(lm, [""] * len(texts), texts), abs=1e-4)


def test_generation_stops_at_the_stop_string(run):
    lm, results = run
    samples = results["samples"]["dllm_test_generate"]
    prompts = [lm.tokenizer.encode(s["arguments"][0][0], bos=True, eos=False) for s in samples]
    unstopped = [t for at in range(0, len(prompts), lm.batch_size)
                 for t in lm.generator.generate(prompts[at : at + lm.batch_size], 16, temperature=0.0).tokens]
    full = [lm._continuation_text(p, t) for p, t in zip(prompts, unstopped)]
    outputs = [s["resps"][0][0] for s in samples]
    assert outputs == [text.split(",")[0] for text in full]
    assert sum("," in text for text in full) >= 2, "the stop string must occur for the test to mean anything"
    assert all(out.startswith(" ") for out in outputs)  # the continuation's own leading space


def test_generation_stops_at_the_earliest_of_several(run):
    lm, _ = run
    context = "And God said, Let there be light: and there was"
    plain, = lm.generate_until([Request(context, {"until": ["\n\n"], "max_gen_toks": 16})])
    assert "LORD" in plain
    both, = lm.generate_until([Request(context, {"until": ["LORD", "\n\n"], "max_gen_toks": 16})])
    assert both == plain.split("LORD")[0]


def test_routing_ratios_reported_with_the_scores(run):
    lm, results = run
    reported = results["config"]["dllm_routing"]
    assert set(reported) == {"loglikelihood", "loglikelihood_rolling", "generate_until"}
    assert {kind: r["requests"] for kind, r in reported.items()} == \
        {"loglikelihood": 15, "loglikelihood_rolling": 5, "generate_until": 5}
    for r in reported.values():
        assert 0.4 < r["kv_ratio"] < r["flops_ratio"] < 1  # skipping, and attention/head costs stay


def test_dense_model_reports_dense_ratios():
    lm = harness_model(DEMO + ",dense=True")
    assert type(lm.model.routing) is DenseRouting
    lm.loglikelihood([Request("In the beginning God created the heaven and the", " earth.")])
    assert lm.routing_ratios()["loglikelihood"] == {"flops_ratio": 1.0, "kv_ratio": 1.0, "requests": 1}


def test_auto_batch_size_is_refused():
    from lm_eval.api.registry import get_model

    import dllm.lm_eval_model  # noqa: F401 -- registers the model "dllm"
    from dllm.errors import InputError

    with pytest.raises(InputError, match="no 'auto'"):
        get_model("dllm").create_from_arg_string(DEMO, {"batch_size": "auto"})
