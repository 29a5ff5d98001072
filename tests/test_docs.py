"""The documentation site builds with `mkdocs build --strict`: a broken link or anchor, a missing page, an included
example that moved, a reference to a renamed function or a command line without `build_parser` fails here."""

import html
import os
import re
import subprocess
import sys

from tests.helpers import ROOT


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    # the options tables come from the parsers: one option of each command line
    for option in ["--weights-dtype", "--slots", "--voice-map", "--overwrite", "--distributed", "--clip-seconds",
                   "--out"]:
        assert option in cli, option
    assert "int4" in cli  # --weights-dtype's choices
    train = (tmp_path / "site" / "reference" / "train" / "index.html").read_text()
    assert "learning_rate" in train and "eval_fraction" in train and "eval_optional" in train and "base_dtype" in train
    assert "<code>str | None</code>" in train  # a type's pipe in a table cell, shown without an escaping backslash
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "max_queue" in api and "voice_aliases" in api  # ServeConfig's fields
    # the examples are included, not linked
    page = (tmp_path / "site" / "guides" / "sampling-research" / "index.html").read_text()
    assert "def no_repeat(logits, keys, frame, codebook, previous)" in html.unescape(re.sub("<[^>]+>", "", page))
