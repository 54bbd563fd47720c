"""Fine-tune D-LLM routers and LoRA on a frozen Llama checkpoint. Usually started by finetuning.sh."""
import argparse

from dllm.errors import run_cli
from dllm.routing import POLICIES
from dllm.train import train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    # paths (official names)
    p.add_argument("--llama_model_path", required=True, help="base checkpoint directory, Meta or Hugging Face layout")
    p.add_argument("--llama_param_path", default=None,
                   help="params.json or config.json (default: the one in --llama_model_path)")
    p.add_argument("--tokenizer_path", default=None,
                   help="tokenizer.model or tokenizer.json (default: the one in --llama_model_path)")
    p.add_argument("--dataset_path", default="datasets")
    p.add_argument("--dataset_name", default="alpaca")
    p.add_argument("--output_dir", default="./output")
    p.add_argument("--model_save_name", default="checkpoint", help="checkpoints are NAME-EPOCH.pth and NAME-last.pth")
    # model knobs (official names and the reference's defaults)
    p.add_argument("--max_seq_len", type=int, default=1024)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--dynamic_active_target", type=float, default=0.5)
    p.add_argument("--dynamic_router_hdim", type=int, default=512)
    p.add_argument("--dynamic_start_layer", type=int, default=2)
    p.add_argument("--dynamic_reserve_initials", type=int, default=2)
    p.add_argument("--lambda_active", type=float, default=5.0)
    # optimisation (official names and defaults)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--accum_iter", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup_epochs", type=float, default=2)
    p.add_argument("--save_freq", type=int, default=1, help="save NAME-EPOCH.pth every this many epochs")
    p.add_argument("--blr", type=float, default=9e-3, help="lr = blr * effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--weight_decay", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default="", help="training checkpoint file or output directory to continue from")
    p.add_argument("--num_workers", type=int, default=0)
    # ours: what it takes to reach the target in a short budget (defaults are the reference's)
    p.add_argument("--router_lr", type=float, default=None, help="absolute lr for routers (default: same as lr)")
    p.add_argument("--router_bias", type=float, nargs=2, default=(0.1, 2.0), help="initial [skip, execute] bias")
    p.add_argument("--gumbel_tau", type=float, default=1.0)
    p.add_argument("--routing", default="dllm", choices=list(POLICIES),
                   help="which tokens run which block: dllm (D-LLM routers), mod (Mixture-of-Depths), static "
                        "(the blocks in --static_skip_layers pruned), early_exit (Ada-Infer-style exit classifiers), "
                        "dense (LoRA only, every block runs); saved in the adapter's params.json")
    p.add_argument("--static_skip_layers", type=int, nargs="*", default=[],
                   help="--routing static: the blocks every token skips (tools/rank_blocks.py ranks them)")
    p.add_argument("--calibration_batches", type=int, default=8,
                   help="early_exit: its threshold is fit on this many training batches so the executed share "
                        "meets --dynamic_active_target")
    p.add_argument("--model_parallel_size", type=int, default=1)
    p.add_argument("--log_freq", type=int, default=10, help="log.jsonl line every this many steps")
    p.add_argument("--save_steps", type=int, default=0, help="also save NAME-last.pth every this many steps")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(train, parse_args())
