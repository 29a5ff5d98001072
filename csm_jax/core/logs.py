"""The command lines' logging, set up whatever their dependencies did to the root logger at import.

A library that logs while it is imported may run `logging.basicConfig()` and leave a WARNING-level handler on the
root logger: orbax does, through absl's `logging.vlog` (absl calls `basicConfig()` when the root has no handler).
A later plain `basicConfig(...)` then does nothing: no INFO lines, no format, no level. `configure_logging` replaces
such handlers.
"""

from __future__ import annotations

import logging
import sys


class StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each record, not as it was when the handler was made: a command line's
    `main` called in a notebook or a test (which replace sys.stderr) never writes to a stream closed since."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass  # always sys.stderr


def configure_logging(level: int | str, fmt: str) -> None:
    """Logs of `level` and above go to stderr as `fmt`; handlers already on the root logger are removed."""
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=fmt,
                        handlers=[StderrHandler()], force=True)
