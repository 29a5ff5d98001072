"""Mimi round trips (random weights, filled codebooks), streaming decode, DLPack hand-over and file I/O."""

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import torch

from tests.helpers import espeak_wav
from csm_jax.io import audio


@pytest.fixture(scope="module")
def mimi():
    return audio.random_mimi(0)


def test_random_mimi_uses_many_codes(mimi, tmp_path):
    speech = audio.read_audio(espeak_wav(tmp_path / "s.wav", "testing the codec with real speech"))
    codes = audio.encode(mimi, speech)
    assert codes.shape == (32, -(-len(speech) // audio.FRAME_SAMPLES)) and codes.dtype == np.int32
    assert len(np.unique(codes)) > 64  # moshi's uninitialised codebooks would give only zeros
    assert (codes[:, 1:] != codes[:, :-1]).any()
    assert codes.min() >= 0 and codes.max() < 2048


def test_decode_and_streaming_decode_agree(mimi, rng):
    codes = jnp.asarray(rng.integers(0, 2048, (2, 32, 7)), jnp.int32)
    whole = audio.decode(mimi, codes)
    assert whole.shape == (2, 7 * audio.FRAME_SAMPLES) and whole.dtype == np.float32
    with audio.streaming_decoder(mimi, batch_size=2):
        chunks = [audio.decode(mimi, codes[:, :, i:i + 2]) for i in range(0, 7, 2)]
    np.testing.assert_allclose(np.concatenate(chunks, -1), whole, atol=1e-5)


def test_dlpack_hand_over_shares_memory():
    x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    t = audio.to_torch(x)
    assert t.data_ptr() == x.unsafe_buffer_pointer()
    back = audio.to_jax(torch.arange(6, dtype=torch.int32))
    np.testing.assert_array_equal(np.asarray(back), np.arange(6))


def test_read_audio_downmixes_and_resamples(tmp_path, caplog):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], -1).astype(np.float32) * 0.5
    sf.write(tmp_path / "st.wav", stereo, 44100)
    with caplog.at_level("WARNING"):
        mono = audio.read_audio(tmp_path / "st.wav")
    assert "down-mixing 2 channels" in caplog.text and "resampling from 44100 Hz to 24000 Hz" in caplog.text
    assert mono.shape == (24000,) and mono.dtype == np.float32
    assert abs(np.abs(mono[1000:-1000]).max() - 0.25) < 0.01  # the mean of the two channels' amplitudes


def test_write_audio_is_24k_mono_pcm(tmp_path):
    path = audio.write_audio(tmp_path / "out" / "x.wav", np.full(480, 2.0, np.float32))
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (24000, 1, 480, "PCM_16")
    assert sf.read(str(path))[0].max() == pytest.approx(1.0, abs=1e-4)  # clipped


def test_unreadable_audio_and_missing_weights_explain_the_fix(tmp_path):
    (tmp_path / "bad.wav").write_text("not audio")
    with pytest.raises(audio.AudioError, match="cannot read audio file"):
        audio.read_audio(tmp_path / "bad.wav")
    with pytest.raises(audio.AudioError, match="does not exist"):
        audio.load_mimi(tmp_path / "missing.safetensors")
