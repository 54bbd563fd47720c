"""One-line errors for bad input, and the wrapper entry points use to turn them into an exit code."""
import os
import sys


class InputError(Exception):
    """Bad input from the user (path, file, record, flag): reported as one line, exit status 1."""


def speaks() -> bool:
    """Whether this process talks to the user: the only one, or rank 0 of a torchrun world. Every
    rank reads the same input and fails the same way; one line is enough."""
    return os.environ.get("RANK", "0") == "0"


def run_cli(main, *args, **kwargs):
    try:
        return main(*args, **kwargs)
    except InputError as e:
        if speaks():
            # one write, so the line cannot interleave with another process's output mid-line
            sys.stderr.write(f"error: {e}\n")
            sys.stderr.flush()
        sys.exit(1)
