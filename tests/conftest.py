"""Shared tiny fixtures. Tests run on CPU; each test builds what it needs from random weights."""

import os
import shutil
import subprocess

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def espeak_wav(path, text: str, voice: str = "en-us", rate: int = 24000) -> str:
    """Real speech without any download: espeak-ng piped through sox into a 16-bit mono wav at `rate`.

    For Mandarin pass tone-numbered pinyin (pypinyin Style.TONE3) with voice "cmn-latn-pinyin".
    """
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox are required for the audio tests: apt-get install espeak-ng sox")
    speech = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], check=True, capture_output=True).stdout
    subprocess.run(["sox", "-t", "wav", "-", "-r", str(rate), "-c", "1", "-b", "16", str(path)], input=speech,
                   check=True, capture_output=True)
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two Emilia-format shards of espeak-ng speech: EN (with four corrupt members) and ZH."""
    from tests.emilia import ENGLISH, MANDARIN, make_shard

    d = tmp_path_factory.mktemp("emilia")
    make_shard(d / "EN" / "EN-B000000.tar", "EN", ENGLISH, corrupt=True)
    make_shard(d / "ZH" / "ZH-B000000.tar", "ZH", MANDARIN)
    return d
