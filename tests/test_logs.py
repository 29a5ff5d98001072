"""The command lines' logging (`csm_jax.core.logs`) takes effect after a library has configured the root logger."""

import io
import logging
import subprocess
import sys

from csm_jax.core.logs import configure_logging
from tests.helpers import HANG_SECONDS, ROOT

PROGRAM = """
import logging
logging.warning("a library, at import")  # what absl does for orbax: basicConfig() and a WARNING-level handler
from csm_jax.core.logs import configure_logging
configure_logging("error", "ours %(levelname)s %(name)s %(message)s")
logging.getLogger("x").warning("below the level")
logging.getLogger("x").error("at the level")
configure_logging("debug", "ours %(levelname)s %(name)s %(message)s")
logging.getLogger("x").debug("lower now")
"""


def test_the_level_and_format_given_replace_a_handler_that_a_library_left():
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=HANG_SECONDS)
    assert done.stderr.splitlines() == ["WARNING:root:a library, at import", "ours ERROR x at the level",
                                        "ours DEBUG x lower now"]


def test_records_go_to_the_stderr_of_the_moment(monkeypatch):
    """A command line's `main` run in a notebook or a test, which replace sys.stderr: later records follow it."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # put back afterwards, with the level
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("info", "%(message)s")
    streams = [io.StringIO(), io.StringIO()]
    for i, stream in enumerate(streams):
        monkeypatch.setattr(sys, "stderr", stream)
        logging.getLogger("x").info("record %d", i)
    assert [s.getvalue() for s in streams] == ["record 0\n", "record 1\n"]
