"""End-of-speech rules (end bias, silence stop, trimming), on a tiny random model and synthetic audio."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csm_jax.core.codec import FRAME_SAMPLES, SAMPLE_RATE
from csm_jax.core.config import preset
from csm_jax.core.model import Csm
from csm_jax.inference.end_of_speech import (EndOfSpeech, end_bias_processor, end_index, silence_stop_frame,
                                             trim_trailing_silence)
from csm_jax.inference.loop import FrameGenerator
from csm_jax.inference.sampling import FrameSampling, SamplerConfig
from tests.helpers import random_prompt

CONFIG = preset("tiny")
SAMPLING = FrameSampling.same(SamplerConfig(temperature=1.0, top_k=0))


@pytest.fixture(scope="module")
def frames():
    return FrameGenerator(Csm(CONFIG, rngs=nnx.Rngs(4)))


def test_end_bias_makes_the_end_code_win_after_min_frames_and_changes_nothing_before(frames):
    prompts = [random_prompt(CONFIG, s) for s in range(16)]
    seeds = list(range(100, 116))
    free = frames.generate(prompts, 8, SAMPLING, seeds)
    biased = frames.generate(prompts, 8, SAMPLING, seeds, end_bias_processor(8.0, min_frames=3))
    ends = [end_index(c, 3) for c in biased]
    for f, b in zip(free, biased):
        np.testing.assert_array_equal(b[:, :3], f[:, :3])  # same draws before min_frames
    # exp(8) against 66 other codes of similar logits: code 0 wins ~98% of draws; without the bias ~1/67
    assert np.mean([e == 3 for e in ends]) >= 0.75
    assert np.mean([c.shape[1] > 3 and c[0, 3] == 0 for c in free]) <= 0.25
    rule = EndOfSpeech(end_bias=8.0, min_frames=3, stop_after_silence_ms=0)
    cut, wave = rule.finish(biased[0], np.ones(biased[0].shape[1] * FRAME_SAMPLES, np.float32))
    assert cut.shape[1] == ends[0] and len(wave) == ends[0] * FRAME_SAMPLES


def test_end_bias_processor_touches_only_codebook_0_code_0_from_min_frames():
    logits = jnp.zeros((2, 10))
    p = end_bias_processor(5.0, min_frames=4)
    np.testing.assert_array_equal(p(logits, jnp.int32(3), jnp.int32(0)), logits)
    np.testing.assert_array_equal(p(logits, jnp.int32(4), jnp.int32(1)), logits)
    np.testing.assert_array_equal(p(logits, jnp.int32(4), jnp.int32(0)), logits.at[:, 0].set(5.0))


def tone(seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def quiet(seconds: float, rng) -> np.ndarray:
    return (1e-4 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)  # -80 dBFS


def test_silence_stop_fires_after_speech_not_on_a_leading_pause(rng):
    wave = np.concatenate([quiet(2.0, rng), tone(0.96, 0.3), quiet(0.8, rng), tone(0.4, 0.3), quiet(1.6, rng)])
    # speech from frame 25 to 37, a 10-frame pause (shorter than 1200 ms), speech to frame 52, then silence
    assert silence_stop_frame(wave, 1200, -45) == 52
    assert silence_stop_frame(wave, 640, -45) == 37
    assert silence_stop_frame(quiet(3.0, rng), 400, -45) is None  # nothing heard yet: keep going


def test_trim_removes_quiet_tails_and_never_cuts_speech_level_audio(rng):
    speech = tone(0.5, 0.3)
    click = np.full(48, 0.2, np.float32)  # 2 ms at -14 dBFS after a quiet gap
    wave = np.concatenate([speech, quiet(0.3, rng), click, quiet(0.7, rng)])
    trimmed = trim_trailing_silence(wave, -45)
    end_of_click = len(speech) + int(0.3 * SAMPLE_RATE) + len(click)
    assert end_of_click <= len(trimmed) < end_of_click + SAMPLE_RATE // 100
    np.testing.assert_array_equal(trimmed, wave[:len(trimmed)])
    assert len(trim_trailing_silence(speech, -45)) == len(speech)
    assert len(trim_trailing_silence(quiet(1.0, rng), -45)) == 0


def test_bad_end_of_speech_settings_are_refused():
    with pytest.raises(ValueError, match="end bias must be >= 0"):
        EndOfSpeech(end_bias=-1)
    with pytest.raises(ValueError, match="below 0 dBFS"):
        EndOfSpeech(silence_db=3)
