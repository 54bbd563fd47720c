"""Atomic file writing for checkpoints and results: a temp file in the target's directory, synced,
then renamed over the target. A kill, a full disk or a read-only directory never leaves a torn or
half-replaced file, and the failure is one line naming the file."""
import os
import tempfile
from typing import Callable, IO

import torch

from dllm.errors import InputError


def atomic_write(path: str, write: Callable[[IO[bytes]], None]):
    """write(f) fills the temp file; the rename happens only if it returned."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints and results are shared artefacts
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise InputError(f"could not write {path}: {e.strerror or e}; the previous file, if any, is unchanged") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def check_writable_dir(directory: str, what: str):
    """Before the work whose results go there: the directory exists or can be made, and takes files.
    `what` names the output in the error (e.g. "--output_dir results/x")."""
    blocked = os.path.abspath(directory)
    while not os.path.exists(blocked):
        blocked = os.path.dirname(blocked)
    if not os.path.isdir(blocked):
        raise InputError(f"{what}: {blocked} is a file, not a directory; nothing was run")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise InputError(f"{what}: cannot write to {directory} ({e.strerror or e}); nothing was run") from None


def atomic_save(obj, path: str):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str):
    atomic_write_bytes(text.encode("utf-8"), path)
