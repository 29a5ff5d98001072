"""The command lines' one convention: exit 0 when all went well, 2 for a mistake in what the user gave (one line
`error: ...` that says what was wrong and what to do, no traceback), 1 only for a bug (Python's traceback).

Every user-facing error of the project derives from `UserError`; `run_main` applies the convention.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

EXIT_OK, EXIT_BUG, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(ValueError):
    """A mistake in an argument, file, checkpoint, config or dataset the user gave; the message names the fix."""


class CheckpointError(UserError):
    """A path that does not hold a complete csm-jax checkpoint, or where one cannot be written safely."""


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs a command line's `main(argv)` under the exit-code convention."""
    try:
        return main(argv) or EXIT_OK
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
