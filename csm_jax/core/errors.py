"""The command lines' one convention: exit 0 when all went well, 2 for a mistake in what the user gave (one line
`error: ...` that says what was wrong and what to do, no traceback), 1 only for a bug (Python's traceback), and
128 + the signal's number when SIGINT (130) or SIGTERM (143) stopped it.

Every user-facing error of the project derives from `UserError`; `run_main` applies the convention.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator, NoReturn, Sequence

EXIT_OK, EXIT_BUG, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(ValueError):
    """A mistake in an argument, file, checkpoint, config or dataset the user gave; the message names the fix."""


class CheckpointError(UserError):
    """A path that does not hold a complete csm-jax checkpoint, or where one cannot be written safely."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the program was, so that `finally` blocks and context managers clean up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are `UserError`s: one `error: ...` line from `run_main` instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM raise `Interrupted` (SIGTERM would otherwise kill the process on the
    spot, leaving half-written files); the previous handlers come back after it."""
    def interrupt(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # Python takes signals in the main thread only
        yield
        return
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs a command line's `main(argv)` under the exit-code convention."""
    try:
        return main(argv) or EXIT_OK
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_INTERRUPTED)
