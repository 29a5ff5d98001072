"""End to end, offline: random tiny CSM + random Mimi (codebooks filled) + the shipped tokenizer, context from
espeak-ng speech; through the command line and the Python API (single, batched, streamed)."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from csm_jax.io import audio
from csm_jax.io.checkpoint import save_model
from csm_jax.core.config import preset
from csm_jax.generate import main
from csm_jax.inference.generator import Generator, Request
from csm_jax.io.frames import Segment
from csm_jax.core.model import Csm
from csm_jax.io.text import load_tokenizer
from tests.helpers import HANG_SECONDS

# tiny stacks, but the real vocabularies: Llama-3 text ids and 2048 Mimi codes must embed


def test_cli_writes_a_24k_wav_with_one_frame_of_audio_per_generated_frame(model, context_wav, tmp_path):
    ckpt = save_model(model, tmp_path / "ckpt")
    out = tmp_path / "out.wav"
    result = subprocess.run(
        [sys.executable, "-m", "csm_jax.generate", "--text", "Hello there.", "--speaker", "1", "--out", str(out),
         "--context", context_wav, "this is what came before", "0", "--checkpoint", str(ckpt), "--mimi", "random",
         "--max-audio-length-ms", "800", "--seed", "3", "--depth-topk", "20", "--weights-dtype", "bfloat16"],
        capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stderr
    assert "silentcipher is not installed" in result.stderr  # the watermark is optional, and says so
    assert "resampling from 16000 Hz to 24000 Hz" in result.stderr
    frames = int(result.stderr.split("wrote ")[1].split(": ")[1].split(" frames")[0])
    info = sf.info(str(out))
    assert (info.samplerate, info.channels) == (24000, 1)
    assert 1 <= frames <= 10 and info.frames == frames * 1920


def test_cli_stream_writes_the_same_audio(model, context_wav, tmp_path):
    ckpt = save_model(model, tmp_path / "ckpt")
    common = ["--text", "Hi.", "--checkpoint", str(ckpt), "--mimi", "random", "--max-audio-length-ms", "640",
              "--no-watermark", "--context", context_wav, "this is what came before"]
    assert main(common + ["--out", str(tmp_path / "a.wav")]) == 0
    assert main(common + ["--out", str(tmp_path / "b.wav"), "--stream"]) == 0
    a, b = sf.read(str(tmp_path / "a.wav"))[0], sf.read(str(tmp_path / "b.wav"))[0]
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a, b, atol=2 / 32768)  # 16-bit rounding of float-identical decodes


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--context", "missing.wav", "words"], "audio file missing.wav does not exist"),
    (["--context", "a.wav"], "--context takes WAV TRANSCRIPT"),
    (["--max-audio-length-ms", "10"], "shorter than one 80 ms frame"),
    (["--depth-top-p", "2"], "top_p must be in"),
])
def test_cli_rejects_bad_arguments_with_a_reason(argv, message, capsys):
    assert main(["--text", "x", "--out", "x.wav", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main(["--text", "x", "--out", str(tmp_path / "x.wav"), "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_api_single_batched_and_streamed_agree(generator, context_wav):
    context = [Segment(0, "this is what came before", audio.read_audio(context_wav))]
    single = generator.generate("Hello there.", 1, context, max_audio_length_ms=960, seed=7)
    batch = generator.generate_batch([Request("Another line, longer than the first one.", 0),
                                      Request("Hello there.", 1, context)], max_audio_length_ms=960, seeds=[1, 7])
    streamed = list(generator.generate_stream("Hello there.", 1, context, max_audio_length_ms=960, seed=7,
                                              chunk_frames=3))
    assert single.dtype == np.float32 and len(single) % 1920 == 0 and 0 < len(single) <= 12 * 1920
    np.testing.assert_allclose(batch[1], single, atol=1e-5)
    assert len(streamed[0]) == 1920  # the first chunk is one frame: time to first audio
    np.testing.assert_allclose(np.concatenate(streamed), single, atol=1e-5)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused():
    small = Csm(preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use the tokenizer the model was trained with"):
        Generator(small, load_tokenizer(), mimi=None)
