"""A run's output directory (refused when it holds an earlier run, locked while training) and the
time it takes (format_duration, ETA)."""
import fcntl
import glob
import json
import os
import time

from dllm.atomic_io import atomic_write_text
from dllm.checkpoints import adapters
from dllm.errors import InputError
from dllm.training.config import TrainConfig


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class ETA:
    """Time left for the whole run (training steps of every epoch), from the pace so far."""

    def __init__(self, steps_left: int):
        self.steps_left, self.done, self.started = steps_left, 0, time.time()

    def step(self) -> str:
        self.done += 1
        return format_duration((time.time() - self.started) / self.done * max(self.steps_left - self.done, 0))


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
                f"with --resume {self.path}, or start over with --overwrite_output_dir")
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
        ckpt = adapters.read_adapter(newest)
        return (f"the last checkpoint, {newest} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')}), is finite and "
                f"kept: --resume {self.path} continues from it")
