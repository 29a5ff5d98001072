"""Response audio formats: 24 kHz mono as raw 16-bit PCM, WAV, FLAC and (when libsndfile has the codec) MP3 and
Opus.

PCM and WAV stream chunk by chunk (a WAV stream carries the usual streaming header with unknown sizes,
0xFFFFFFFF). The compressed formats are encoded whole by libsndfile once the utterance is done: their writers
seek back to finish headers (FLAC's sample count, MP3's frame index) and buffer whole pages (Ogg), so their bytes
cannot leave before the end; ask for pcm or wav for the lowest time to first audio.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from csm_jax.core.codec import SAMPLE_RATE

MEDIA_TYPES = {"pcm": "audio/pcm", "wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg"}
# soundfile (format, subtype) of the formats it encodes
_SOUNDFILE = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}


def available_formats() -> list[str]:
    """The response formats this installation can write (MP3 and Opus need libsndfile >= 1.1 built with them)."""
    import soundfile as sf

    found = ["pcm", "wav"]
    for name, (container, subtype) in _SOUNDFILE.items():
        if container in sf.available_formats() and subtype in sf.available_subtypes(container):
            found.append(name)
    return found


def pcm16(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 44-byte PCM WAV header for 24 kHz mono 16-bit; the default size means 'unknown' (streaming)."""
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE,
                                                                       SAMPLE_RATE * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


class StreamEncoder:
    """Float audio chunks in, the bytes of `fmt` out: at once for pcm and wav, at `finish` for the others."""

    def __init__(self, fmt: str):
        self.fmt, self.started, self.held = fmt, False, []

    def add(self, wave: np.ndarray) -> bytes:
        if self.fmt not in ("pcm", "wav"):
            self.held.append(wave)
            return b""
        header = wav_header() if self.fmt == "wav" and not self.started else b""
        self.started = True
        return header + pcm16(wave)

    def finish(self) -> bytes:
        if self.fmt in ("pcm", "wav"):
            return b"" if self.started or self.fmt == "pcm" else wav_header(0)
        return encode_whole(np.concatenate(self.held) if self.held else np.zeros(0, np.float32), self.fmt)


def encode_whole(wave: np.ndarray, fmt: str) -> bytes:
    """One complete file of `fmt` (sizes in the WAV header filled in)."""
    if fmt == "pcm":
        return pcm16(wave)
    if fmt == "wav":
        data = pcm16(wave)
        return wav_header(len(data)) + data
    import soundfile as sf

    container, subtype = _SOUNDFILE[fmt]
    out = io.BytesIO()
    sf.write(out, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format=container, subtype=subtype)
    return out.getvalue()
