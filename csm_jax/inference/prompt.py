"""Prompts for generation: context segments (text + Mimi-encoded audio) then the target's text, and the
reference's frame budget (the prompt plus the frames to generate must fit the model's sequence length)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from csm_jax.core.codec import FRAME_MS
from csm_jax.core.errors import UserError
from csm_jax.io.frames import Frames, Segment, segment_frames
from csm_jax.io.text import TextTokenizer

PROMPT_BUCKET = 64  # prompt lengths and frame caps are rounded up to this, so few shapes are ever compiled


class PromptTooLongError(UserError):
    """The prompt and the requested audio length do not fit in the model's sequence length."""


def prompt_frames(tokenizer: TextTokenizer, mimi, text: str, speaker: int | str, context: Sequence[Segment] = (),
                  num_codebooks: int = 32) -> Frames:
    """The reference's prompt: every context segment (text then Mimi-encoded audio), then the target's text."""
    from csm_jax.io import audio

    coded = []
    for i, seg in enumerate(context):
        if seg.audio is None:
            raise ValueError(f"context segment {i} ({seg.text[:40]!r}) has no audio; every context segment needs "
                             f"the 24 kHz mono audio of its text")
        coded.append((seg, audio.encode(mimi, np.asarray(seg.audio, np.float32).reshape(-1))))
    return coded_prompt_frames(tokenizer, text, speaker, coded, num_codebooks)


def coded_prompt_frames(tokenizer: TextTokenizer, text: str, speaker: int | str,
                        context: Sequence[tuple[Segment, np.ndarray]] = (), num_codebooks: int = 32) -> Frames:
    """`prompt_frames` with the context already Mimi-encoded: (segment, codes (>= n, T)) pairs (saved voices)."""
    parts = [segment_frames(tokenizer, seg, codes[:num_codebooks], num_codebooks) for seg, codes in context]
    parts.append(segment_frames(tokenizer, Segment(speaker, text), None, num_codebooks))
    return Frames.concat(parts)


def max_frames_for(max_audio_length_ms: float) -> int:
    """The reference's frame budget: int(ms / 80)."""
    frames = int(max_audio_length_ms / FRAME_MS)
    if frames < 1:
        raise ValueError(f"max_audio_length_ms={max_audio_length_ms} is shorter than one 80 ms frame; ask for at "
                         f"least 80 ms")
    return frames


def check_budget(prompt_len: int, max_frames: int, max_seq_len: int) -> None:
    """The reference's rule: the prompt must be shorter than max_seq_len - max_frames."""
    if prompt_len >= max_seq_len - max_frames:
        raise PromptTooLongError(
            f"the prompt is {prompt_len} frames (context text, context audio and the target text) but with "
            f"{max_frames} frames ({max_frames * FRAME_MS} ms) of audio to generate only {max_seq_len - max_frames - 1} "
            f"fit in the model's {max_seq_len} frames; drop or shorten context segments, or lower "
            f"max_audio_length_ms")
