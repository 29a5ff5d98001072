"""When an utterance ends: a bias towards the end frame, a stop after trailing silence, and silence trimming.

CSM ends an utterance with the all-zero frame; codebook 0 (the backbone's choice) decides it. Three rules:

- end bias: from frame `min_frames` on, `end_bias` is added to codebook 0's logit of code 0 (a logits processor
  run inside the compiled loop). A frame whose codebook 0 is 0 at or after `min_frames` then ends the utterance,
  whatever the depth decoder made of the other codebooks (`cut_at_end`), so the rule does not depend on the depth
  decoder completing the all-zero frame.
- silence stop: judged on the decoded audio, per 80 ms frame: once speech-level audio was heard, a run of
  `stop_after_silence_ms` of frames whose RMS is below `silence_db` (dBFS) ends the utterance where the run began.
  Streamed generation stops there; batched rows are cut after the fact.
- trim: trailing audio whose RMS (10 ms windows) is below `silence_db` is removed; a window at or above it is never
  cut.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from csm_jax.core.codec import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE
from csm_jax.core.errors import UserError
from csm_jax.core.numbers import is_finite_number
from csm_jax.inference.sampling import LogitsProcessor

TRIM_WINDOW = SAMPLE_RATE // 100  # 10 ms


@dataclasses.dataclass(frozen=True)
class EndOfSpeech:
    """The end-of-speech rules of one generation; the defaults are the command line's (see
    docs/guides/end-of-speech.md)."""

    end_bias: float = 0.0  # added to codebook 0's logit of code 0; 0 = off
    min_frames: int = 10  # frames (80 ms each) before the bias applies and before a codebook-0 end counts
    stop_after_silence_ms: float = 1200.0  # 0 = off
    silence_db: float = -45.0  # RMS below this (dBFS) is near-silence
    trim_silence: bool = False

    def __post_init__(self):
        problems = [f"{name.replace('_', ' ')} must be a finite number, got {getattr(self, name)!r}"
                    for name in ("end_bias", "stop_after_silence_ms", "silence_db")
                    if not is_finite_number(getattr(self, name))]
        if problems:
            raise UserError("; ".join(problems))
        if self.end_bias < 0:
            problems.append(f"end bias must be >= 0 (0 = off), got {self.end_bias}")
        if self.min_frames < 0:
            problems.append(f"min frames must be >= 0, got {self.min_frames}")
        if self.stop_after_silence_ms < 0:
            problems.append(f"stop after silence must be >= 0 ms (0 = off), got {self.stop_after_silence_ms}")
        if self.silence_db >= 0:
            problems.append(f"silence threshold must be below 0 dBFS, got {self.silence_db}")
        if problems:
            raise UserError("; ".join(problems))

    def processor(self) -> LogitsProcessor | None:
        return end_bias_processor(self.end_bias, self.min_frames) if self.end_bias > 0 else None

    def finish(self, codes: np.ndarray, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Applies the cut rules to a finished row: codes (n, F) and its decoded audio (F * 1920,) -> both cut;
        the audio is then trimmed when asked (the codes keep whole frames)."""
        frames = codes.shape[1]
        if self.end_bias > 0:
            frames = min(frames, end_index(codes, self.min_frames))
        if self.stop_after_silence_ms > 0:
            frames = min(frames, silence_stop_frame(wave, self.stop_after_silence_ms, self.silence_db) or frames)
        codes, wave = codes[:, :frames], wave[:frames * FRAME_SAMPLES]
        return codes, trim_trailing_silence(wave, self.silence_db) if self.trim_silence else wave


@functools.lru_cache(maxsize=16)
def end_bias_processor(bias: float, min_frames: int) -> LogitsProcessor:
    """A logits processor adding `bias` to codebook 0's logit of code 0 from frame `min_frames` on (the same
    function for the same settings, so the compiled loop is reused)."""

    def processor(logits, frame, codebook):
        boost = jnp.where((codebook == 0) & (frame >= min_frames), jnp.float32(bias), jnp.float32(0.0))
        return logits.at[:, 0].add(boost.astype(logits.dtype))

    return processor


def end_index(codes: np.ndarray, min_frames: int) -> int:
    """The number of frames before the first frame at or after `min_frames` whose codebook 0 is 0."""
    ends = np.flatnonzero(np.asarray(codes)[0, min_frames:] == 0)
    return min_frames + int(ends[0]) if len(ends) else codes.shape[1]


def rms_db(wave: np.ndarray, window: int) -> np.ndarray:
    """RMS level in dBFS of each whole `window` of samples (a partial last window counts as its own)."""
    wave = np.asarray(wave, np.float32)
    padded = np.pad(wave, (0, -len(wave) % window)).reshape(-1, window)
    counts = np.minimum(window, len(wave) - window * np.arange(len(padded)))
    power = (padded.astype(np.float64) ** 2).sum(axis=1) / np.maximum(counts, 1)
    return 10 * np.log10(np.maximum(power, 1e-20))


def silence_stop_frame(wave: np.ndarray, stop_after_silence_ms: float, silence_db: float) -> int | None:
    """The frame where a run of near-silent frames lasting `stop_after_silence_ms` began, after speech-level audio
    was heard; None when there is no such run (yet)."""
    need = max(1, int(np.ceil(stop_after_silence_ms / FRAME_MS)))
    quiet = rms_db(wave, FRAME_SAMPLES) < silence_db
    heard = np.flatnonzero(~quiet)
    if not len(heard):
        return None
    run = 0
    for f in range(heard[0] + 1, len(quiet)):
        run = run + 1 if quiet[f] else 0
        if run == need:
            return f - need + 1
    return None


def trim_trailing_silence(wave: np.ndarray, silence_db: float) -> np.ndarray:
    """`wave` without its trailing 10 ms windows whose RMS is below `silence_db`."""
    loud = np.flatnonzero(rms_db(wave, TRIM_WINDOW) >= silence_db)
    return wave[:min(len(wave), (int(loud[-1]) + 1) * TRIM_WINDOW)] if len(loud) else wave[:0]
