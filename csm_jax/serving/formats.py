"""Response audio formats: 24 kHz mono as raw 16-bit PCM, WAV, FLAC and (when libsndfile has the codec) MP3 and
Opus, all streamed: bytes leave as soon as the encoder has them.

PCM and WAV go out chunk by chunk (a WAV stream carries the usual streaming header with unknown sizes,
0xFFFFFFFF). FLAC, MP3 and Opus are written by libsndfile into a seekable in-memory file whose new bytes are taken
after every chunk. At the end libsndfile seeks back to finish headers it wrote first; those writes land on bytes
already sent and are dropped, which leaves valid streams:
- FLAC: STREAMINFO keeps total samples 0 and MD5 0 ("unknown", as FLAC allows). flac, sox, ffmpeg, browsers and
  `csm_jax.io.audio.read_audio` read it; python-soundfile's reads fail at the end of an unknown-length FLAC
  (libsndfile <= 1.2.2 reports 2**63 - 1 frames; libsndfile issue 1038). The first audio frame (4096 samples)
  leaves with the chunk that holds CSM's third frame.
- MP3: the first frame stays LAME's empty placeholder for the Xing/LAME tag (one frame of silence), so the encoder
  delay is not trimmed either. Constant bit rate (80 kbps), so readers that estimate the length from the first
  frame (libsndfile) get it right. Audio frames leave from the first chunk on.
- Opus: Ogg pages of about 50 ms (libsndfile's shortest; its default is 1 s), so the first page follows the first
  chunk. Nothing is written back.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from csm_jax.core.codec import SAMPLE_RATE

MEDIA_TYPES = {"pcm": "audio/pcm", "wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg"}
# soundfile's settings for the formats libsndfile encodes
SOUNDFILE = {"flac": dict(format="FLAC", subtype="PCM_16"),
             "mp3": dict(format="MP3", subtype="MPEG_LAYER_III", bitrate_mode="CONSTANT", compression_level=0.5),
             "opus": dict(format="OGG", subtype="OPUS")}
_SET_OGG_PAGE_LATENCY_MS = 0x1302  # libsndfile's SFC_SET_OGG_PAGE_LATENCY_MS (>= 1.1); soundfile does not wrap it


def available_formats() -> list[str]:
    """The response formats this installation can write (MP3 and Opus need libsndfile >= 1.1 built with them)."""
    import soundfile as sf

    found = ["pcm", "wav"]
    for name, settings in SOUNDFILE.items():
        container, subtype = settings["format"], settings["subtype"]
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


class _SentBytes(io.BytesIO):
    """The file libsndfile writes into: `take` returns the bytes written since the last call. Writes back over
    bytes already taken change only this copy (the whole encoding stays here: for FLAC under 4.4 MB, the size of
    90 s of 16-bit PCM)."""

    taken = 0

    def take(self) -> bytes:
        with self.getbuffer() as view:
            new = bytes(view[self.taken:])
        self.taken += len(new)
        return new


def _short_ogg_pages(out) -> None:
    """Ogg pages of about 50 ms instead of libsndfile's 1 s, so Opus leaves as it is encoded."""
    from soundfile import _ffi, _snd

    latency = _ffi.new("double*", 50.0)
    _snd.sf_command(out._file, _SET_OGG_PAGE_LATENCY_MS, latency, _ffi.sizeof(latency))


class StreamEncoder:
    """Float audio chunks in, the next bytes of `fmt` out: `add` returns what the encoder has produced so far (may
    be empty while a codec fills a block), `finish` the rest. Concatenated they are one playable file."""

    def __init__(self, fmt: str):
        self.fmt, self.started = fmt, False
        self.sink = self.out = None
        if fmt in SOUNDFILE:
            import soundfile as sf

            self.sink = _SentBytes()
            self.out = sf.SoundFile(self.sink, "w", SAMPLE_RATE, 1, **SOUNDFILE[fmt])
            if fmt == "opus":
                _short_ogg_pages(self.out)

    def add(self, wave: np.ndarray) -> bytes:
        if self.out is not None:
            self.out.write(np.clip(wave, -1.0, 1.0))
            return self.sink.take()
        header = wav_header() if self.fmt == "wav" and not self.started else b""
        self.started = True
        return header + pcm16(wave)

    def finish(self) -> bytes:
        if self.out is not None:
            self.out.close()
            return self.sink.take()
        return b"" if self.started or self.fmt == "pcm" else wav_header(0)
