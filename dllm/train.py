"""Fine-tuning: the routing policy's modules + LoRA on a frozen base, CE + lambda_t * the policy's
aux loss (D-LLM: the rate loss).

Data parallel across processes (DDP over fairscale's data-parallel group) and model parallel
within a group. Checkpoints hold only the adapter (official layout) plus what resuming needs, and
are written atomically.
"""
import contextlib
import dataclasses
import fcntl
import glob
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from dllm import checkpoint, distill, distributed, schedule
from dllm.atomic_io import atomic_write_text
from dllm.chat import ChatFormat
from dllm.data import InstructionDataset, load_records, validation_split
from dllm.errors import InputError
from dllm.model import Transformer, is_adapter_key
from dllm.plots import write_curves_or_warn
from dllm.tokenizer import Tokenizer
from dllm.train_config import TrainConfig

class Indexed(Dataset):
    """Adds the record index to each item, so a bad loss can name its examples."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (i, *self.dataset[i])


class Objective(nn.Module):
    """compute_loss as a forward, so DDP's hooks see it."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, examples, labels, example_masks, label_masks, teacher_logits=None):
        return self.model.compute_loss(examples, labels, example_masks, label_masks, teacher_logits)


def param_groups(model: Transformer, weight_decay: float, router_lr_scale: float):
    """No decay on biases and norms; routers may learn at their own rate (lr_scale)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim < 2 or name.endswith(".bias") else weight_decay
        scale = router_lr_scale if ".router." in name else 1.0
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": d, "lr_scale": s} for (d, s), ps in groups.items()]


def train_loader(dataset, batch_size, seed, num_workers):
    """Shuffled per epoch (set_epoch), a disjoint share per data-parallel rank."""
    sampler = DistributedSampler(
        dataset, num_replicas=distributed.dp_size(), rank=distributed.dp_rank(), shuffle=True, seed=seed,
        drop_last=True,
    )
    # its own generator: worker seeding must not draw from the global RNG that resume restores
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def val_loader(dataset, batch_size, num_workers):
    """Every record exactly once across ranks (no padding repeats), so metrics equal a 1-process run."""
    shard = Subset(dataset, range(distributed.dp_rank(), len(dataset), distributed.dp_size()))
    return DataLoader(shard, batch_size=batch_size, num_workers=num_workers)


def trim_padding(batch):
    """Drop the padding columns every row of the batch shares: same loss, less compute."""
    width = max(1, int(batch[2].sum(1).max()))
    return [t[:, :width] for t in batch]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _dp_sum(tensor: torch.Tensor) -> list:
    """Summed over data-parallel ranks and read to the host once."""
    if distributed.dp_size() > 1:
        dist.all_reduce(tensor, group=distributed.dp_group())
    return tensor.tolist()


@torch.no_grad()
def validate(model: Transformer, loader, device) -> dict:
    """CE, rate loss and execution ratio on held-out data with inference routing (real skipping)."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for _, examples, labels, example_masks, label_masks in tqdm(loader, desc="validate", disable=not distributed.is_main(), leave=False):
        batch = [t.to(device) for t in trim_padding((examples, labels, example_masks, label_masks))]
        c_loss, a_loss, metrics = model.compute_loss(*batch)
        c, a, act, n_labels, n_tokens = (t.double() for t in (c_loss, a_loss, metrics["act_ratio"], metrics["n_labels"],
                                                              metrics["n_tokens"]))
        sums += torch.stack([c * n_labels, n_labels, a * n_tokens, act * n_tokens, n_tokens])
    model.train()
    c, n_labels, a, act, n_tokens = _dp_sum(sums)
    return {"val_c_loss": c / max(n_labels, 1), "val_a_loss": a / max(n_tokens, 1), "val_act_ratio": act / max(n_tokens, 1)}


def calibrate_threshold(model: Transformer, loader, target: float, device, steps: int = 12,
                        set_threshold=None) -> float:
    """Bisection on the policy's inference threshold in [0, 1] (higher: fewer tokens execute) until
    the executed share on these batches meets the target: for policies whose training has no signal
    for their compute (early exit), and for a D-LLM adapter's dial (dllm/dial.py, whose
    `set_threshold` sets a quantile level instead)."""
    def set_policy_threshold(value: float):
        model.routing.threshold = value

    set_threshold = set_threshold or set_policy_threshold
    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        set_threshold(middle)
        ratio = validate(model, loader, device)["val_act_ratio"]
        low, high = (middle, high) if ratio > target else (low, middle)
    set_threshold((low + high) / 2)
    return (low + high) / 2


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class OutputDir:
    """The run's output directory: refused when it holds an earlier run (unless resumed or
    overwritten), and locked so that two runs cannot write into it at once."""

    LOCK = ".lock"

    def __init__(self, config: TrainConfig):
        self.path, self.config, self.lock = config.output_dir, config, None

    def earlier_run(self) -> list:
        if not os.path.isdir(self.path):
            return []
        return sorted(name for name in os.listdir(self.path) if name.endswith(".pth") or name == "log.jsonl")

    def claim(self):
        used = self.earlier_run()
        if used and not self.config.resume and not self.config.overwrite_output_dir:
            raise InputError(
                f"{self.path} already holds a run ({', '.join(used[:3])}{', ...' if len(used) > 3 else ''}); continue it "
                f"with RESUME={self.path} (--resume), or start over with OVERWRITE=1 (--overwrite_output_dir)")
        try:
            os.makedirs(self.path, exist_ok=True)
            self.lock = open(os.path.join(self.path, self.LOCK), "a+")
        except OSError as e:
            raise InputError(f"cannot use output directory {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "?"
            self.release()
            raise InputError(f"{self.path} is in use by another training run (pid {holder}); wait for it to end, or "
                             f"choose another output directory") from None
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(f"{os.getpid()}\n")
        self.lock.flush()

    def release(self):
        if self.lock is not None:
            self.lock.close()  # closing the file drops the flock
            self.lock = None

    def clear_earlier_run(self):
        """--overwrite_output_dir: the earlier run's checkpoints, log and curves go once this run is ready."""
        for name in self.earlier_run() + ["curves.png"]:
            path = os.path.join(self.path, name)
            if os.path.isfile(path):
                os.remove(path)

    def truncate_log(self, last_step: int, next_epoch: int):
        """After a resume: the log keeps the steps up to the checkpoint's and the validations of the
        epochs before it, so each step appears once."""
        path = os.path.join(self.path, "log.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in records if (r["step"] <= last_step if "step" in r else r.get("epoch", 0) < next_epoch)]
        atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), path)

    def newest_checkpoint(self) -> str:
        """What a failure leaves to resume from, in words."""
        files = glob.glob(os.path.join(self.path, "*.pth"))
        if not files:
            return f"no checkpoint was written to {self.path}"
        newest = max(files, key=os.path.getmtime)
        ckpt = checkpoint.read_adapter(newest)
        return (f"the last checkpoint, {newest} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')}), is finite and "
                f"kept: RESUME={self.path} continues from it")


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = args = config
        self.started = time.time()
        self.device = distributed.setup(args.model_parallel_size)
        self.main = distributed.is_main()
        # the cheap checks first: nothing heavy loads before the inputs are known to be usable
        checkpoint.check_base(args.llama_model_path)  # a missing model says so before anything else
        tokenizer = Tokenizer(args.tokenizer_path or args.llama_model_path)
        params_path = args.llama_param_path or checkpoint.params_file(args.llama_model_path)
        self.model_args = checkpoint.load_params(params_path, **args.model_overrides())
        checkpoint.check_vocab(self.model_args, tokenizer, args.tokenizer_path or args.llama_model_path)
        args.check_model(self.model_args, params_path)
        self.resumed = self.read_resume(args.resume) if args.resume else None
        distill.check_teacher(args.distill_teacher)
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
        self.model = checkpoint.build_model(
            self.model_args, args.llama_model_path, None, self.device, distributed.base_dtype(self.device)
        )
        self.fingerprint = checkpoint.base_fingerprint(self.model)
        self.teacher = None
        if args.distill_teacher:
            self.teacher = distill.build_teacher(args.distill_teacher, self.model_args, args.llama_model_path,
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
        self.log(f"effective batch {eff_batch}, lr {self.lr:.3g}, router lr {self.lr * router_lr_scale:.3g}")
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, args.weight_decay, router_lr_scale), lr=self.lr, betas=(0.9, 0.95)
        )
        self.objective = Objective(self.model)
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
        ckpt = checkpoint.read_adapter(path)
        file = checkpoint.adapter_file(path)
        for key in ("epoch", "step", "optimizer", "rank_states"):
            if key not in ckpt:
                raise InputError(f"{file}: not a training checkpoint (no {key!r}); use it as an adapter instead")
        if len(ckpt["rank_states"]) != dist.get_world_size():
            raise InputError(f"{path}: saved by {len(ckpt['rank_states'])} processes, resuming with {dist.get_world_size()}")
        self.config.check_resume(ckpt.get("args", {}), file)
        ckpt["file"] = file
        return ckpt

    def write_params(self):
        if self.main:
            atomic_write_text(
                json.dumps(self.model_args.to_dict(), indent=2) + "\n", os.path.join(self.config.output_dir, "params.json")
            )

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
        adapter = checkpoint.adapter_state_dict(self.model)
        state = {"optimizer": _to_cpu(self.optimizer.state_dict()), "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        finite = all(torch.isfinite(t).all() for t in adapter.values()) and all(
            torch.isfinite(s[m]).all() for s in state["optimizer"]["state"].values() for m in ("exp_avg", "exp_avg_sq"))
        if not self.all_ranks(finite):
            raise InputError(
                f"the adapter or its optimizer state became non-finite by epoch {epoch} step {step} although every "
                f"loss was finite: the training diverged, lower the learning rate (lr {self.lr:.3g}: --blr/--lr, "
                f"finetuning.sh BLR=/LR=); {self.output.newest_checkpoint()}")
        states = [state]
        if dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        if self.main:
            checkpoint.write_adapter(
                os.path.join(self.config.output_dir, name), adapter, self.fingerprint, epoch=epoch, step=step,
                optimizer=states[0]["optimizer"], rank_states=states, args=dataclasses.asdict(self.config),
                model_args=self.model_args.to_dict())

    def all_ranks(self, ok: bool) -> bool:
        """True where every rank's ok is."""
        if dist.get_world_size() == 1:
            return ok  # no device round trip
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not flag.item()

    def resume(self):
        ckpt = self.resumed
        checkpoint.load_adapter(self.model, ckpt["file"], ckpt)
        own = ckpt["rank_states"][dist.get_rank()]
        self.optimizer.load_state_dict(own["optimizer"])
        torch.set_rng_state(own["rng"])
        if "cuda_rng" in own and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"], self.device)
        # a save on an epoch's last step resumes into that epoch: it still validates and saves
        self.start_epoch, self.start_step = ckpt["epoch"], ckpt["step"]
        self.log(f"resumed from {ckpt['file']}: epoch {self.start_epoch}, step {self.start_step}")

    def check_finite(self, loss: torch.Tensor, shown: list, indices, batch, epoch: int, step: int) -> list:
        """Stops the run on a non-finite loss; returns the `shown` 0-d tensors as numbers, read to the
        host with the loss: the step's one wait for the device."""
        finite, *values = torch.stack([torch.isfinite(loss).float()] + [t.detach().float() for t in shown]).tolist()
        if self.all_ranks(bool(finite)):
            return values
        cause = self.non_finite_cause(indices, batch)
        raise InputError(f"non-finite loss at epoch {epoch} step {step}: {cause}; {self.output.newest_checkpoint()}")

    @torch.no_grad()
    def non_finite_cause(self, indices, batch) -> str:
        """What a non-finite loss comes from, by elimination on every rank: the base weights, then this
        batch's loss at the initial adapter (the data), else the optimisation (the learning rate)."""
        base_finite = all(torch.isfinite(p).all() for name, p in self.model.state_dict().items()
                          if not is_adapter_key(name) and p.is_floating_point())
        if not self.all_ranks(base_finite):
            return (f"the base weights in {self.config.llama_model_path} hold NaN or inf: the base checkpoint is "
                    f"damaged, re-download or re-convert it")
        self.model.load_state_dict(self.initial_adapter, strict=False)
        # one example at a time (model-parallel peers hold the same batch and compute together)
        own = []
        for row, index in enumerate(indices.tolist()):
            c_loss, a_loss, _ = self.model.compute_loss(*[t[row:row + 1] for t in batch])
            if not torch.isfinite(c_loss + a_loss).item():
                own.append(index)
        where = [None] * dist.get_world_size()
        dist.all_gather_object(where, own)
        bad = sorted(set(i for rank in where for i in rank))
        train_json = os.path.join(self.config.dataset_path, self.config.dataset_name, "train.json")
        if bad:
            return (f"the loss of examples {bad} of {train_json} is not finite even at the initial adapter and the "
                    f"base weights are finite: check those records")
        return (f"the base weights are finite and the same examples give a finite loss at the initial adapter: the "
                f"training diverged, lower the learning rate (lr {self.lr:.3g}: --blr/--lr, finetuning.sh BLR=/LR=)")

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
                     f"(raise --epochs / EPOCHS to train longer)")
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
                self.model_args.execute_threshold = calibrate_threshold(
                    self.model, self.calibration_loader, self.model_args.dynamic_active_target, self.device)
                self.write_params()
                self.log(f"epoch {epoch + 1}/{args.epochs}: execute_threshold {self.model_args.execute_threshold:.4f}")
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
        use = f"--llama_ckpt_dir {args.llama_model_path} --dynamic_ckpt_dir {out}"
        if args.tokenizer_path:
            use += f" --tokenizer_path {args.tokenizer_path}"
        return "\n".join([
            f"done in {format_duration(time.time() - self.started)}: adapter in {out}/ "
            f"({args.model_save_name}-last.pth, params.json, log.jsonl, curves.png)",
            f"final validation ({self.val_split}.json): executed {metrics['val_act_ratio']:.3f} of the blocks, CE {metrics['val_c_loss']:.3f}, "
            f"perplexity {math.exp(min(metrics['val_c_loss'], 50.0)):.1f}",
            f"generate with it: torchrun --nproc_per_node {nproc} example.py {use}",
            f"evaluate it:      torchrun --nproc_per_node {nproc} evaluate.py {use}",
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
            progress = epoch + step / steps_per_epoch
            lr = schedule.learning_rate(progress, self.lr, args.min_lr, args.warmup_epochs, args.epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            lam = self.model.routing.aux_weight(progress, args.lambda_active, args.epochs)
            batch = trim_padding(batch)
            tokens += int(batch[2].sum())  # on the host, before the batch moves
            batch = [t.to(self.device) for t in batch]
            boundary = (step + 1) % args.accum_iter == 0
            sync = contextlib.nullcontext() if boundary or distributed.dp_size() == 1 else self.objective.no_sync()
            with sync:
                c_loss, a_loss, metrics = self.objective(*batch, self.teacher_logits(batch))
                loss = c_loss + lam * a_loss
                if "distill_loss" in metrics:
                    loss = loss + args.distill_weight * metrics["distill_loss"]
                (loss / args.accum_iter).backward()
            # after the backward, so the device is busy with it while the host waits for the loss
            shown = self.check_finite(loss, [c_loss, metrics["act_ratio"]], indices, batch, epoch, step)
            if boundary:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(c_loss=f"{shown[0]:.3f}", act=f"{shown[1]:.3f}", lam=f"{lam:.2f}", eta=self.eta.step())
            if (step + 1) % args.log_freq == 0:
                now = time.time()
                self.write_log({
                    "step": epoch * steps_per_epoch + step + 1, "epoch": epoch, "c_loss": shown[0],
                    "a_loss": a_loss.item(), "act_ratio": shown[1], "lambda": lam, "lr": lr,
                    **({"distill_loss": metrics["distill_loss"].item()} if "distill_loss" in metrics else {}),
                    "tokens_per_s": tokens * distributed.dp_size() / max(now - tick, 1e-9),
                })
                tick, tokens = now, 0
            if boundary and args.save_steps and (step + 1) % args.save_steps == 0:
                self.save(epoch, step + 1, f"{args.model_save_name}-last.pth")

    def teacher_logits(self, batch):
        """The teacher's logits at the positions the student's losses read (scored_positions)."""
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher.logits_at(batch[0], self.model.scored_positions(batch[3]))


class ETA:
    """Time left for the whole run (training steps of every epoch), from the pace so far."""

    def __init__(self, steps_left: int):
        self.steps_left, self.done, self.started = steps_left, 0, time.time()

    def step(self) -> str:
        self.done += 1
        return format_duration((time.time() - self.started) / self.done * max(self.steps_left - self.done, 0))


def train(config: TrainConfig):
    trainer = Trainer(config)
    try:
        trainer.train()
    except KeyboardInterrupt:
        trainer.log(f"interrupted; {trainer.output.newest_checkpoint()}")
        sys.exit(130)
