"""Fine-tuning: the routing policy's modules + LoRA on a frozen base, trained on the objective of
dllm/core/objective.py. `Trainer.train_step` is the step; the rest sets up, resumes, saves and reports.

Data parallel across processes (DDP over fairscale's data-parallel group) and model parallel
within a group. Checkpoints hold only the adapter (official layout) plus what resuming needs, and
are written atomically.
"""
import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from dllm import distributed
from dllm.atomic_io import atomic_write_text
from dllm.chat import ChatFormat
from dllm.checkpoints import adapters, base_model, layouts, model_params
from dllm.core.model import Transformer, is_adapter_key
from dllm.core.objective import Objective, scored_positions
from dllm.data import InstructionDataset, load_records, read_json, validation_split
from dllm.errors import InputError
from dllm.plots import write_curves_or_warn
from dllm.tokenizer import Tokenizer
from dllm.training import diagnosis, schedule, teacher
from dllm.training.config import TrainConfig
from dllm.training.data_loading import Indexed, train_loader, trim_padding, val_loader
from dllm.training.run_dir import ETA, OutputDir, format_duration
from dllm.training.validation import calibrate_threshold, validate


def param_groups(model: Transformer, weight_decay: float, router_lr_scale: float, gains_lr_scale: float = 1.0):
    """No decay on biases, norms and a budget-conditioned LoRA's gains (they start at 1, their
    neutral value); routers and those gains may learn at their own rates (lr_scale)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim < 2 or name.endswith((".bias", ".budget_gates")) else weight_decay
        scale = router_lr_scale if ".router." in name else gains_lr_scale if name.endswith(".budget_gates") else 1.0
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": d, "lr_scale": s} for (d, s), ps in groups.items()]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def example_flags(dataset_path: str, name: str, split: str) -> str:
    """example.py's flags for the first record of a split, in its dataset's own prompt: what the
    closing summary suggests generating with ("" for datasets that are not instruction records)."""
    prompt = os.path.join(dataset_path, name, "prompt.json")
    first = read_json(os.path.join(dataset_path, name, f"{split}.json"))[0]
    if not (os.path.isfile(prompt) and isinstance(first.get("instruction"), str)):
        return ""
    flags = f"--prompt_path {prompt} --instructs {shlex.quote(repr([first['instruction']]))}"
    if first.get("input"):
        flags += f" --inputs {shlex.quote(repr([first['input']]))}"
    return flags


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = args = config
        self.started = time.time()
        self.device = distributed.setup(args.model_parallel_size)
        self.main = distributed.is_main()
        # the cheap checks first: nothing heavy loads before the inputs are known to be usable
        base_model.check_base(args.llama_ckpt_dir)  # a missing model says so before anything else
        tokenizer = Tokenizer(args.tokenizer_path or args.llama_ckpt_dir)
        params_path = args.llama_param_path or layouts.params_file(args.llama_ckpt_dir)
        self.model_args = model_params.load_params(params_path, **args.model_overrides())
        self.model_args = model_params.with_vocab(self.model_args, tokenizer, args.tokenizer_path or args.llama_ckpt_dir)
        args.check_model(self.model_args, params_path)
        self.resumed = self.read_resume(args.resume) if args.resume else None
        teacher.check_teacher(args.distill_teacher)
        chat = ChatFormat(tokenizer)
        self.val_split = validation_split(args.dataset_path, args.dataset_name)
        if self.val_split == "test":
            self.log(f"warning: {args.dataset_name} has no validation.json: validating on test.json, so choose no "
                     f"recipe by these numbers")
        records = {split: load_records(args.dataset_path, args.dataset_name, split, chat)
                   for split in ("train", self.val_split)}
        # DistributedSampler(drop_last) and DataLoader(drop_last): the training loader's length
        if len(records["train"]) // distributed.dp_size() // args.batch_size < args.accum_iter:
            raise InputError(f"{args.dataset_name}: {len(records['train'])} training records give fewer batches than --accum_iter")
        self.output = OutputDir(args)
        distributed.on_main(self.output.claim)
        try:
            self.build(tokenizer, records)
        except BaseException:
            self.output.release()
            raise

    def build(self, tokenizer, records: dict):
        args = self.config
        # adapters start identical on every rank; noise (Gumbel, dropout) differs across data-parallel ranks
        torch.manual_seed(args.seed)
        self.model = base_model.build_model(
            self.model_args, args.llama_ckpt_dir, None, self.device, distributed.base_dtype(self.device)
        )
        self.fingerprint = adapters.base_fingerprint(self.model)
        self.teacher = None
        if args.distill_teacher:
            self.teacher = teacher.build_teacher(args.distill_teacher, self.model_args, args.llama_ckpt_dir,
                                                 self.device, distributed.base_dtype(self.device))
        self.initial_adapter = {k: v.clone() for k, v in self.model.state_dict().items() if is_adapter_key(k)}
        torch.manual_seed(args.seed + distributed.dp_rank())
        self.model.set_adapter_trainable(True)
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(f"trainable parameters: {n_trainable:,} of {sum(p.numel() for p in self.model.parameters()):,}")

        tokenised = {
            split: Indexed(InstructionDataset(
                tqdm(records[split], desc=f"tokenise {split}", disable=not self.main, leave=False),
                tokenizer, args.max_seq_len, args.seed,
            ))
            for split in ("train", self.val_split)
        }
        self.train_loader = train_loader(tokenised["train"], args.batch_size, args.seed, args.num_workers)
        self.val_loader = val_loader(tokenised[self.val_split], args.batch_size, args.num_workers)
        # the first training records, in file order: what a calibrated threshold is fit on
        n_calibration = min(len(records["train"]), args.calibration_batches * args.batch_size)
        self.calibration_loader = val_loader(Subset(tokenised["train"], range(n_calibration)), args.batch_size,
                                             args.num_workers)

        eff_batch = args.batch_size * args.accum_iter * distributed.dp_size()
        self.lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
        router_lr_scale = args.router_lr / self.lr if args.router_lr else 1.0
        gains_lr_scale = args.budget_lora_lr / self.lr if args.budget_lora_lr else 1.0
        gains = f", budget LoRA gains lr {self.lr * gains_lr_scale:.3g}" if args.dynamic_budget_lora else ""
        self.log(f"effective batch {eff_batch}, lr {self.lr:.3g}, router lr {self.lr * router_lr_scale:.3g}{gains}")
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, args.weight_decay, router_lr_scale, gains_lr_scale), lr=self.lr, betas=(0.9, 0.95)
        )
        self.objective = Objective(self.model, args.distill_weight, args.row_relative_loss)
        if distributed.dp_size() > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = DistributedDataParallel(
                self.objective, device_ids=device_ids, process_group=distributed.dp_group()
            )
        self.start_epoch, self.start_step = 0, 0
        if self.resumed is not None:
            self.resume()
        if self.main:
            if args.overwrite_output_dir and self.resumed is None:
                self.output.clear_earlier_run()
            if self.resumed is not None:
                self.output.truncate_log(self.start_epoch * len(self.train_loader) + self.start_step, self.start_epoch)
            self.write_params()

    def read_resume(self, path: str) -> dict:
        """The checkpoint to continue, checked against this run before the model loads."""
        ckpt = adapters.read_adapter(path)
        file = adapters.adapter_file(path)
        for key in ("epoch", "step", "optimizer", "rank_states"):
            if key not in ckpt:
                raise InputError(f"{file}: not a training checkpoint (no {key!r}); use it as an adapter instead")
        if len(ckpt["rank_states"]) != dist.get_world_size():
            raise InputError(f"{path}: saved by {len(ckpt['rank_states'])} processes, resuming with {dist.get_world_size()}")
        self.config.check_resume(ckpt.get("args", {}), file)
        ckpt["file"] = file
        return ckpt

    def trained_args(self) -> dict:
        """The model args an adapter of this run is saved with: the policy's own threshold, which
        calibration may have fit, recorded as execute_threshold."""
        threshold = self.model.routing.threshold
        if threshold is None:
            return self.model_args.to_dict()
        return dataclasses.replace(self.model_args, execute_threshold=threshold).to_dict()

    def write_params(self):
        if self.main:
            atomic_write_text(json.dumps(self.trained_args(), indent=2) + "\n",
                              os.path.join(self.config.output_dir, "params.json"))

    def log(self, message: str):
        if self.main:
            tqdm.write(message)

    def write_log(self, record: dict):
        if self.main:
            with open(os.path.join(self.config.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, epoch: int, step: int, name: str):
        """Adapter + optimizer + RNG of every rank; the collectives run on all ranks, rank 0 writes.
        A state holding NaN or inf is never written: the run stops, the last checkpoint kept."""
        adapter = adapters.adapter_state_dict(self.model)
        state = {"optimizer": _to_cpu(self.optimizer.state_dict()), "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        finite = all(torch.isfinite(t).all() for t in adapter.values()) and all(
            torch.isfinite(s[m]).all() for s in state["optimizer"]["state"].values() for m in ("exp_avg", "exp_avg_sq"))
        if not diagnosis.all_ranks(finite, self.device):
            raise InputError(
                f"the adapter or its optimizer state became non-finite by epoch {epoch} step {step} although every "
                f"loss was finite: the training diverged, lower the learning rate (lr {self.lr:.3g}: --blr/--lr); "
                f"{self.output.newest_checkpoint()}")
        states = [state]
        if dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        if self.main:
            adapters.write_adapter(
                os.path.join(self.config.output_dir, name), adapter, self.fingerprint, epoch=epoch, step=step,
                optimizer=states[0]["optimizer"], rank_states=states, args=dataclasses.asdict(self.config),
                model_args=self.trained_args())

    def resume(self):
        ckpt = self.resumed
        adapters.load_adapter(self.model, ckpt["file"], ckpt)
        own = ckpt["rank_states"][dist.get_rank()]
        self.optimizer.load_state_dict(own["optimizer"])
        torch.set_rng_state(own["rng"])
        if "cuda_rng" in own and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"], self.device)
        # a save on an epoch's last step resumes into that epoch: it still validates and saves
        self.start_epoch, self.start_step = ckpt["epoch"], ckpt["step"]
        self.log(f"resumed from {ckpt['file']}: epoch {self.start_epoch}, step {self.start_step}")

    def train(self):
        try:
            self.run()
        finally:
            self.output.release()

    def run(self):
        args = self.config
        steps_per_epoch = len(self.train_loader)
        if self.start_epoch >= args.epochs:
            self.log(f"nothing left to do: {self.resumed['file']} finished all {args.epochs} epochs "
                     f"(raise --epochs to train longer)")
            return
        self.model.train()
        self.eta = ETA(steps_per_epoch * args.epochs - (self.start_epoch * steps_per_epoch + self.start_step))
        metrics = {}
        for epoch in range(self.start_epoch, args.epochs):
            self.train_loader.sampler.set_epoch(epoch)
            first = self.start_step if epoch == self.start_epoch else 0
            self.optimizer.zero_grad(set_to_none=True)
            self.train_epoch(epoch, first, steps_per_epoch)
            if self.model.routing.calibrates_threshold:
                threshold = calibrate_threshold(self.model, self.calibration_loader,
                                                self.model_args.dynamic_active_target, self.device)
                self.write_params()
                self.log(f"epoch {epoch + 1}/{args.epochs}: execute_threshold {threshold:.4f}")
            metrics = validate(self.model, self.val_loader, self.device)
            self.write_log({"epoch": epoch, **metrics})
            self.log(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if self.main:
                write_curves_or_warn(args.output_dir, self.log)
            if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
                self.save(epoch + 1, 0, f"{args.model_save_name}-{epoch}.pth")
            self.save(epoch + 1, 0, f"{args.model_save_name}-last.pth")
        self.log(self.summary(metrics))

    def summary(self, metrics: dict) -> str:
        """Where the run went, what it reached, and the commands that use its adapter."""
        args, out = self.config, self.config.output_dir
        nproc = args.model_parallel_size
        use = f"--llama_ckpt_dir {args.llama_ckpt_dir} --dynamic_ckpt_dir {out}"
        if args.tokenizer_path:
            use += f" --tokenizer_path {args.tokenizer_path}"
        if args.preset:  # the preset's prompt, instruction and datasets fit the model it trains
            generate = evaluate = f"--preset {args.preset} {use}"
        else:
            generate = " ".join(filter(None, [use, example_flags(args.dataset_path, args.dataset_name, self.val_split)]))
            evaluate = f"{use} --datasets {args.dataset_name}"
        return "\n".join([
            f"done in {format_duration(time.time() - self.started)}: adapter in {out}/ "
            f"({args.model_save_name}-last.pth, params.json, log.jsonl, curves.png)",
            f"final validation ({self.val_split}.json): executed {metrics['val_act_ratio']:.3f} of the blocks, CE {metrics['val_c_loss']:.3f}, "
            f"perplexity {math.exp(min(metrics['val_c_loss'], 50.0)):.1f}",
            f"generate with it: torchrun --nproc_per_node {nproc} example.py {generate}",
            f"evaluate it:      torchrun --nproc_per_node {nproc} evaluate.py {evaluate}",
        ])

    def train_epoch(self, epoch: int, first_step: int, steps_per_epoch: int):
        args = self.config
        bar = tqdm(total=steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=not self.main)
        with bar:  # closed on an error too, so the error line is the last one, on its own line
            self.train_steps(bar, epoch, first_step, steps_per_epoch)

    def train_steps(self, bar, epoch: int, first_step: int, steps_per_epoch: int):
        args = self.config
        tick, tokens = time.time(), 0
        for step, (indices, *batch) in enumerate(self.train_loader):
            if step < first_step:
                continue
            batch = trim_padding(batch)
            tokens += int(batch[2].sum())  # on the host, before the batch moves
            batch = [t.to(self.device) for t in batch]
            shown = self.train_step(batch, epoch + step / steps_per_epoch, (step + 1) % args.accum_iter == 0)
            if shown is None:
                cause = diagnosis.non_finite_cause(self.model, self.initial_adapter, indices, batch, args, self.lr,
                                                   self.device)
                raise InputError(f"non-finite loss at epoch {epoch} step {step}: {cause}; "
                                 f"{self.output.newest_checkpoint()}")
            bar.update(1)
            bar.set_postfix(c_loss=f"{shown['c_loss']:.3f}", act=f"{shown['act_ratio']:.3f}",
                            lam=f"{shown['lambda']:.2f}", eta=self.eta.step())
            if (step + 1) % args.log_freq == 0:
                now = time.time()
                self.write_log({"step": epoch * steps_per_epoch + step + 1, "epoch": epoch, **shown,
                                "tokens_per_s": tokens * distributed.dp_size() / max(now - tick, 1e-9)})
                tick, tokens = now, 0
            if (step + 1) % args.accum_iter == 0 and args.save_steps and (step + 1) % args.save_steps == 0:
                self.save(epoch, step + 1, f"{args.model_save_name}-last.pth")

    def train_step(self, batch, progress: float, boundary: bool):
        """One step at `progress` (fractional epochs): the schedules' lr and aux weight, the loss and its
        backward, and on an accumulation boundary the optimizer step. Returns what the log shows, read
        to the host after the backward (the step's one wait for the device), or None if the loss is
        not finite on some rank (then nothing is stepped)."""
        args = self.config
        lr = schedule.learning_rate(progress, self.lr, args.min_lr, args.warmup_epochs, args.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        aux_weight = self.model.routing.aux_weight(progress, args.lambda_active, args.epochs)
        sync = contextlib.nullcontext() if boundary or distributed.dp_size() == 1 else self.objective.no_sync()
        with sync:
            loss, metrics = self.objective(*batch, self.teacher_logits(batch), aux_weight=aux_weight)
            (loss / args.accum_iter).backward()
        names = ["c_loss", "a_loss", "act_ratio"] + (["distill_loss"] if "distill_loss" in metrics else [])
        finite, *values = torch.stack([torch.isfinite(loss).float()] + [metrics[n].detach().float() for n in names]).tolist()
        if not diagnosis.all_ranks(bool(finite), self.device):
            return None
        if boundary:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {**dict(zip(names, values)), "lambda": aux_weight, "lr": lr}

    def teacher_logits(self, batch):
        """The teacher's logits at the positions the student's losses read (scored_positions)."""
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher.logits_at(batch[0], scored_positions(batch[3]))


def train(config: TrainConfig):
    trainer = Trainer(config)
    try:
        trainer.train()
    except KeyboardInterrupt:
        trainer.log(f"interrupted; {trainer.output.newest_checkpoint()}")
        sys.exit(130)
