"""One-line errors for bad input, and the wrapper entry points use to turn them into an exit code."""
import os
import sys
import time


class InputError(Exception):
    """Bad input from the user (path, file, record, flag): reported as one line, exit status 1."""


def speaks() -> bool:
    """Whether this process talks to the user: the only one, or rank 0 of a torchrun world. Every
    rank reads the same input and fails the same way; one line is enough."""
    return os.environ.get("RANK", "0") == "0"


# how long a rank other than 0 waits for rank 0 to report the error they share
QUIET_RANK_WAIT_S = 30.0


def wait_for_rank_0():
    """A rank other than 0, failing as rank 0 does, waits for rank 0 to say so: torchrun stops every
    rank once one exits, and could stop rank 0 before it speaks. Rank 0's exit ends the wait."""
    if not speaks():
        time.sleep(QUIET_RANK_WAIT_S)


def run_cli(main, *args, **kwargs):
    try:
        return main(*args, **kwargs)
    except InputError as e:
        wait_for_rank_0()
        # every rank that gets here says it (rank 0, or one whose error rank 0 did not share), in one
        # write so the line cannot interleave with another process's output mid-line
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        sys.exit(1)
