"""torchrun for the entry points, quiet: the user sees rank 0's output as it is written, a failing
worker's error line last and once (not torchrun's ChildFailedError report after it), and the failing
worker's exit status.

    python -m dllm.launch --nproc_per_node 2 finetuning.py --llama_ckpt_dir ...

It takes torchrun's flags. Every rank writes to log files in a temporary directory and rank 0's are
copied to this terminal as they grow (progress bars included); the other ranks' would repeat it.
When another rank fails first and its last line is not rank 0's, that line is printed for it. Built
on torch.distributed.run rather than on filtering torchrun's output, so nothing depends on the
wording of torchrun's messages.
"""
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading

from torch.distributed import DistNetworkError, run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def rank_log(log_dir: str, local_rank: int, stream: str) -> list:
    return glob.glob(os.path.join(log_dir, "**", str(local_rank), f"{stream}.log"), recursive=True)


class Echo(threading.Thread):
    """Copies rank 0's stdout.log and stderr.log to this process's stdout and stderr as they grow."""

    def __init__(self, log_dir: str):
        super().__init__(daemon=True)
        self.log_dir, self.offsets, self.stderr_tail = log_dir, {}, b""
        self.done = threading.Event()

    def copy_new_output(self):
        for stream in ("stdout", "stderr"):
            for path in rank_log(self.log_dir, 0, stream):
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
                if not data:
                    continue
                self.offsets[path] = self.offsets.get(path, 0) + len(data)
                out = getattr(sys, stream).buffer
                out.write(data)
                out.flush()
                if stream == "stderr":
                    self.stderr_tail = (self.stderr_tail + data)[-8192:]

    def run(self):
        while not self.done.wait(0.1):
            self.copy_new_output()

    def finish(self) -> str:
        """Stop after copying what is left; rank 0's last stderr line."""
        self.done.set()
        self.join()
        self.copy_new_output()
        return last_line(self.stderr_tail)


def exit_status(exitcode: int) -> int:
    """A worker killed by a signal reports -SIG; a shell reports 128 + SIG."""
    return exitcode if exitcode > 0 else 128 - exitcode if exitcode < 0 else 1


def main(argv=None) -> int:
    args = torchrun.parse_args(argv)
    if int(args.nproc_per_node) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # the logs are copied as they grow
    log_dir = tempfile.mkdtemp(prefix="dllm-launch-")
    args.redirects, args.log_dir = "3", log_dir
    for name in [name for name in logging.root.manager.loggerDict if name.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the agent's warnings and error report
    echo = Echo(log_dir)
    echo.start()
    try:
        torchrun.run(args)
        echo.finish()
        return 0
    except DistNetworkError as e:
        echo.finish()
        sys.stderr.write(f"error: the launcher could not listen on port {args.master_port} ({last_line(str(e).encode())}); "
                         f"choose another with MASTER_PORT= (--master_port)\n")
        return 1
    except SignalException as e:  # Ctrl-C or a kill: torchrun has stopped the workers
        echo.finish()
        sys.stderr.write(f"stopped by {signal.Signals(e.sigval).name}\n")
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        shown = echo.finish()
        rank, failure = e.get_first_failure()
        own = e.failures.get(0)
        if own is not None and own.exitcode > 0:  # rank 0 failed too: its own line is on screen
            rank, failure = 0, own
        if rank != 0:
            line = "".join(last_line(open(path, "rb").read()) for path in rank_log(log_dir, failure.local_rank, "stderr")[:1])
            if line and line != shown:
                sys.stderr.write(f"{line}\n")
        if failure.exitcode < 0:
            sys.stderr.write(f"rank {rank} was killed by {signal.Signals(-failure.exitcode).name}\n")
        return exit_status(failure.exitcode)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
