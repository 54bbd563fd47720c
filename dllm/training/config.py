"""The fine-tuning settings, defined once: each field is a finetuning.py flag (the paper's code's
names and defaults; presets/*.json hold the recipes that differ), its help and its allowed range. Fields named like a `ModelArgs` field
override the base's model args by that name (`model_overrides`).
"""
import dataclasses
from dataclasses import dataclass
from typing import List, Optional

from dllm.config import Settings, setting
from dllm.errors import InputError
from dllm.core.model import AdapterArgs, ModelArgs
from dllm.core.routing import POLICIES, DLLMRouting

# what a resumed run must share with the checkpoint it continues
RESUME_MUST_MATCH = ("dataset_name", "batch_size", "accum_iter", "dynamic_active_target", "lambda_active",
                     "routing", "max_seq_len", "lora_rank", "seed", "distill_teacher", "distill_weight",
                     "rate_loss_unit", "rate_loss_gap", "dynamic_budget_range", "dynamic_budget_routers",
                     "dynamic_budget_lora", "dynamic_budget_draw_power", "row_relative_loss")


@dataclass
class TrainConfig(Settings):
    PRESET_SCOPE = ("llama_ckpt_dir", "dataset_name")

    # paths (official names)
    preset: str = setting("", "a named recipe, one of the presets the entry point offers: its settings replace the "
                          "defaults (--help with it shows them); flags still override them (another base or dataset "
                          "than the preset's keeps its recipe, but the run is not the preset's: this is left empty)")
    llama_ckpt_dir: str = setting("", "base checkpoint directory, Meta or Hugging Face layout", required=True,
                                  aliases=["--llama_model_path"])
    llama_param_path: Optional[str] = setting(None, "params.json or config.json (default: the one in --llama_ckpt_dir)")
    tokenizer_path: Optional[str] = setting(None, "tokenizer.model or tokenizer.json (default: the one in --llama_ckpt_dir)")
    dataset_path: str = setting("datasets", "directory holding one folder per dataset")
    dataset_name: str = setting("alpaca", "dataset folder under --dataset_path (train.json, test.json)")
    output_dir: str = setting("./output", "where checkpoints, params.json, log.jsonl and curves.png go")
    model_save_name: str = setting("checkpoint", "checkpoints are NAME-EPOCH.pth and NAME-last.pth")
    overwrite_output_dir: bool = setting(False, "start over in an --output_dir that holds an earlier run (its files are removed)")
    resume: str = setting("", "training checkpoint file or output directory to continue from")
    # model knobs (official names and the reference's defaults)
    max_seq_len: int = setting(1024, "tokens per training example (longer ones are cut)", low=2)
    lora_rank: int = setting(AdapterArgs.lora_rank, "LoRA rank of the attention projections; 0: no LoRA", low=0)
    dynamic_active_target: float = setting(AdapterArgs.dynamic_active_target, "share of routed blocks a token should execute", low=0.0, high=1.0)
    dynamic_router_hdim: int = setting(AdapterArgs.dynamic_router_hdim, "hidden width of each router MLP", low=1)
    dynamic_start_layer: int = setting(AdapterArgs.dynamic_start_layer, "the first routed block; the blocks before it always run", low=0)
    dynamic_reserve_initials: int = setting(AdapterArgs.dynamic_reserve_initials, "the first tokens of a sequence run every block", low=0)
    lambda_active: float = setting(5.0, "final weight of the rate loss (sine-annealed from 0)", low=0.0)
    # optimisation (official names and defaults)
    batch_size: int = setting(1, "records per step and process", low=1)
    accum_iter: int = setting(1, "steps whose gradients are accumulated before an optimizer step", low=1)
    epochs: int = setting(10, "passes over the training records", low=1)
    warmup_epochs: float = setting(2.0, "epochs of linear lr warm-up before the cosine decay", low=0.0)
    save_freq: int = setting(1, "save NAME-EPOCH.pth every this many epochs (the last epoch always)", low=1)
    blr: float = setting(9e-3, "base lr: lr = blr * effective batch / 256", low=0.0, low_open=True)
    lr: Optional[float] = setting(None, "absolute lr; overrides --blr", low=0.0, low_open=True)
    min_lr: float = setting(0.0, "lr at the end of the cosine decay", low=0.0)
    weight_decay: float = setting(0.02, "AdamW weight decay (not on biases and norms)", low=0.0)
    seed: int = setting(0, "seed of data order, initial adapter and noise", low=0)
    num_workers: int = setting(0, "DataLoader worker processes", low=0)
    # ours: what it takes to reach the target in a short budget (defaults are the reference's)
    router_lr: Optional[float] = setting(None, "absolute lr for routers (default: the same as lr)", low=0.0, low_open=True)
    dynamic_router_bias: List[float] = setting(list(AdapterArgs.dynamic_router_bias), "initial [skip, execute] logit bias of the routers, e.g. \"[0.1, 2.0]\"")
    rate_loss_unit: str = setting(AdapterArgs.rate_loss_unit, "D-LLM's rate loss holds each token's executed share at the target (token, the "
                                  "reference), each sequence's mean share (sequence: tokens free to differ), or each response token's "
                                  "(response: the tokens the CE scores; prompt tokens route freely)",
                                  choices=list(DLLMRouting.RATE_LOSS_UNITS))
    rate_loss_gap: str = setting(AdapterArgs.rate_loss_gap, "the rate loss's gap: |share - target| (absolute, the reference) or "
                                 "that over the target (relative: a budget-conditioned D-LLM's low budgets held as tightly, "
                                 "in proportion, as its high ones)", choices=list(DLLMRouting.RATE_LOSS_GAPS))
    dynamic_budget_range: List[float] = setting(list(AdapterArgs.dynamic_budget_range), "a budget-conditioned D-LLM: [low, high], the range of shares its "
                                                "routers take as input (the budget chosen at inference, --budget); "
                                                "each sequence trains at a target drawn from it, e.g. \"[0.4, 1.0]\"; "
                                                "--dynamic_active_target (within it) is the budget when none is asked; "
                                                "empty: one fixed target", low=0.0, high=1.0)
    dynamic_budget_routers: int = setting(AdapterArgs.dynamic_budget_routers, "a budget-conditioned D-LLM's routers per block, "
                                          "at evenly spaced budgets over --dynamic_budget_range, a row routed by the "
                                          "blend of the two around its budget; 1: one router for every budget", low=1)
    dynamic_budget_lora: int = setting(AdapterArgs.dynamic_budget_lora, "a budget-conditioned D-LLM's LoRA with a learned "
                                       "gain per rank at this many evenly spaced budgets over --dynamic_budget_range, "
                                       "blended around the budget the routers are told (kept unmerged at inference); "
                                       "0: one LoRA for every budget", low=0)
    dynamic_budget_draw_power: float = setting(AdapterArgs.dynamic_budget_draw_power, "a budget-conditioned D-LLM "
                                               "draws each sequence's target as low + (high - low) * u ** this, u "
                                               "uniform on [0, 1): 1 draws the range evenly, 2 half the draws in its "
                                               "lowest quarter", low=0.0, low_open=True)
    budget_lora_lr: Optional[float] = setting(None, "absolute lr for a budget-conditioned LoRA's gains (default: the same "
                                              "as lr); they start at 1 and a LoRA's strength moves in whole units "
                                              "(tools/calibrate_lora_strength.py), which AdamW at a LoRA's lr does not "
                                              "reach in a short run", low=0.0, low_open=True)
    gumbel_tau: float = setting(AdapterArgs.gumbel_tau, "temperature of the routers' Gumbel-softmax", low=0.0, low_open=True)
    routing: str = setting(AdapterArgs.routing, "which tokens run which block: dllm, mod (Mixture-of-Depths), static (pruned "
                           "--static_skip_layers), early_exit, dense (LoRA only)", choices=list(POLICIES))
    static_skip_layers: List[int] = setting(list(AdapterArgs.static_skip_layers), "--routing static: the blocks every token skips, e.g. \"[3, 5]\"", low=0)
    distill_teacher: str = setting("", "also match this teacher's next-token distributions (KL) on the response tokens: "
                                   "'base' (the base model, every block, no LoRA) or an adapter of the same base, e.g. a "
                                   "--routing dense run; empty: labels only")
    distill_weight: float = setting(1.0, "weight of the distillation KL beside the CE", low=0.0)
    row_relative_loss: bool = setting(False, "ours: each record's CE (+ distillation) divided by its own value in the "
                                      "gradient, so every record's relative change counts alike: a budget-conditioned "
                                      "D-LLM's records drawn at low budgets, which lose several times what those near "
                                      "the top do, no longer set the shared adapter by themselves")
    calibration_batches: int = setting(8, "mod/early_exit: training batches their threshold is fit on", low=1)
    model_parallel_size: int = setting(1, "processes one model is split over (the base's shard count)", low=1)
    log_freq: int = setting(10, "a log.jsonl line every this many steps", low=1)
    save_steps: int = setting(0, "also save NAME-last.pth every this many steps; 0: at epoch ends only", low=0)

    def __post_init__(self):
        super().__post_init__()
        if len(self.dynamic_router_bias) != 2:
            raise InputError(f"--dynamic_router_bias {self.dynamic_router_bias}: must be two numbers, [skip, execute]")
        if self.dynamic_budget_range:
            low, high = (self.dynamic_budget_range + [0.0, 0.0])[:2]
            if len(self.dynamic_budget_range) != 2 or not 0 < low < high:
                raise InputError(f"--dynamic_budget_range {self.dynamic_budget_range}: must be [low, high] with "
                                 f"0 < low < high <= 1")
            if self.routing != "dllm":
                raise InputError(f"--dynamic_budget_range is for --routing dllm, not {self.routing}")
            if not low <= self.dynamic_active_target <= high:
                raise InputError(f"--dynamic_active_target {self.dynamic_active_target}: must lie in "
                                 f"--dynamic_budget_range {self.dynamic_budget_range} (the budget when none is asked)")
            if self.dynamic_budget_lora == 1:
                raise InputError("--dynamic_budget_lora 1: gains at one budget are one LoRA for every budget; "
                                 "give 0, or 2 or more")
        elif self.dynamic_budget_lora:
            raise InputError(f"--dynamic_budget_lora {self.dynamic_budget_lora}: the LoRA's gains share out "
                             f"--dynamic_budget_range, which is not set")
        elif self.dynamic_budget_routers > 1:
            raise InputError(f"--dynamic_budget_routers {self.dynamic_budget_routers}: routers share out "
                             f"--dynamic_budget_range, which is not set")
        elif self.dynamic_budget_draw_power != 1:
            raise InputError(f"--dynamic_budget_draw_power {self.dynamic_budget_draw_power}: shapes the draw over "
                             f"--dynamic_budget_range, which is not set")
        if self.budget_lora_lr is not None and not self.dynamic_budget_lora:
            raise InputError(f"--budget_lora_lr {self.budget_lora_lr}: sets the lr of a budget-conditioned LoRA's "
                             f"gains, and --dynamic_budget_lora is not set")

    def model_overrides(self) -> dict:
        """The fields that are model args too, by name."""
        names = {f.name for f in dataclasses.fields(ModelArgs)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}

    def check_model(self, args: ModelArgs, params_path: str):
        """The settings that depend on the base model, checked once its params are read."""
        if self.routing != "dense" and self.dynamic_start_layer >= args.n_layers:
            raise InputError(f"--dynamic_start_layer {self.dynamic_start_layer}: must be < n_layers = {args.n_layers} "
                             f"({params_path})")
        past = [layer for layer in self.static_skip_layers if layer >= args.n_layers]
        if past:
            raise InputError(f"--static_skip_layers {past[0]}: must be < n_layers = {args.n_layers} ({params_path})")

    def check_resume(self, saved: dict, path: str):
        """A resumed run continues the checkpoint's recipe: the settings the steps depend on must match."""
        for name in RESUME_MUST_MATCH:
            if name in saved and saved[name] != getattr(self, name):
                raise InputError(
                    f"{path} was trained with --{name} {saved[name]} but this run has --{name} {getattr(self, name)}; "
                    f"resume with the same value, or start a new run elsewhere")
