"""One-line errors for bad input, and the wrapper entry points use to turn them into an exit code."""
import sys


class InputError(Exception):
    """Bad input from the user (path, file, record, flag): reported as one line, exit status 1."""


def run_cli(main, *args, **kwargs):
    try:
        return main(*args, **kwargs)
    except InputError as e:
        # one write, so the lines of several torchrun ranks cannot interleave mid-line
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        sys.exit(1)
