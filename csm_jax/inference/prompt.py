"""Generation requests, checked once where they enter (`check_request`, `speaker_id`, `check_seeds`,
`max_frames_for`), and prompts: context segments (text + Mimi-encoded audio) then the target's text, within the
reference's frame budget (the prompt plus the frames to generate must fit the model's sequence length), checked
from the context audio's duration before anything is encoded."""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Sequence

import numpy as np

from csm_jax.core.codec import FRAME_MS, frames_for_samples
from csm_jax.core.errors import UserError
from csm_jax.io.frames import Frames, Segment, segment_frames
from csm_jax.io.text import TextTokenizer

PROMPT_BUCKET = 64  # prompt lengths and frame caps are rounded up to this, so few shapes are ever compiled
SEED_LIMIT = 2 ** 32  # seeds are 32-bit PRNG keys


class RequestError(UserError):
    """A generation request that cannot be honoured: its text, speaker, context, seed or audio length."""


class PromptTooLongError(RequestError):
    """The prompt and the requested audio length do not fit in the model's sequence length."""


def speaker_id(speaker, what: str = "speaker") -> int:
    """A speaker id as the reference writes it into `[speaker]text`: an integer >= 0, given as an int or a string
    of digits ("1"); "01" is speaker 1."""
    if isinstance(speaker, Integral) and not isinstance(speaker, bool) and speaker >= 0:
        return int(speaker)
    if isinstance(speaker, str) and re.fullmatch(r"[0-9]+", speaker):
        return int(speaker)
    raise RequestError(f"{what} {speaker!r} is not a speaker id; speaker ids are integers >= 0 such as 0 or 1 "
                       f"(the speaker's turn in the conversation)")


def check_text(text, what: str, allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise RequestError(f"{what} is {text!r} ({type(text).__name__}), not a str; give the words as a string")
    if not allow_empty and not text.strip():
        raise RequestError(f"{what} is empty; give the words to say")
    return text


def check_request(text, speaker, context) -> tuple[str, int, list[Segment]]:
    """The target's text and speaker and the context segments, checked and normalised: speakers as ints, audio as
    24 kHz mono float32 (int PCM scaled, channels averaged; see `csm_jax.io.audio.as_mono`)."""
    from csm_jax.io.audio import as_mono

    text, speaker = check_text(text, "text"), speaker_id(speaker)
    if context is None:
        context = ()
    if isinstance(context, (Segment, str)) or not isinstance(context, Sequence):
        raise RequestError(f"context is a {type(context).__name__}; give a list of Segment(speaker, text, audio), "
                           f"oldest first (or nothing)")
    segments = []
    for i, seg in enumerate(context):
        name = f"context segment {i}"
        if not isinstance(seg, Segment):
            raise RequestError(f"{name} is a {type(seg).__name__}; give Segment(speaker, text, audio)")
        seg_text = check_text(seg.text, f"{name}'s text", allow_empty=True)
        if seg.audio is None:
            raise RequestError(f"{name} ({seg_text[:40]!r}) has no audio; every context segment needs the 24 kHz "
                               f"audio of its text")
        segments.append(Segment(speaker_id(seg.speaker, f"{name}'s speaker"), seg_text,
                                as_mono(seg.audio, f"{name}'s audio")))
    return text, speaker, segments


def check_seeds(seeds, count: int) -> list[int]:
    """One seed per request, each in [0, 2**32); None gives 0, 1, 2, ..."""
    if seeds is None:
        return list(range(count))
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
        raise RequestError(f"seeds is a {type(seeds).__name__}; give a list of {count} integer seeds")
    if len(seeds) != count:
        raise RequestError(f"got {count} requests but {len(seeds)} seeds; give one seed per request")
    for s in seeds:
        if not isinstance(s, Integral) or isinstance(s, bool) or not 0 <= s < SEED_LIMIT:
            raise RequestError(f"seed {s!r} is not an integer in [0, 2**32); give a seed such as 0 (seeds are 32-bit)")
    return [int(s) for s in seeds]


def prompt_frames(tokenizer: TextTokenizer, mimi, text: str, speaker: int | str, context: Sequence[Segment] = (),
                  num_codebooks: int = 32, *, max_frames: int = 1, max_seq_len: int | None = None) -> Frames:
    """The reference's prompt: every context segment (text then Mimi-encoded audio), then the target's text.

    With `max_seq_len`, the prompt's length (known from the context audio's duration) is checked against the
    budget for `max_frames` frames before any audio is encoded.
    """
    from csm_jax.io import audio

    text, speaker, context = check_request(text, speaker, context)
    texts = [segment_frames(tokenizer, seg, None, num_codebooks) for seg in context]
    target = segment_frames(tokenizer, Segment(speaker, text), None, num_codebooks)
    length = len(target) + sum(len(t) + frames_for_samples(len(seg.audio)) + 1 for t, seg in zip(texts, context))
    if max_seq_len is not None:
        check_budget(length, max_frames, max_seq_len)
    coded = []
    for seg in context:
        codes = audio.encode(mimi, seg.audio)
        if codes.shape[0] < num_codebooks:
            raise RequestError(f"the Mimi model gives {codes.shape[0]} codebooks but the model needs "
                               f"{num_codebooks}; load Mimi with num_codebooks={num_codebooks}")
        coded.append((seg, codes))
    return coded_prompt_frames(tokenizer, text, speaker, coded, num_codebooks)


def coded_prompt_frames(tokenizer: TextTokenizer, text: str, speaker: int | str,
                        context: Sequence[tuple[Segment, np.ndarray]] = (), num_codebooks: int = 32) -> Frames:
    """`prompt_frames` with the context already Mimi-encoded: (segment, codes (>= n, T)) pairs (saved voices)."""
    text, speaker = check_text(text, "text"), speaker_id(speaker)
    parts = [segment_frames(tokenizer, seg, codes[:num_codebooks], num_codebooks) for seg, codes in context]
    parts.append(segment_frames(tokenizer, Segment(speaker, text), None, num_codebooks))
    return Frames.concat(parts)


def max_frames_for(max_audio_length_ms: float) -> int:
    """The reference's frame budget: int(ms / 80)."""
    ms = max_audio_length_ms
    if not isinstance(ms, Real) or isinstance(ms, bool) or not math.isfinite(ms):
        raise RequestError(f"max_audio_length_ms={ms!r} is not a finite number of milliseconds; give one such as "
                           f"10000 for 10 s")
    if ms < FRAME_MS:
        raise RequestError(f"max_audio_length_ms={ms!r} is shorter than one {FRAME_MS} ms frame; ask for at least "
                           f"{FRAME_MS} ms")
    return int(ms / FRAME_MS)


def check_budget(prompt_len: int, max_frames: int, max_seq_len: int) -> None:
    """The reference's rule: the prompt must be shorter than max_seq_len - max_frames."""
    room = max_seq_len - 1 - prompt_len  # frames that fit after the prompt
    if max_frames <= room:
        return
    shorten = "drop or shorten context segments, or shorten the text"
    if room < 1:
        raise PromptTooLongError(
            f"the prompt is {prompt_len} frames (context text, context audio and the target text) and leaves no room "
            f"to generate in the model's {max_seq_len} frames; {shorten}")
    raise PromptTooLongError(
        f"the prompt is {prompt_len} frames (context text, context audio and the target text) and {max_frames} "
        f"frames ({max_frames * FRAME_MS} ms) of audio were asked for, but only {room} frames ({room * FRAME_MS} ms) "
        f"fit after the prompt in the model's {max_seq_len} frames; lower max_audio_length_ms to {room * FRAME_MS} "
        f"or less, or {shorten}")
