"""The compute dial of a D-LLM adapter: `--budget` (the share of blocks executed) chosen at inference.

Calibration (tools/calibrate_dial.py), for each budget B of a grid: the routers' execute margins
(execute logit - skip logit; a budget-conditioned adapter's routers given B) are recorded per block
on calibration records; block l's threshold is the quantile of its margins at one level shared by
all blocks, and that level is found by bisection (training.validation.calibrate_threshold, the bisection MoD and
early exit fit their threshold with) so the executed share on the records equals B. A
budget-conditioned adapter's routers already spread B over the blocks as training taught them, and
a per-block quantile would undo that (docs/dial.md), so its blocks
share one threshold: the quantile of all blocks' margins pooled, which only corrects the share. The grid of
per-block thresholds is saved beside the checkpoint (NAME.dial.json, with the adapter's checksum)
and read into the policy (routing.MarginDial) when a budget is asked.

With `--by input` a budget-conditioned adapter's dial moves the budget its routers are told instead,
found by bisection the same way (any input in [0, 1]), and leaves their rule (execute where the
margin is at least 0) as trained: a router input whose share on the records is B. Its routers run
more than they are told (docs/dial.md), so a budget inside the trained range is met by a lower
input that training taught, and a budget at its low end by an input below anything training drew.
Its routers also run more on answers than on prompts, so one input meets B on all tokens while
a generation, whose answers run longer than the records', spends more; `--share_on phases` finds
one input for the prompt tokens and one for the response tokens (routing.MarginDial), each meeting
B on its own tokens, so that prefill and decode both do. `--share_on generation` keeps one input
(or threshold) per budget and meets B over what a generation runs instead: the records' prompts with
the model's own greedy answers, generated again as the dial moves (meet_in_generation), so the
routers keep their own split between prompt and answer and the user pays B.

LoRA strength (tools/calibrate_lora_strength.py), for a budget-conditioned adapter: its LoRA is
trained under every budget of its range, so it moves the model even where nearly every block runs.
For each budget of a grid, the strength of the LoRA update (a factor on it, from a list) with the
least KL to the base on the first training records is saved beside the checkpoint
(NAME.lora_strength.json); generation then merges the LoRA at the strength of the budget asked, and
merges it again, from the weights without it, when the budget changes.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from dllm.checkpoints import adapters
from dllm.chat import ChatFormat
from dllm.config import setting
from dllm.data import InstructionDataset, Record, load_records
from dllm.errors import InputError
from dllm.generation import Llama, ModelPaths
from dllm.core.model import Transformer
from dllm.checkpoints.dial_file import LoraStrength, dial_path, lora_strength_path, write_dial, write_lora_strength
from dllm.fidelity import Sums, teacher_forced
from dllm.core.routing import MarginDial
from dllm.training.config import TrainConfig
from dllm.training.data_loading import Indexed, trim_padding, val_loader
from dllm.training.validation import calibrate_threshold, counted_tokens, validate

GRID_STEP = 0.05
BISECTION_STEPS = 10  # the quantile level to 1e-3: the share to about that
GENERATION_ROUNDS = 3  # generations per budget at most, calibrating again on each but the last
GENERATION_TOLERANCE = 0.01  # a generation's share this close to the budget ends the rounds


def default_budgets(args) -> List[float]:
    """The grid: GRID_STEP steps over the trained range of a budget-conditioned adapter; else from the
    first step above the share the always-run blocks alone give up to 1."""
    if args.dynamic_budget_range:
        low, high = args.dynamic_budget_range
    else:
        low, high = args.dynamic_start_layer / args.n_layers + 1e-6, 1.0
    first, last = int(-(-low // GRID_STEP)), int(high / GRID_STEP + 1e-9)
    return [round(k * GRID_STEP, 4) for k in range(first, last + 1)]


def calibration_records(tokenizer, dataset_path: str, name: str, split: str, n_records: int) -> List[Record]:
    """The first `n_records` records of a split, prompts in the model's chat template: what a dial is
    calibrated on (train) and checked on (test)."""
    return load_records(dataset_path, name, split, ChatFormat(tokenizer))[:n_records]


def records_loader(records: List[Record], tokenizer, max_seq_len: int, batch_size: int):
    """Records as fine-tuning tokenises them, in batches `validate` takes."""
    dataset = Indexed(InstructionDataset(records, tokenizer, max_seq_len))
    return val_loader(Subset(dataset, range(len(dataset))), batch_size, 0)


@torch.no_grad()
def record_margins(model: Transformer, loader, device, share_on: str = "all") -> Dict[int, torch.Tensor]:
    """Each routed block's execute margins over the loader's real tokens (`share_on` "response": its
    response tokens) past the reserved initial ones, under the policy's current routing (read from
    the routers' outputs by forward hooks)."""
    model.eval()
    margins: Dict[int, List[torch.Tensor]] = {}
    current: Dict[int, torch.Tensor] = {}

    def hook(layer_id):
        def record(module, inputs, logits):
            current[layer_id] = logits[..., 1] - logits[..., 0]
        return record

    handles = [layer.router.register_forward_hook(hook(layer.layer_id)) for layer in model.layers
               if layer.router is not None]
    try:
        for batch in loader:
            examples, _, example_masks, label_masks = [t.to(device) for t in trim_padding(batch[1:])]
            counted = counted_tokens(example_masks, label_masks, share_on).bool()
            counted[:, : model.params.dynamic_reserve_initials] = False
            current.clear()
            model(examples)
            for layer_id, margin in current.items():
                margins.setdefault(layer_id, []).append(margin[counted].float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    return {layer_id: torch.cat(values) for layer_id, values in margins.items()}


def calibrate(model: Transformer, loader, device, budgets: List[float], on_budget=lambda budget: None,
              by: str = "threshold", share_on: str = "all", answer=None):
    """The dial meeting each budget on the loader's records (over the tokens `share_on` counts: all,
    or the response tokens), and the share each calibrated entry executes there; `on_budget(b)` is
    called as each budget's turn starts (Llama.set_lora_strength_for). `by` "input" (a
    budget-conditioned adapter): the budget its routers are told, found by bisection. `share_on`
    "generation": over what a generation runs, the records' prompts and the model's own answers,
    which `answer()` generates under the dial in place (meet_in_generation); the share is then a
    fresh generation's."""
    routing = model.routing
    if routing.name != "dllm":
        raise InputError(f"a dial is for D-LLM adapters; this adapter's routing is {routing.name!r}")
    if by == "input" and routing.trained_range is None:
        raise InputError("--by input: tells a budget-conditioned adapter's routers another budget; this adapter was "
                         "trained for one target (use --by threshold)")
    if share_on == "phases" and by != "input":
        raise InputError("--share_on phases: an input per phase, for a dial --by input")
    pooled = routing.trained_range is not None
    rows, inputs, prompt_inputs, achieved = [], [], [], []
    for budget in budgets:
        routing.dial, routing.budget = None, budget
        on_budget(budget)
        if share_on == "generation":
            achieved.append(meet_in_generation(model, loader, device, budget, by, pooled, answer))
        else:
            if share_on == "phases":
                prompt_input = calibrate_input(model, loader, device, budget, "prompt")
                prompt_inputs.append(prompt_input)
                calibrate_input(model, loader, device, budget, "response", prompt_input)
            else:
                meet(model, loader, device, budget, by, share_on, pooled)
            achieved.append(validate(model, loader, device, achieved_on(share_on))["val_act_ratio"])
        rows.append(routing.dial.thresholds[0])
        if by == "input":
            inputs.append(routing.dial.inputs[0])
    routing.dial = MarginDial(torch.tensor(budgets), torch.stack(rows), torch.stack(inputs) if by == "input" else None,
                              torch.stack(prompt_inputs) if prompt_inputs else None)
    routing.budget = None
    return routing.dial, achieved


def meet(model: Transformer, loader, device, share: float, by: str, share_on: str, pooled: bool):
    """One dial entry executing `share` of the blocks over the loader's tokens `share_on` counts
    (validate's share), left in place: the router input (`by` "input") or the margin thresholds,
    whose margins are recorded under the routers' own rule (pooled over the blocks for a
    budget-conditioned adapter: module docstring). One entry serves whatever budget is asked."""
    if by == "input":
        calibrate_input(model, loader, device, share, share_on)
        return
    model.routing.dial = None
    margins = record_margins(model, loader, device, share_on)
    every_margin = torch.cat(list(margins.values())) if pooled else None

    def set_level(level: float):
        thresholds = torch.zeros(1, model.n_layers)
        shared = None if every_margin is None else torch.quantile(every_margin, level)
        for layer_id, values in margins.items():
            thresholds[0, layer_id] = torch.quantile(values, level) if shared is None else shared
        model.routing.dial = MarginDial(torch.tensor([share]), thresholds)

    calibrate_threshold(model, loader, share, device, steps=BISECTION_STEPS, set_threshold=set_level,
                        share_on=share_on)


def meet_in_generation(model: Transformer, loader, device, budget: float, by: str, pooled: bool, answer) -> float:
    """A dial entry meeting `budget` over what a generation runs, and the share a generation under it
    executes. The model's answers to the records' prompts (`answer()`) route as the records teacher
    forced with those answers do (tests/test_dial.py), so the entry is met on their tokens; but the
    answers move with the dial (their length most), so it is met first on the records, then again on
    each new generation's answers while that generation misses the budget by more than
    GENERATION_TOLERANCE, GENERATION_ROUNDS generations at most. A generation pays for every token it
    feeds, the reserved initial ones too (every block, whatever the dial), which `validate` leaves
    out: the share met there is the one that makes the whole budget."""
    def met_share(records) -> Tuple[float, float]:
        fixed = reserved_share(records, model.params.dynamic_reserve_initials)
        return fixed, max(0.0, (budget - fixed) / (1 - fixed))

    meet(model, loader, device, met_share(loader)[1], by, "all", pooled)
    for round_ in range(GENERATION_ROUNDS):
        answered = answer()
        fixed, share = met_share(answered)
        generated = fixed + (1 - fixed) * validate(model, answered, device)["val_act_ratio"]
        if abs(generated - budget) <= GENERATION_TOLERANCE or round_ == GENERATION_ROUNDS - 1:
            return generated
        meet(model, answered, device, share, by, "all", pooled)


def reserved_share(loader, reserved: int) -> float:
    """The share of the loader's real tokens that are among the first `reserved` of their row."""
    first = total = 0.0
    for batch in loader:
        example_masks = batch[3]
        first += float(example_masks[:, :reserved].sum())
        total += float(example_masks.sum())
    return first / max(total, 1.0)


def answered_loader(generator: Llama, prompts: List[List[int]], max_gen_len: int, stop_ids, batch_size: int):
    """The prompts with the model's own greedy answers under its current routing, as generation fed
    them (prompt, then answer), batched as `validate` takes them: the tokens a generation runs."""
    examples, prompt_lengths = [], []
    for at in tqdm(range(0, len(prompts), batch_size), desc="answer", leave=False):
        routing = generator.generate(prompts[at : at + batch_size], max_gen_len, temperature=0.0, actprobs=False,
                                     stop_ids=stop_ids).routing
        examples += routing.tokens
        prompt_lengths += routing.prompt_lengths
    dataset = InstructionDataset.from_tokens(examples, prompt_lengths, generator.model.params.max_seq_len)
    return val_loader(Indexed(dataset), batch_size, 0)


def calibrate_input(model: Transformer, loader, device, budget: float, share_on: str,
                    prompt_input: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The budget an input dial tells the routers so that the share over the tokens `share_on`
    counts meets `budget`, by bisection; leaves the routing's dial at it and returns it. With
    `prompt_input`, a dial per phase: the prompt's tokens are told that, and this is the response's.
    A dial per phase calibrates the prompt first (`share_on` "prompt"): its tokens never see the
    answer's, so its input alone sets their share; then the response's, with the prompt's input in
    place (its tokens attend to the prompt's keys)."""
    def set_level(level: float):  # a higher level tells a lower budget: fewer run
        model.routing.dial = MarginDial(torch.tensor([budget]), torch.zeros(1, model.n_layers),
                                        torch.tensor([1.0 - level]),
                                        None if prompt_input is None else prompt_input.reshape(1))

    calibrate_threshold(model, loader, budget, device, steps=BISECTION_STEPS, set_threshold=set_level, share_on=share_on)
    return model.routing.dial.inputs[0]


def achieved_on(share_on: str) -> str:
    """The tokens a calibration's achieved share is reported over: a dial per phase meets the budget
    on each phase, so on all of them."""
    return "all" if share_on == "phases" else share_on


@dataclass
class CalibrationConfig(ModelPaths):
    """What every calibration beside an adapter takes: the records it is calibrated on, the grid of
    budgets, and whether to replace an earlier file."""

    dataset_path: str = setting("datasets", "directory with one NAME/{train,test,prompt}.json per dataset")
    dataset_name: str = setting("", "the dataset whose training records the calibration reads (never its test "
                                "split)", required=True)
    n_records: int = setting(64, "the first training records, in file order, the calibration reads", low=1)
    batch_size: int = setting(16, "records per forward pass", low=1)
    max_seq_len: int = setting(TrainConfig.max_seq_len, "tokens per record (longer ones are cut as in fine-tuning: "
                               "give the adapter's)", low=2)
    budgets: List[float] = setting([], "the grid of budgets (shares of all blocks executed), e.g. \"[0.4, 0.7, 1.0]\" "
                                   "(default: steps of 0.05 over what the adapter can meet)", low=0.0, high=1.0)
    overwrite: bool = setting(False, "replace the file an earlier calibration left beside the adapter")


@dataclass
class DialConfig(CalibrationConfig):
    """tools/calibrate_dial.py's settings."""

    by: str = setting("threshold", "how the dial meets a budget: threshold (execute-margin thresholds, any D-LLM "
                      "adapter) or input (the budget a budget-conditioned adapter's routers are told, their rule "
                      "left as trained)", choices=("threshold", "input"))
    share_on: str = setting("all", "the tokens whose executed share meets the budget: all (prompt and response "
                            "tokens alike), response (the tokens a generation decodes, what a user pays per "
                            "generated token; prompts may then run less), phases (prompt and response each, with "
                            "an input per phase: --by input) or generation (the records' prompts and the model's own "
                            "greedy answers: what a generation runs, prefill and decode)",
                            choices=("all", "response", "phases", "generation"))
    max_gen_len: int = setting(96, "most tokens per greedy answer (--share_on generation; benchmarks.fidelity's "
                               "default)", low=1)


def adapter_and_output(config: CalibrationConfig, path_of) -> Tuple[str, str]:
    """The adapter to calibrate and the file `path_of` puts beside it, which is not overwritten
    without --overwrite."""
    adapter = config.adapter()
    if adapter is None:
        raise InputError(f"no adapter given and none shipped for {config.llama_ckpt_dir}; pass --dynamic_ckpt_dir")
    path = path_of(adapter)
    if os.path.exists(path) and not config.overwrite:
        raise InputError(f"{path} already exists; pass --overwrite to calibrate it again")
    return adapter, path


def provenance(config: CalibrationConfig, adapter: str, n_records: int) -> dict:
    """What a calibration file records of where it came from."""
    return {"adapter": os.path.abspath(adapters.adapter_file(adapter)),
            "calibrated_on": f"{config.dataset_name} train.json, first {n_records} records, "
                             f"max_seq_len {config.max_seq_len}"}


def calibrate_dial(config: DialConfig) -> str:
    """tools/calibrate_dial.py: build the adapter, calibrate its dial on the training records, write it
    beside the checkpoint; returns its path."""
    adapter, path = adapter_and_output(config, dial_path)
    generator = Llama.build(config.llama_ckpt_dir, adapter, tokenizer_path=config.tokenizer_path,
                            max_seq_len=config.max_seq_len, max_batch_size=config.batch_size)
    model, args = generator.model, generator.model.params
    budgets = sorted(config.budgets) or default_budgets(args)
    floor = args.dynamic_start_layer / args.n_layers
    if budgets[0] <= floor:
        raise InputError(f"--budgets {budgets[0]}: must be above {floor:.3f}, the share of the {args.dynamic_start_layer} "
                         f"of {args.n_layers} blocks that always run")
    records = calibration_records(generator.tokenizer, config.dataset_path, config.dataset_name, "train",
                                  config.n_records)
    loader = records_loader(records, generator.tokenizer, config.max_seq_len, config.batch_size)
    prompts = [generator.tokenizer.encode(r.prompt, bos=True, eos=False)[-(config.max_seq_len - 1):] for r in records]
    stop_ids = ChatFormat(generator.tokenizer).stop_ids

    def answer():
        return answered_loader(generator, prompts, config.max_gen_len, stop_ids, config.batch_size)

    dial, achieved = calibrate(model, loader, generator.device, budgets, generator.set_lora_strength_for, config.by,
                               config.share_on, answer)
    details = {"share_on": config.share_on}
    if config.share_on == "generation":
        details["max_gen_len"] = config.max_gen_len
    write_dial(dial, path, adapters.read_adapter(adapter).get("adapter_sha256"), achieved,
               {**provenance(config, adapter, len(records)), **details})
    for budget, share in zip(budgets, achieved):
        where = ("in greedy generation on the calibration records' prompts" if config.share_on == "generation" else
                 f"on the calibration records' {achieved_on(config.share_on)} tokens")
        print(f"budget {budget:.2f}: executed {share:.4f} of the blocks {where}")
    print(f"dial written to {path}")
    return path


@dataclass
class LoraStrengthConfig(CalibrationConfig):
    """tools/calibrate_lora_strength.py's settings."""

    n_records: int = setting(24, "the first training records, in file order, the strengths are chosen on", low=1)
    budgets: List[float] = setting([], "the grid of budgets, e.g. \"[0.5, 0.75, 1.0]\" (default: five, evenly over "
                                   "the adapter's trained range)", low=0.0, high=1.0)
    strengths: List[float] = setting([0.0, 0.25, 0.5, 0.75, 1.0], "the LoRA strengths tried at each budget (a factor "
                                     "on the trained update; 1: as trained)", low=0.0)
    overwrite: bool = setting(False, "replace the schedule an earlier calibration left beside the adapter")


def calibrate_lora_strength(config: LoraStrengthConfig) -> str:
    """tools/calibrate_lora_strength.py: at each budget of the grid, the strength with the least
    KL(base || model) per response token on the training records; written beside the checkpoint."""
    adapter, path = adapter_and_output(config, lora_strength_path)
    sizes = dict(tokenizer_path=config.tokenizer_path, max_seq_len=config.max_seq_len, max_batch_size=config.batch_size)
    generator = Llama.build(config.llama_ckpt_dir, adapter, keep_lora=True, **sizes)
    model, args = generator.model, generator.model.params
    if not args.dynamic_budget_range:
        raise InputError(f"{adapter}: a LoRA strength schedule is for budget-conditioned D-LLM adapters "
                         f"(DYNAMIC_BUDGET_RANGE); this one was trained for one target")
    low, high = args.dynamic_budget_range
    budgets = sorted(config.budgets) or [round(low + (high - low) * k / 4, 4) for k in range(5)]
    model.routing.check_budget(budgets)
    base = Llama.build(config.llama_ckpt_dir, dense=True, **sizes)
    records = load_records(config.dataset_path, config.dataset_name, "train", ChatFormat(generator.tokenizer))
    records = records[: config.n_records]
    chosen, kls = [], []
    for budget in budgets:
        model.routing.budget = budget
        row = []
        for strength in config.strengths:
            model.set_lora_strength(strength)
            sums = Sums()
            teacher_forced(model, base.model, generator.tokenizer, records, sums, config.batch_size,
                           desc=f"budget {budget} strength {strength}")
            row.append(sums.kl / sums.response_tokens)
        kls.append([round(kl, 5) for kl in row])
        chosen.append(config.strengths[min(range(len(row)), key=row.__getitem__)])
        print(f"budget {budget:.3f}: KL {', '.join(f'{kl:.4f}' for kl in row)} at strengths {config.strengths}; "
              f"strength {chosen[-1]}")
    write_lora_strength(LoraStrength(budgets, chosen), path, adapters.read_adapter(adapter).get("adapter_sha256"),
                        {**provenance(config, adapter, len(records)), "strengths_tried": config.strengths,
                         "kl_on_calibration": kls})
    print(f"LoRA strength schedule written to {path}")
    return path
