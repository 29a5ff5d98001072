"""What tests and benchmarks share: random inputs for the model, real speech from espeak-ng (and sox to decode
audio), and Emilia-format shards built from it. (The reference models written by others are in tests/references.py.)"""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from csm_jax.core.config import CsmConfig
from csm_jax.io.frames import Frames, audio_frames, text_frames

ROOT = Path(__file__).resolve().parents[1]  # the repository
# The bound of every wait in the tests (subprocesses, servers, browsers): it catches a hang, not a slow machine. Far
# above what any single step here takes on a loaded 2-core machine (the suite has run 3.5x slower under load than on
# a quiet one, where the slowest step takes about 3 minutes); it claims nothing about speed.
HANG_SECONDS = 1800

# ---- random model inputs -------------------------------------------------------------------------------------

def random_frames(rng: np.random.Generator, config: CsmConfig, batch: int, length: int):
    """Text and audio frames mixed at random: (tokens (B, S, n+1) int32, mask (B, S, n+1) bool), as jnp arrays."""
    n = config.num_codebooks
    is_audio = rng.random((batch, length)) < 0.6
    tokens = np.zeros((batch, length, n + 1), np.int32)
    tokens[..., :n] = rng.integers(0, config.audio_vocab_size, (batch, length, n))
    tokens[..., n] = rng.integers(0, config.text_vocab_size, (batch, length))
    mask = np.concatenate([np.repeat(is_audio[..., None], n, -1), ~is_audio[..., None]], -1)
    return jnp.asarray(tokens * mask), jnp.asarray(mask)


def logits_inputs(rng: np.random.Generator, config: CsmConfig, batch: int = 2, length: int = 10):
    """`random_frames`, and codes (B, n) for each row: the teacher-forced input of the depth decoder's logits."""
    tokens, mask = random_frames(rng, config, batch, length)
    return tokens, mask, rng.integers(0, config.audio_vocab_size, (batch, config.num_codebooks))


def utterance_batch(rng: np.random.Generator, config: CsmConfig, batch: int | tuple[int, ...], text_len: int,
                    audio_len: int):
    """Training rows as training data builds them: `text_len` text frames, then `audio_len` audio frames of which
    the last is the all-zero end frame. `batch` is the leading shape (rows, or (micro-batches, rows)). Returns
    (tokens (*batch, S, n+1) int64, mask (*batch, S, n+1) bool) as numpy arrays."""
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    n = config.num_codebooks
    tokens = np.zeros((*batch, text_len + audio_len, n + 1), np.int64)
    mask = np.zeros(tokens.shape, bool)
    tokens[..., :text_len, n] = rng.integers(0, config.text_vocab_size, (*batch, text_len))
    mask[..., :text_len, n] = True
    tokens[..., text_len:-1, :n] = rng.integers(0, config.audio_vocab_size, (*batch, audio_len - 1, n))
    mask[..., text_len:, :n] = True
    return tokens, mask


def random_prompt(config: CsmConfig, seed: int, context_text: int = 7, context_audio: int = 5,
                  target_text: int = 4) -> Frames:
    """A generation prompt shaped like the reference's: context text, context audio codes (then the end frame),
    target text (none when `target_text` is 0). Codes are never 0 (an all-zero frame ends speech) and below 2048
    (what Mimi decodes)."""
    rng = np.random.default_rng(seed)
    n = config.num_codebooks
    parts = [text_frames(rng.integers(0, config.text_vocab_size, context_text), n),
             audio_frames(rng.integers(1, min(2048, config.audio_vocab_size), (n, context_audio)))]
    if target_text:
        parts.append(text_frames(rng.integers(0, config.text_vocab_size, target_text), n))
    return Frames.concat(parts)


def assert_close_to_scale(got, want, tol: float) -> float:
    """float32 results that may differ in summation order: max |got - want| <= tol * max |want| (returns that
    ratio). The bound is relative to the tensor's scale, not to each element: the rounding of the large terms summed
    into a small element moves it by far more than its own size times float32's epsilon."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max()
    ratio = np.abs(got - want).max() / scale if scale else np.abs(got).max()
    assert ratio <= tol, f"max |error| is {ratio:.3g} of max |reference| {scale:.3g}, above {tol:g}"
    return ratio


# ---- real speech ---------------------------------------------------------------------------------------------

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


def sox_decode(data: bytes, fmt: str) -> np.ndarray:
    """Audio file bytes ("flac", "mp3", "wav", ...) -> float32 samples, decoded by sox (libFLAC, libmad), which
    reads streams whose header leaves the length unknown (libsndfile cannot read such a FLAC to its end)."""
    done = subprocess.run(["sox", "-t", fmt, "-", "-t", "f32", "-"], input=data, check=True, capture_output=True)
    return np.frombuffer(done.stdout, np.float32)


def libsndfile_encoding(wave: np.ndarray, fmt: str) -> bytes:
    """libsndfile's own encoding of a whole utterance as the server's `fmt` ("flac", "mp3", "opus"), its headers
    completed by seeking back."""
    from csm_jax.core.codec import SAMPLE_RATE
    from csm_jax.serving.formats import SOUNDFILE

    out = io.BytesIO()
    sf.write(out, wave, SAMPLE_RATE, **SOUNDFILE[fmt])
    return out.getvalue()


def best_lag(signal: np.ndarray, reference: np.ndarray, max_lag: int = 4000) -> tuple[int, float]:
    """The delay (samples, at most `max_lag` either way) of `reference` inside `signal` that correlates best, and
    the correlation coefficient of the overlapping parts there."""
    from scipy.signal import correlate

    scores = correlate(signal, reference, mode="full", method="fft")
    lags = np.arange(len(scores)) - (len(reference) - 1)
    near = np.abs(lags) <= max_lag
    lag = int(lags[near][np.argmax(scores[near])])
    a, b = signal[max(lag, 0):], reference[max(-lag, 0):]
    n = min(len(a), len(b))
    return lag, float(np.corrcoef(a[:n], b[:n])[0, 1])


# ---- Emilia-format WebDataset shards (English, and Mandarin spoken as tone-numbered pinyin) --------------------

ENGLISH = ["Hello there, how are you today?", "The weather is lovely this morning.",
           "Please pass me the salt.", "We will meet again tomorrow."]
MANDARIN = ["你好，今天天气很好。", "我们明天再见。"]


def _mp3_bytes(tmp: Path, text: str, voice: str) -> bytes:
    wav = espeak_wav(tmp / "u.wav", text, voice)
    subprocess.run(["sox", wav, str(tmp / "u.mp3")], check=True, capture_output=True)
    return (tmp / "u.mp3").read_bytes()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def utterance_json(key: str, text: str, language: str, duration: float = 2.0, dnsmos: float = 3.5) -> bytes:
    return json.dumps({"id": key, "wav": f"{key}.mp3", "text": " " + text, "duration": duration,
                       "speaker": f"{language}_B000000_S00001", "language": language.lower(),
                       "dnsmos": dnsmos}).encode()


def make_shard(path: Path, language: str, texts: list[str], corrupt: bool = False) -> Path:
    """One shard `{LANG}-B000000.tar`; with `corrupt`, adds a bad mp3, a missing json, an empty text and NaN audio."""
    from pypinyin import Style, lazy_pinyin

    tmp = path.parent / f".{path.stem}-work"
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(texts):
            key = f"{language}_B000000_S00001_W{i:06d}"
            spoken, voice = ((" ".join(lazy_pinyin(text, style=Style.TONE3)), "cmn-latn-pinyin")
                             if language == "ZH" else (text, "en-us"))
            add_member(tar, f"{key}.mp3", _mp3_bytes(tmp, spoken, voice))
            add_member(tar, f"{key}.json", utterance_json(key, text, language))
        if corrupt:
            add_member(tar, "bad_mp3.mp3", b"\xff\xfb\x90\x00 this is not an mp3 stream" * 10)
            add_member(tar, "bad_mp3.json", utterance_json("bad_mp3", "broken audio", language))
            add_member(tar, "no_json.mp3", _mp3_bytes(tmp, "no metadata", "en-us"))
            add_member(tar, "empty_text.mp3", _mp3_bytes(tmp, "silence", "en-us"))
            add_member(tar, "empty_text.json", utterance_json("empty_text", "   ", language))
            nan = io.BytesIO()
            sf.write(nan, np.full(4800, np.nan, np.float32), 24000, format="WAV", subtype="FLOAT")
            add_member(tar, "nan_audio.wav", nan.getvalue())
            add_member(tar, "nan_audio.json", utterance_json("nan_audio", "not a number", language))
    return path


# ---- the speech server ------------------------------------------------------------------------------------

KEY = "test-key"
NARRATOR = "the narrator speaks first"


@contextlib.contextmanager
def tiny_server(tmp_path_factory, **overrides):
    """A speech server on 127.0.0.1 in this process (`csm_jax.serve.serve_in_background`) over the random
    `tiny_full_vocab` model, with one voice ("narrator") loaded from a folder, for the block's duration."""
    import types

    from flax import nnx

    from csm_jax.core.model import Csm
    from csm_jax.inference.generator import Generator
    from csm_jax.io import audio
    from csm_jax.io.text import load_tokenizer
    from csm_jax.serve import serve_in_background
    from csm_jax.serving.app import ServeConfig, build_app

    from csm_jax.core.config import preset

    generator = Generator(Csm(preset("tiny_full_vocab"), rngs=nnx.Rngs(1)), load_tokenizer(), audio.random_mimi(0))
    voices = tmp_path_factory.mktemp("voices")
    (voices / "narrator").mkdir()
    espeak_wav(voices / "narrator" / "clip.wav", NARRATOR, rate=16000)
    (voices / "narrator" / "clip.txt").write_text(NARRATOR)
    (voices / "narrator" / "speaker.txt").write_text("1")
    settings = dict(slots=2, max_queue=2, chunk_frames=2, api_key=KEY, max_body_bytes=1 << 20, max_input_chars=300,
                    max_audio_ms=20_000, request_timeout=HANG_SECONDS)
    config = ServeConfig(**{**settings, **overrides})
    app = build_app(generator, config, voices)
    with serve_in_background(app) as url:
        yield types.SimpleNamespace(url=url, generator=generator, voices=voices, app=app, config=config)


# ---- our model and command lines -----------------------------------------------------------------------------

def tiny_checkpoint(path) -> str:
    """A random `tiny_full_vocab` model saved as a csm-jax checkpoint at `path` (what `python -m convert` writes)."""
    from flax import nnx

    from csm_jax.core.config import preset
    from csm_jax.core.model import Csm
    from csm_jax.io.checkpoint import save_model

    return str(save_model(Csm(preset("tiny_full_vocab"), rngs=nnx.Rngs(1)), path))


def random_mimi_file(path) -> str:
    """Random Mimi weights (`csm_jax.io.audio.random_mimi`) in a .safetensors file, as a user passes real ones."""
    from safetensors.torch import save_file

    from csm_jax.io import audio

    save_file({k: v.contiguous() for k, v in audio.random_mimi(0).state_dict().items()}, path)
    return str(path)


class WatchedProcess:
    """A command line in a subprocess (from the repository root), its stderr collected as it comes; its waits are
    bounded by `HANG_SECONDS`."""

    def __init__(self, argv: list[str]):
        import threading

        self.process = subprocess.Popen([str(a) for a in argv], cwd=ROOT, stderr=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL)
        self.err = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for chunk in iter(lambda: self.process.stderr.read1(4096), b""):
            self.err += chunk

    def wait_for(self, text: str, timeout: float = HANG_SECONDS):
        import time

        deadline = time.monotonic() + timeout
        while text.encode() not in self.err:
            assert self.process.poll() is None, self.err.decode(errors="replace")
            assert time.monotonic() < deadline, self.err.decode(errors="replace")
            time.sleep(0.2)

    def finish(self, timeout: float = HANG_SECONDS) -> tuple[int, str]:
        code = self.process.wait(timeout)
        self.reader.join(10)
        return code, self.err.decode(errors="replace")


def our_logits(model, tokens, mask, codes):
    """Our model's codebook-0 logits of every position and depth logits of the last, as numpy."""
    c0, hidden = model(tokens, mask)
    depth = model.depth_logits(hidden[:, -1], jnp.asarray(codes, jnp.int32))
    return np.asarray(c0), np.asarray(depth)


def run_train(*overrides: str) -> subprocess.CompletedProcess:
    """`python -m train` with the smoke config and `overrides`, from the repository root; asserts it succeeded."""
    out = subprocess.run([sys.executable, "-m", "train", "--config", "train/configs/smoke.py", *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def truncated_adapter(directory: Path) -> Path:
    """A LoRA adapter directory whose adapter_model.safetensors breaks off halfway (a download or copy cut short)."""
    from safetensors.numpy import save_file

    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"x": np.zeros((64, 64), np.float32)}, directory / "adapter_model.safetensors")
    whole = (directory / "adapter_model.safetensors").read_bytes()
    (directory / "adapter_model.safetensors").write_bytes(whole[:len(whole) // 2])
    return directory
