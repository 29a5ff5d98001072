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


def raise_interrupted(signum: int, frame=None) -> NoReturn:
    """A signal handler: raises `Interrupted` where the main thread was."""
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_handled(handler: Callable, replaceable: set | None = None) -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM go to `handler` (only those whose current handler is in `replaceable`,
    when given, so that handlers an application installed are kept); the previous handlers come back after it.
    Python takes signals in the main thread only, so elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    replaced = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
                if replaceable is None or signal.getsignal(s) in replaceable}
    try:
        yield
    finally:
        for s, previous in replaced.items():
            signal.signal(s, previous)


def signals_interrupt():
    """Inside the block SIGINT and SIGTERM raise `Interrupted` (SIGTERM would otherwise kill the process on the
    spot, leaving half-written files)."""
    return signals_handled(raise_interrupted)


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
