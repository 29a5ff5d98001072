"""Mimi (moshi, PyTorch) for audio <-> codes, JAX <-> torch hand-over, and audio file I/O with soundfile.

Mimi: 24 kHz mono, 12.5 frames/s (1920 samples a frame), 32 codebooks of 2048 codes for CSM. Arrays cross
between JAX and torch through DLPack (no copy) when both live on the same kind of device, else through host
memory. Mimi computes the same on a GPU as on the CPU, for any frame count in any call: moshi's CUDA graphs are
off in our calls, and so is its torch.compile where the machine cannot compile (`moshi_switches`). Files of any
sample rate and channel count are read, down-mixed to mono and resampled to 24 kHz with a logged notice; output
is written as 24 kHz mono 16-bit PCM.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from csm_jax.core.codec import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, frames_for_samples
from csm_jax.core.errors import UserError
from csm_jax.io.hub import looks_like_hub_id

log = logging.getLogger(__name__)

MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"


class AudioError(UserError):
    """Audio that cannot be read, or a Mimi source that cannot be loaded."""


class UnreadableAudio(AudioError):
    """A file that libsndfile cannot decode (not audio, or a format it lacks)."""


# ---- Mimi ------------------------------------------------------------------------------------------------------


def load_mimi(path_or_id: str | os.PathLike | None = None, device: str = "cpu", num_codebooks: int = 32):
    """Mimi with pretrained weights.

    path_or_id: a local `.safetensors` file (or a PyTorch `.pt` file, read with `weights_only=True`: a pickle that
    holds code is refused); a hub repo id (the file `MIMI_FILE` is fetched from it); or None for the default repo
    `kyutai/moshiko-pytorch-bf16` (downloaded once into the Hugging Face cache). The weights are checked against
    Mimi's tensor names and shapes before they are loaded.
    """
    from moshi.models import loaders

    if path_or_id is not None and Path(path_or_id).is_dir():
        raise AudioError(f"Mimi weights {path_or_id} is a directory; give the .safetensors file inside it (such as "
                         f"{MIMI_FILE}) or a hub repo id such as {MIMI_REPO}")
    if path_or_id is not None and Path(path_or_id).is_file():
        path = Path(path_or_id)
    elif path_or_id is None or looks_like_hub_id(path_or_id):
        repo = MIMI_REPO if path_or_id is None else str(path_or_id)
        from huggingface_hub import hf_hub_download
        try:
            path = Path(hf_hub_download(repo, MIMI_FILE))
        except Exception as e:  # network, missing repo, gated repo: all surface as different classes
            raise AudioError(f"could not fetch {MIMI_FILE} from the hub repo {repo} ({type(e).__name__}). "
                             f"When offline, download it elsewhere and pass its local path") from None
    else:
        raise AudioError(f"Mimi weights file {path_or_id} does not exist; give an existing .safetensors file or a "
                         f"hub repo id such as {MIMI_REPO}")
    mimi = loaders.get_mimi(None, device=device, num_codebooks=num_codebooks)
    state = _read_mimi_state(path, _shapes(mimi.state_dict()))
    try:
        mimi.load_state_dict(state)
    except RuntimeError as e:  # e.g. tensors under moshi's legacy names with the wrong shapes
        raise AudioError(f"{path} does not hold Mimi's weights: {str(e).splitlines()[0]} ...; give Mimi's "
                         f"{MIMI_FILE}") from None
    return mimi


MIMI_SAFETENSORS_SUFFIXES = (".safetensors", ".sft", ".sfts")
MIMI_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}


def _read_mimi_state(path: Path, expected: dict[str, tuple[int, ...]]) -> dict:
    """Mimi's state dict from `path` after checking its tensor names and shapes against `expected`: safetensors
    (only the header is read before the check), or a PyTorch file read with `weights_only=True` (moshi's own
    loader unpickles it unrestricted; a user-supplied pickle must never reach that)."""
    suffix = path.suffix.lower()
    if suffix in MIMI_SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise AudioError(f"cannot read Mimi weights {path} as safetensors ({e}); give Mimi's {MIMI_FILE} "
                             f"(or a hub repo id such as {MIMI_REPO})") from None
        _check_mimi_tensors(path, found, expected)
        return load_file(str(path))
    if suffix in MIMI_TORCH_SUFFIXES:
        import pickle

        import torch

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise AudioError(f"refusing to load {path}: it holds Python objects besides tensors, which could run "
                             f"code when unpickled ({str(e).splitlines()[0][:200]}); give Mimi's weights as "
                             f".safetensors") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise AudioError(f"cannot read Mimi weights {path} as a PyTorch file ({str(e).splitlines()[0]}); "
                             f"give Mimi's {MIMI_FILE}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # moshi's own checkpoint format
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise AudioError(f"{path} holds no state dict of tensors; give Mimi's {MIMI_FILE}")
        _check_mimi_tensors(path, _shapes(state), expected)
        return state
    raise AudioError(f"Mimi weights {path} is neither .safetensors nor a PyTorch .pt file; give Mimi's "
                     f"{MIMI_FILE} (or a hub repo id such as {MIMI_REPO})")


# moshi renames these older buffer names when it loads a state dict
_MIMI_LEGACY_NAMES = {"inited": "_initialized", "cluster_size": "cluster_usage", "embed_avg": "embedding_sum",
                      "embed_sum": "embedding_sum"}


def _check_mimi_tensors(path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]):
    def current(name):
        prefix, _, last = name.rpartition(".")
        return f"{prefix}.{_MIMI_LEGACY_NAMES[last]}" if last in _MIMI_LEGACY_NAMES else name

    found = {current(name): shape for name, shape in found.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{n} {found[n]} (Mimi's is {expected[n]})" for n in sorted(set(found) & set(expected))
             if found[n] != expected[n]]
    if not (missing or unexpected or wrong):
        return

    def some(names):
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    problems = [f"{len(missing)} of Mimi's {len(expected)} tensors are missing ({some(missing)})" if missing else "",
                f"{len(unexpected)} tensors are not Mimi's ({some(unexpected)})" if unexpected else "",
                f"{len(wrong)} have the wrong shape ({some(wrong)})" if wrong else ""]
    raise AudioError(f"{path} does not hold Mimi's weights: {'; '.join(p for p in problems if p)}. Give Mimi's "
                     f"{MIMI_FILE} (from the hub repo {MIMI_REPO})")


def random_mimi(seed: int = 0, device: str = "cpu", num_codebooks: int = 32):
    """Mimi with random weights and *filled* codebooks, for tests without downloads.

    moshi builds uninitialised codebooks (all-zero embeddings that encode everything to code 0); here every
    codebook gets random entries on the scale of a random encoder's latents (about 1e-2, so that codes vary
    over time) and is marked initialised.
    """
    import torch
    from moshi.models import loaders

    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, device=device, num_codebooks=num_codebooks)
    gen = torch.Generator().manual_seed(seed)
    for module in mimi.modules():
        if hasattr(module, "embedding_sum") and hasattr(module, "_initialized"):
            module.embedding_sum.copy_(0.003 * torch.randn(module.embedding_sum.shape, generator=gen))
            module.cluster_usage.fill_(1.0)
            module._initialized.fill_(1.0)
            module._embedding = None  # drop the cached (all-zero) embedding
            module._cached_initialized = False
    return mimi


# moshi behaves differently on a CUDA device: it captures Mimi's streaming encoder and decoder as CUDA graphs at the
# second call of a streaming block and then refuses any other frame count (ValueError), where our callers change it
# all the time (the server's batched streams, streamed and long-form chunks); and it torch.compiles Mimi's transformer
# pieces, which needs Triton, a C compiler and Python's headers when they first run. So every Mimi call here runs
# inside `moshi_switches`. Both switches are process-wide flags of moshi, held while any of our calls runs (counted,
# so that one thread leaving does not switch them back under another).
_switch_lock = threading.Lock()
_switch_users = 0
_switched: contextlib.ExitStack | None = None


@contextlib.contextmanager
def moshi_switches(mimi) -> Iterator[None]:
    """moshi's CUDA graphs off (`no_cuda_graph`), and its torch.compile off where it cannot work here
    (`torch_compile_works`), for the block: Mimi then computes the same on a GPU as on the CPU, for any frame
    count in any call."""
    global _switch_users, _switched
    from moshi.utils import compile as moshi_compile

    compile_off = not torch_compile_works()
    if compile_off and _device_of(mimi).type == "cuda":
        _say_compile_is_off()
    with _switch_lock:
        if _switch_users == 0:
            _switched = contextlib.ExitStack()
            _switched.enter_context(moshi_compile.no_cuda_graph())
            if compile_off:  # moshi compiles only on CUDA: on the CPU this changes nothing
                _switched.enter_context(moshi_compile.no_compile())
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                _switched.close()
                _switched = None


@functools.cache
def torch_compile_works() -> bool:
    """Whether torch.compile can build GPU kernels on this machine: Triton, a C compiler ($CC, else gcc or clang,
    where Triton looks) and Python's headers (Triton builds its kernel launcher against them)."""
    return not _compile_toolchain_missing()


def _compile_toolchain_missing() -> list[str]:
    import importlib.util
    import shutil
    import sysconfig

    missing = []
    if importlib.util.find_spec("triton") is None:
        missing.append("Triton")
    if not any(shutil.which(cc) for cc in (os.environ.get("CC"), "gcc", "clang") if cc):
        missing.append("a C compiler (gcc, clang or $CC)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append("Python's headers (Python.h, e.g. the python3-dev package)")
    return missing


@functools.cache
def _say_compile_is_off() -> None:
    log.warning("Mimi runs without torch.compile (slower on the GPU): %s missing on this machine",
                " and ".join(_compile_toolchain_missing()))


def encode(mimi, audio: np.ndarray) -> np.ndarray:
    """24 kHz mono float audio (T,) -> codes (num_codebooks, ceil(T / 1920)) int32."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise AudioError(f"encode takes mono audio of shape (samples,), got {audio.shape}; use read_audio to "
                         f"down-mix a file")
    return encode_batch(mimi, [audio])[0]


# Mimi's working memory grows with the audio of one call (about 35 MB per second of audio on the CPU), so longer clips
# are encoded in chunks of this many frames (20 s) through Mimi's streaming state, which carries the convolutions'
# and the transformer's context from one chunk to the next.
ENCODE_CHUNK_FRAMES = 250


def encode_batch(mimi, audios: list[np.ndarray]) -> list[np.ndarray]:
    """Mimi codes of several utterances: those up to `ENCODE_CHUNK_FRAMES` in one call, zero-padded to the longest
    (Mimi is causal, so each utterance's codes equal encoding it alone; checked in tests/test_prepare.py), longer
    ones one at a time in chunks of that length, so that memory does not grow with a clip's length."""
    import torch

    frames = [frames_for_samples(len(a)) for a in audios]
    codes: list[np.ndarray | None] = [None] * len(audios)
    short = [i for i, n in enumerate(frames) if n <= ENCODE_CHUNK_FRAMES]
    if short:
        batch = np.zeros((len(short), 1, max(frames[i] for i in short) * FRAME_SAMPLES), np.float32)
        for row, i in enumerate(short):
            batch[row, 0, :len(audios[i])] = audios[i]
        with torch.no_grad(), moshi_switches(mimi):
            encoded = mimi.encode(torch.from_numpy(batch).to(_device_of(mimi))).to(torch.int32).cpu().numpy()
        for row, i in enumerate(short):
            codes[i] = encoded[row, :, :frames[i]]
    for i, n in enumerate(frames):
        if codes[i] is None:
            codes[i] = _encode_in_chunks(mimi, audios[i], n)
    return codes


def _encode_in_chunks(mimi, audio: np.ndarray, frames: int) -> np.ndarray:
    import torch

    step = ENCODE_CHUNK_FRAMES * FRAME_SAMPLES
    parts = []
    with torch.no_grad(), moshi_switches(mimi), mimi.streaming(1):
        for start in range(0, frames * FRAME_SAMPLES, step):
            piece = np.zeros((1, 1, min(step, frames * FRAME_SAMPLES - start)), np.float32)
            chunk = audio[start:start + step]
            piece[0, 0, :len(chunk)] = chunk
            parts.append(mimi.encode(torch.from_numpy(piece).to(_device_of(mimi))).to(torch.int32).cpu().numpy()[0])
    return np.concatenate(parts, axis=1)


def decode(mimi, codes) -> np.ndarray:
    """codes (B, num_codebooks, F) (a JAX array, numpy or torch; int) -> audio (B, F * 1920) float32 numpy."""
    import torch

    with torch.no_grad(), moshi_switches(mimi):
        audio = mimi.decode(to_torch(codes, _device_of(mimi)).long())[:, 0]
    return audio.float().cpu().numpy()


@contextlib.contextmanager
def streaming_decoder(mimi, batch_size: int = 1) -> Iterator:
    """Mimi in streaming mode: inside the block, `decode(mimi, codes)` on successive frames (B, K, n) returns
    successive audio chunks (B, n * 1920) that together equal decoding all frames at once (up to float error),
    whatever the number of frames in each call."""
    with moshi_switches(mimi), mimi.streaming(batch_size):
        yield mimi


def _device_of(mimi):
    return next(mimi.parameters()).device


# ---- JAX <-> torch -------------------------------------------------------------------------------------------


def torch_device_beside_jax() -> str:
    """"cuda" when JAX computes on a GPU and torch sees one, else "cpu": Mimi then runs on the model's card and
    codes cross between them by DLPack without a host copy."""
    import jax
    import torch

    return "cuda" if jax.default_backend() in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"


def to_torch(x, device="cpu"):
    """A JAX/numpy/torch array as a torch tensor on `device`, zero-copy via DLPack when it is already there."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x if x.flags.writeable else x.copy()).to(device)
    import jax

    if isinstance(x, jax.Array):
        jax_platform = next(iter(x.devices())).platform
        torch_type = torch.device(device).type
        if (jax_platform, torch_type) in (("cpu", "cpu"), ("gpu", "cuda"), ("cuda", "cuda")):
            return torch.from_dlpack(x).to(device)
    return torch.from_numpy(np.array(x)).to(device)


def to_jax(t):
    """A torch tensor as a JAX array (DLPack, no copy for contiguous tensors on a device JAX also uses)."""
    import jax
    import jax.numpy as jnp

    t = t.detach().contiguous()
    if t.device.type == "cpu" or any(d.platform == "gpu" for d in jax.devices()):
        return jnp.from_dlpack(t)
    return jnp.asarray(t.cpu().numpy())


# ---- files ---------------------------------------------------------------------------------------------------


def readable_formats() -> str:
    """The audio files `read_audio` reads here, for messages: "wav, flac, ogg or mp3" (mp3 needs libsndfile 1.1)."""
    import soundfile as sf

    names = [n for n in ("wav", "flac", "ogg", "mp3") if n.upper() in sf.available_formats()]
    return ", ".join(names[:-1]) + " or " + names[-1]


UNKNOWN_FRAMES = 2 ** 63 - 1  # libsndfile's frame count for a file whose header leaves it unknown (a streamed FLAC)


def _read_to_end(f) -> np.ndarray:
    """(frames, channels) float32 of an open soundfile of unknown length, read block by block through libsndfile:
    soundfile's own reads seek to their end afterwards, which fails at the end of such a file."""
    from soundfile import _ffi, _snd

    blocks = []
    while True:
        block = np.empty((1 << 16, f.channels), np.float32)
        got = _snd.sf_readf_float(f._file, _ffi.cast("float *", block.ctypes.data), len(block))
        if got <= 0:
            return np.concatenate(blocks) if blocks else np.zeros((0, f.channels), np.float32)
        blocks.append(block[:got])


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any file soundfile reads (wav, flac, ogg, mp3, ...) -> mono float32 at `sample_rate`; a file it cannot
    decode raises `UnreadableAudio`.

    Several channels are averaged and other rates resampled (polyphase, scipy), each with a logged notice.
    """
    import soundfile as sf

    if Path(path).is_dir():
        raise AudioError(f"audio file {path} is a directory; give a {readable_formats()} file")
    if not Path(path).exists():
        raise AudioError(f"audio file {path} does not exist; check the path")
    try:
        with sf.SoundFile(str(path)) as f:
            audio = _read_to_end(f) if f.frames == UNKNOWN_FRAMES else f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise UnreadableAudio(f"cannot read audio file {path}: {e}. Give a {readable_formats()} file (convert "
                              f"others with ffmpeg or sox first)") from None
    mono = as_mono(audio, f"audio file {path}", channel_axis=1)
    if rate != sample_rate:
        log.warning("%s: resampling from %d Hz to %d Hz", path, rate, sample_rate)
        mono = resample(mono, rate, sample_rate)
    return mono.astype(np.float32)


PCM_SCALES = {np.dtype(np.int16): 2.0 ** 15, np.dtype(np.int32): 2.0 ** 31}
MAX_CHANNELS = 8  # of a (samples, channels) or (channels, samples) array, the axis no longer than this is channels
FLOAT_PEAK_LIMIT = 16.0  # float audio peaking above this is integer PCM that was never scaled


def as_mono(audio, what: str = "audio", channel_axis: int | None = None) -> np.ndarray:
    """Audio as Mimi takes it: (samples,) float32, from float audio in [-1, 1] or int16/int32 PCM (scaled to
    [-1, 1]), mono (samples,) or several channels, averaged: (samples, channels) or (channels, samples), the
    channel axis being `channel_axis` or else the shorter one (at most `MAX_CHANNELS` long).

    Empty audio, NaN or infinite samples, other dtypes and shapes raise an `AudioError` that names `what`.
    """
    if audio is None:
        raise AudioError(f"{what} is None; give 24 kHz audio as a numpy array (read a file with read_audio)")
    try:
        a = np.asarray(audio)
    except (TypeError, ValueError, RuntimeError) as e:
        raise AudioError(f"{what} is not an array ({e}); give 24 kHz audio as a numpy array") from None
    if a.dtype in PCM_SCALES:
        a = a.astype(np.float32) / np.float32(PCM_SCALES[a.dtype])
    elif a.dtype.kind != "f":
        raise AudioError(f"{what} has dtype {a.dtype}; give float audio in [-1, 1] or int16/int32 PCM")
    if a.ndim == 2:
        axis = channel_axis if channel_axis is not None else (0 if a.shape[0] < a.shape[1] else 1)
        if channel_axis is None and a.shape[axis] > MAX_CHANNELS:
            raise AudioError(f"{what} has shape {a.shape}, which is no (samples, channels) array with at most "
                             f"{MAX_CHANNELS} channels; give mono audio of shape (samples,)")
        if a.shape[axis] > 1 and a.size:
            log.warning("%s: down-mixing %d channels to mono", what, a.shape[axis])
        a = a.mean(axis=axis) if a.shape[axis] else a.reshape(-1)
    elif a.ndim != 1:
        raise AudioError(f"{what} has shape {a.shape}; give mono audio of shape (samples,) or (samples, channels)")
    if a.size == 0:
        raise AudioError(f"{what} holds no samples; give at least one {FRAME_MS} ms frame ({FRAME_SAMPLES} samples) "
                         f"of {SAMPLE_RATE // 1000} kHz audio")
    a = a.astype(np.float32, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        raise AudioError(f"{what} has {int(bad.sum())} NaN or infinite samples (the first at sample "
                         f"{int(np.argmax(bad))}); repair or replace the audio (e.g. np.nan_to_num)")
    peak = float(np.abs(a).max())
    if peak > FLOAT_PEAK_LIMIT:
        raise AudioError(f"{what} peaks at {peak:g}, but float audio lies in [-1, 1]: it looks like integer PCM "
                         f"stored as floats; divide it by 32768 (or pass the int16 array itself)")
    return a


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling along the last axis (exact rational ratio)."""
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(from_rate), int(to_rate))
    return resample_poly(audio, to_rate // g, from_rate // g, axis=-1).astype(np.float32)


# what soundfile writes, by the output file's extension: (format, subtype)
OUTPUT_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def check_output_path(path: str | os.PathLike) -> Path:
    """The file `path` points to (through symlinks), after checking that audio can be written there: a supported
    extension, not a directory, an existing file writable, the directory (or its nearest existing ancestor)
    writable. Touches nothing. Raises an `AudioError` that says what to change."""
    path = Path(path)
    target = path.resolve()
    if target.is_dir():
        raise AudioError(f"output {path} is a directory; give a file name such as {path / 'out.wav'}")
    if path.suffix.lower() not in OUTPUT_FORMATS:
        named = f"has the extension {path.suffix!r}" if path.suffix else "has no extension"
        raise AudioError(f"output {path} {named}; end it with {', '.join(OUTPUT_FORMATS)} (e.g. {path.stem}.wav)")
    if target.exists() and not os.access(target, os.W_OK):
        raise AudioError(f"output {path} exists and is read-only; make it writable or give another file name")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AudioError(f"output {path} cannot be created: {ancestor} is a file, not a directory; give another path")
    if not _can_create_in(ancestor):
        raise AudioError(f"output {path} cannot be written: no permission to create files in {ancestor}; give a "
                         f"path in a writable directory")
    return target


def _can_create_in(directory: Path) -> bool:
    """Whether a file can be created in `directory` (tried for real: permission bits do not bind root)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def partial_path(path: str | os.PathLike) -> Path:
    """Where an interrupted write keeps what it wrote: out.wav -> out.partial.wav."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


@contextlib.contextmanager
def audio_writer(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> Iterator:
    """A mono `soundfile.SoundFile` for `path` (format by extension: `OUTPUT_FORMATS`) that writes into a temporary
    file in the same directory, moved onto `path` only when the block ends without error; so an existing file is
    never replaced by less. When the block raises (an interruption included), what was written is closed (its
    header then counts its frames) and kept as `partial_path(path)` with a notice, or removed when empty."""
    import tempfile

    import soundfile as sf

    path = check_output_path(path)
    fmt, subtype = OUTPUT_FORMATS[path.suffix.lower()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())  # mkstemp's is 0600
        out = sf.SoundFile(tmp, "w", samplerate=sample_rate, channels=1, format=fmt, subtype=subtype)
    except (OSError, sf.LibsndfileError) as e:
        raise AudioError(f"cannot write {path}: {e}; give a path in a writable directory") from None
    try:
        try:
            yield out
        finally:
            frames = out.frames
            out.close()
        os.replace(tmp, path)
    except BaseException as e:
        if frames and not isinstance(e, OSError):
            keep = partial_path(path)
            os.replace(tmp, keep)
            print(f"notice: kept the {frames / sample_rate:.2f} s written before the {type(e).__name__} in {keep}; "
                  f"{path} was not written", file=sys.stderr)
        else:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise AudioError(f"cannot write {path}: {e}; free some space or give another path") from None
        raise


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Writes mono float audio (T,) as 16-bit PCM wav or flac, or ogg vorbis, by the extension (clipped to
    [-1, 1]); creates parent directories; replaces an existing file only once the new one is complete."""
    with audio_writer(path, sample_rate) as out:
        out.write(np.clip(np.asarray(audio, np.float32), -1.0, 1.0))
    return Path(path)
