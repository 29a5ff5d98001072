"""Shared tiny fixtures. Tests run on CPU; each test builds what it needs from random weights (shared builders:
tests/helpers.py and tests/references.py)."""

import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two Emilia-format shards of espeak-ng speech: EN (with four corrupt members) and ZH."""
    from tests.helpers import ENGLISH, MANDARIN, make_shard

    d = tmp_path_factory.mktemp("emilia")
    make_shard(d / "EN" / "EN-B000000.tar", "EN", ENGLISH, corrupt=True)
    make_shard(d / "ZH" / "ZH-B000000.tar", "ZH", MANDARIN)
    return d
