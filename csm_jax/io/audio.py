"""Mimi (moshi, PyTorch) for audio <-> codes, JAX <-> torch hand-over, and audio file I/O with soundfile.

Mimi: 24 kHz mono, 12.5 frames/s (1920 samples a frame), 32 codebooks of 2048 codes for CSM. Arrays cross
between JAX and torch through DLPack (no copy) when both live on the same kind of device, else through host
memory. Files of any sample rate and channel count are read, down-mixed to mono and resampled to 24 kHz with a
logged notice; output is written as 24 kHz mono 16-bit PCM.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from csm_jax.core.codec import FRAME_SAMPLES, SAMPLE_RATE, frames_for_samples
from csm_jax.core.errors import UserError
from csm_jax.io.hub import looks_like_hub_id

log = logging.getLogger(__name__)

MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"


class AudioError(UserError):
    """Audio that cannot be read, or a Mimi source that cannot be loaded."""


# ---- Mimi ------------------------------------------------------------------------------------------------------


def load_mimi(path_or_id: str | os.PathLike | None = None, device: str = "cpu", num_codebooks: int = 32):
    """Mimi with pretrained weights.

    path_or_id: a local `.safetensors` file; a hub repo id (the file `MIMI_FILE` is fetched from it); or None for
    the default repo `kyutai/moshiko-pytorch-bf16` (downloaded once into the Hugging Face cache).
    """
    from moshi.models import loaders

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
    return loaders.get_mimi(str(path), device=device, num_codebooks=num_codebooks)


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


def encode(mimi, audio: np.ndarray) -> np.ndarray:
    """24 kHz mono float audio (T,) -> codes (num_codebooks, ceil(T / 1920)) int32."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise AudioError(f"encode takes mono audio of shape (samples,), got {audio.shape}; use read_audio to "
                         f"down-mix a file")
    return encode_batch(mimi, [audio])[0]


def encode_batch(mimi, audios: list[np.ndarray]) -> list[np.ndarray]:
    """Mimi codes of several utterances in one call, zero-padded to the longest; Mimi is causal, so each
    utterance's codes equal encoding it alone (checked in tests/test_prepare.py)."""
    import torch

    frames = [frames_for_samples(len(a)) for a in audios]
    batch = np.zeros((len(audios), 1, max(frames) * FRAME_SAMPLES), np.float32)
    for i, a in enumerate(audios):
        batch[i, 0, :len(a)] = a
    with torch.no_grad():
        codes = mimi.encode(torch.from_numpy(batch).to(_device_of(mimi))).to(torch.int32).cpu().numpy()
    return [c[:, :n] for c, n in zip(codes, frames)]


def decode(mimi, codes) -> np.ndarray:
    """codes (B, num_codebooks, F) (a JAX array, numpy or torch; int) -> audio (B, F * 1920) float32 numpy."""
    import torch

    with torch.no_grad():
        audio = mimi.decode(to_torch(codes, _device_of(mimi)).long())[:, 0]
    return audio.float().cpu().numpy()


@contextlib.contextmanager
def streaming_decoder(mimi, batch_size: int = 1) -> Iterator:
    """Mimi in streaming mode: inside the block, `decode(mimi, codes)` on successive frames (B, K, n) returns
    successive audio chunks (B, n * 1920) that together equal decoding all frames at once (up to float error)."""
    with mimi.streaming(batch_size):
        yield mimi


def _device_of(mimi):
    return next(mimi.parameters()).device


# ---- JAX <-> torch -------------------------------------------------------------------------------------------


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


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any file soundfile reads (wav, flac, ogg, ...) -> mono float32 at `sample_rate`.

    Several channels are averaged and other rates resampled (polyphase, scipy), each with a logged notice.
    """
    import soundfile as sf

    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"cannot read audio file {path}: {e}. Give a wav/flac/ogg file (convert others with "
                         f"ffmpeg or sox first)") from None
    if audio.shape[0] == 0:
        raise AudioError(f"audio file {path} holds no samples")
    if audio.shape[1] > 1:
        log.warning("%s: down-mixing %d channels to mono", path, audio.shape[1])
    mono = audio.mean(axis=1)
    if rate != sample_rate:
        log.warning("%s: resampling from %d Hz to %d Hz", path, rate, sample_rate)
        mono = resample(mono, rate, sample_rate)
    return mono.astype(np.float32)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling along the last axis (exact rational ratio)."""
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(from_rate), int(to_rate))
    return resample_poly(audio, to_rate // g, from_rate // g, axis=-1).astype(np.float32)


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Writes mono float audio (T,) as 16-bit PCM wav (clipped to [-1, 1]); creates parent directories."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path
