"""lm-evaluation-harness's own command line, with the `dllm` model registered.

    python -m tools.run_lm_eval --model dllm \
        --model_args llama_ckpt_dir=assets/tiny-llama2,adapter=assets/tiny-dllm/checkpoint.pth,execute_threshold=0.5 \
        --tasks dllm_test_choice --include_path tests/lm_eval_tasks --batch_size 8 --output_path results/lm-eval

The harness loads models only from its own list, so `lm_eval --model dllm` alone cannot find this
one; every flag of `lm_eval` works here. Needs `pip install -r requirements-lm-eval.txt`.
"""
import dllm.lm_eval_model  # noqa: F401 -- registers the model "dllm"
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
