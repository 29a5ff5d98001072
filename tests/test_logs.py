"""The command lines' logging (`csm_jax.core.logs`) takes effect after a library has configured the root logger."""

import subprocess
import sys

from tests.helpers import ROOT

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
                          timeout=120)
    assert done.stderr.splitlines() == ["WARNING:root:a library, at import", "ours ERROR x at the level",
                                        "ours DEBUG x lower now"]
