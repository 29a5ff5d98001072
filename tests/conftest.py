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


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A random transformers CSM (tiny) saved with save_pretrained, and the reference model."""
    from csm_jax.core.config import preset
    from tests.references import transformers_model

    model = transformers_model(preset("tiny"), seed=3)
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def hf_tiny_orbax(hf_tiny, tmp_path_factory):
    """`hf_tiny` converted to a csm-jax checkpoint."""
    from convert import convert_to_orbax

    return convert_to_orbax(hf_tiny[0], tmp_path_factory.mktemp("converted") / "orbax")


@pytest.fixture(scope="module")
def peft_without_torchao():
    """peft 0.21 refuses to build beside torchao 0.14 (torchtune's pin): make it see no torchao."""
    import peft.import_utils
    import peft.tuners.lora.torchao

    saved = peft.import_utils.is_torchao_available, peft.tuners.lora.torchao.is_torchao_available
    peft.import_utils.is_torchao_available = peft.tuners.lora.torchao.is_torchao_available = lambda: False
    yield peft
    peft.import_utils.is_torchao_available, peft.tuners.lora.torchao.is_torchao_available = saved


@pytest.fixture(scope="module")
def model():
    """A random `tiny_full_vocab` model: CSM's real vocabularies, so it fits the real tokenizer and Mimi."""
    from flax import nnx

    from csm_jax.core.config import preset
    from csm_jax.core.model import Csm

    return Csm(preset("tiny_full_vocab"), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def generator(model):
    """`model` with the offline tokenizer and a random Mimi."""
    from csm_jax.inference.generator import Generator
    from csm_jax.io import audio
    from csm_jax.io.text import load_tokenizer

    return Generator(model, load_tokenizer(), audio.random_mimi(0))


@pytest.fixture(scope="module")
def context_wav(tmp_path_factory):
    """espeak-ng speech at 16 kHz (on purpose: readers resample to 24 kHz)."""
    from tests.helpers import espeak_wav

    return espeak_wav(tmp_path_factory.mktemp("ctx") / "ctx.wav", "this is what came before", rate=16000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A speech server on loopback over the random `tiny_full_vocab` model (`tests.helpers.tiny_server`)."""
    from tests.helpers import tiny_server

    with tiny_server(tmp_path_factory) as s:
        yield s
