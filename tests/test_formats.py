"""Streamed response formats, checked with real decoders (sox: libFLAC, libmad; libsndfile: mpg123, libopus): the
bytes `StreamEncoder` hands out chunk by chunk make one file whose audio equals (FLAC, Opus) or matches (MP3, up to
its placeholder frame and encoder delay) libsndfile's whole-file encoding, and audio leaves before the utterance
is over; a streamed FLAC reads back through `read_audio`. Real speech from espeak-ng, in the server's chunks (one
frame, then two at a time)."""

import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from csm_jax.core.codec import FRAME_SAMPLES
from csm_jax.io import audio
from csm_jax.serving.formats import StreamEncoder, available_formats
from tests.helpers import best_lag, espeak_wav, libsndfile_encoding, sox_decode

MP3_FRAME = 576  # samples per MPEG-2 layer III frame (24 kHz)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    path = espeak_wav(tmp_path_factory.mktemp("formats") / "speech.wav", "Audio should leave as soon as it is made.")
    return audio.read_audio(path)


def streamed(wave: np.ndarray, fmt: str) -> list[bytes]:
    """What the encoder returns for each chunk (one frame, then two frames at a time), then at `finish`."""
    encoder = StreamEncoder(fmt)
    chunks = [wave[:FRAME_SAMPLES]] + [wave[i:i + 2 * FRAME_SAMPLES]
                                       for i in range(FRAME_SAMPLES, len(wave), 2 * FRAME_SAMPLES)]
    return [encoder.add(c) for c in chunks] + [encoder.finish()]


def needs(fmt: str) -> None:
    if fmt not in available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")


def test_flac_streams_losslessly_and_its_first_frame_leaves_after_4096_samples(speech):
    parts = streamed(speech, "flac")
    assert parts[0].startswith(b"fLaC")  # the stream header leaves with the first chunk
    first = sox_decode(b"".join(parts[:2]), "flac")  # 1 + 2 frames = 5760 samples in: one 4096-sample FLAC frame
    assert len(first) == 4096
    np.testing.assert_allclose(first, speech[:4096], atol=1 / 32767)
    whole = sox_decode(b"".join(parts), "flac")
    np.testing.assert_array_equal(whole, sox_decode(libsndfile_encoding(speech, "flac"), "flac"))
    np.testing.assert_allclose(whole, speech, atol=1 / 32767)  # 16-bit


def test_a_streamed_flac_reads_back_as_context_or_voice_audio(speech, tmp_path):
    path = tmp_path / "streamed.flac"
    path.write_bytes(b"".join(streamed(speech, "flac")))
    assert sf.info(str(path)).frames == audio.UNKNOWN_FRAMES  # total samples 0: the length is unknown
    np.testing.assert_allclose(audio.read_audio(path), speech, atol=1 / 32767)


def test_mp3_streams_the_whole_file_less_its_lame_tag(speech):
    needs("mp3")
    parts = streamed(speech, "mp3")
    assert len(sox_decode(parts[0], "mp3")) > MP3_FRAME  # audio after the first chunk, past the placeholder frame
    data, reference = b"".join(parts), libsndfile_encoding(speech, "mp3")
    assert len(data) == len(reference)
    differ = np.flatnonzero(np.frombuffer(data, np.uint8) != np.frombuffer(reference, np.uint8))
    assert 0 < differ.min() and differ.max() < 240  # only the first frame (240 bytes at 80 kbps) is not the tag
    np.testing.assert_array_equal(sox_decode(data, "mp3"), sox_decode(reference, "mp3"))
    got, want = sf.read(io.BytesIO(data), dtype="float32")[0], sf.read(io.BytesIO(reference), dtype="float32")[0]
    # without the LAME tag nothing trims the placeholder frame, the encoder delay (1105) and the end padding
    assert 0 < len(got) - len(want) < 4 * MP3_FRAME
    lag, correlation = best_lag(got, want)
    assert MP3_FRAME <= lag < 4 * MP3_FRAME and correlation > 0.999


def test_opus_streams_pages_of_50_ms_that_decode_like_the_libsndfile_encoding(speech):
    needs("opus")
    parts = streamed(speech, "opus")
    assert len(sf.read(io.BytesIO(parts[0]), dtype="float32")[0]) > 0  # a page of audio after the first chunk
    assert sum(1 for p in parts if p) >= len(parts) - 2  # and more after (almost) every chunk
    got = sf.read(io.BytesIO(b"".join(parts)), dtype="float32")[0]
    want = sf.read(io.BytesIO(libsndfile_encoding(speech, "opus")), dtype="float32")[0]
    np.testing.assert_array_equal(got, want)  # the same packets, only in shorter pages
    lag, correlation = best_lag(got, speech)
    assert abs(lag) <= 2 and correlation > 0.95


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
def test_ffmpeg_decodes_the_stream_as_the_whole_file(speech, fmt):
    needs(fmt)
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (optional: a third decoder)")

    def decode(data):
        done = subprocess.run(["ffmpeg", "-v", "error", "-i", "pipe:0", "-f", "f32le", "pipe:1"], input=data,
                              check=True, capture_output=True)
        assert not done.stderr, done.stderr
        return np.frombuffer(done.stdout, np.float32)

    got, want = decode(b"".join(streamed(speech, fmt))), decode(libsndfile_encoding(speech, fmt))
    if fmt == "mp3":  # the whole file's LAME tag trims the delay the stream keeps
        lag, correlation = best_lag(got, want)
        assert MP3_FRAME <= lag < 4 * MP3_FRAME and correlation > 0.999
    else:
        np.testing.assert_array_equal(got, want)
