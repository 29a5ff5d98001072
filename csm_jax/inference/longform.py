"""Conversations and long texts: utterances generated in order, each conditioned on the ones before it.

A long text is split at sentence boundaries (a sentence too long for one utterance at clause punctuation, then
between words) into turns of one speaker; a dialogue script gives its turns directly, some with recorded audio.
Every turn to generate gets a prompt of the pinned context (e.g. a voice reference), then as many of the latest
earlier turns (their text and codes: generated audio is never re-encoded) as fit the model's frame budget, oldest
dropped first, then its own text. The turns' audio is joined with a short equal-power crossfade.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from csm_jax.core.codec import SAMPLE_RATE
from csm_jax.core.errors import UserError
from csm_jax.inference.end_of_speech import EndOfSpeech, end_index, silence_stop_frame
from csm_jax.inference.prompt import PromptTooLongError, check_budget, max_frames_for
from csm_jax.inference.sampling import FrameSampling
from csm_jax.io.frames import Frames, Segment, segment_frames

MAX_WORDS = 40  # words per generated utterance: ~15 s of speech, well inside 2048 frames with context
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+")


def split_text(text: str, max_words: int = MAX_WORDS) -> list[str]:
    """Utterances of at most `max_words` words, in order: whole sentences, long ones split at clause punctuation
    and then between words. Nothing is dropped: joined with spaces they give the text's words in order."""
    if max_words < 1:
        raise UserError(f"max words per utterance must be >= 1, got {max_words}")
    pieces = []
    for paragraph in text.split("\n\n"):
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            if sentence:
                pieces.extend(_split_long(sentence, max_words))
    return pieces


def _split_long(sentence: str, max_words: int) -> list[str]:
    if len(sentence.split()) <= max_words:
        return [sentence]
    out, current = [], []
    for clause in _CLAUSE_END.split(sentence):
        words = clause.split()
        if current and len(current) + len(words) > max_words:
            out.append(" ".join(current))
            current = []
        while len(words) > max_words:  # a clause longer than an utterance: between words
            out.append(" ".join(words[:max_words]))
            words = words[max_words:]
        current += words
    if current:
        out.append(" ".join(current))
    return out


@dataclasses.dataclass
class Turn:
    """One utterance of a conversation: who says what; `codes` (n, F) for a given (recorded) turn, else None."""

    speaker: int | str
    text: str
    codes: np.ndarray | None = None


@dataclasses.dataclass
class TurnResult:
    codes: np.ndarray  # (n, F) the turn's codes (given or generated, after the end-of-speech cuts)
    audio: np.ndarray  # (samples,) float32
    prompt_frames: int  # the prompt's length (0 for a given turn)
    context_turns: int  # earlier turns (pinned context excluded) in the prompt
    generated: bool


def conversation_prompt(pinned: Sequence[Frames], history: Sequence[Frames], target: Frames,
                        max_frames: int, max_seq_len: int) -> tuple[Frames, int]:
    """Pinned context, then the latest of `history` that fit beside the target and `max_frames` (the oldest turns
    dropped first), then the target's text frames. Returns (prompt, number of history turns kept)."""
    fixed = sum(len(f) for f in pinned) + len(target)
    check_budget(fixed, max_frames, max_seq_len)  # even without history it must fit: the error names the fix
    kept, used = 0, fixed
    for frames in reversed(history):
        if used + len(frames) >= max_seq_len - max_frames:
            break
        kept, used = kept + 1, used + len(frames)
    chosen = list(history[len(history) - kept:]) if kept else []
    return Frames.concat([*pinned, *chosen, target]), kept


def generate_conversation(generator, turns: Sequence[Turn], *, context: Sequence[Segment] = (),
                          max_audio_length_ms: float = 20_000, sampling: FrameSampling = FrameSampling(),
                          seed: int = 0, end_of_speech: EndOfSpeech = EndOfSpeech(),
                          on_turn: Callable[[int, TurnResult], None] | None = None) -> list[TurnResult]:
    """Generates the turns without codes in order (given turns are context only), each after the turns before it.

    `context` is pinned before every prompt (Mimi-encoded once). Turn i draws with seed `seed + i`. `on_turn(i,
    result)` is called as each turn is done (progress, writing files).
    """
    from csm_jax.io import audio

    n = generator.frames.config.num_codebooks
    max_seq_len = generator.frames.config.backbone.max_seq_len
    max_frames = max_frames_for(max_audio_length_ms)
    tokenizer = generator.tokenizer
    pinned = [segment_frames(tokenizer, s, audio.encode(generator.mimi, np.asarray(s.audio, np.float32))[:n], n)
              for s in context]
    history, results = [], []
    for i, turn in enumerate(turns):
        if turn.codes is not None:
            codes = np.asarray(turn.codes, np.int32)[:n]
            result = TurnResult(codes, generator.decode([codes])[0], 0, 0, generated=False)
        else:
            target = segment_frames(tokenizer, Segment(turn.speaker, turn.text), None, n)
            try:
                prompt, kept = conversation_prompt(pinned, history, target, max_frames, max_seq_len)
            except PromptTooLongError as e:
                raise PromptTooLongError(f"turn {i + 1} ({turn.text[:40]!r}): {e}") from None
            codes, wave = generate_until_end(generator, prompt, max_frames, sampling, seed + i, end_of_speech)
            result = TurnResult(codes, generator.mark(wave), len(prompt), kept, generated=True)
        history.append(segment_frames(tokenizer, Segment(turn.speaker, turn.text), result.codes, n))
        results.append(result)
        if on_turn is not None:
            on_turn(i, result)
    return results


def generate_until_end(generator, prompt: Frames, max_frames: int, sampling: FrameSampling, seed: int,
                       end_of_speech: EndOfSpeech, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """One utterance, streamed in chunks of frames and decoded as it goes, stopped early when an end rule of
    `end_of_speech` fires; returns (codes (n, F), audio) after its cuts and trimming."""
    from csm_jax.io import audio

    codes, waves = [], []
    chunks = generator.frames.stream(prompt, max_frames, sampling, seed, end_of_speech.processor(), chunk, chunk)
    with audio.streaming_decoder(generator.mimi, batch_size=1):
        for part in chunks:
            codes.append(part)
            waves.append(audio.decode(generator.mimi, part[None])[0])
            so_far = np.concatenate(codes, axis=1)
            if end_of_speech.end_bias > 0 and end_index(so_far, end_of_speech.min_frames) < so_far.shape[1]:
                break
            if end_of_speech.stop_after_silence_ms > 0 and silence_stop_frame(
                    np.concatenate(waves), end_of_speech.stop_after_silence_ms, end_of_speech.silence_db) is not None:
                break
    if not codes:
        return np.zeros((generator.frames.config.num_codebooks, 0), np.int32), np.zeros(0, np.float32)
    return end_of_speech.finish(np.concatenate(codes, axis=1), np.concatenate(waves))


def crossfade_join(waves: Sequence[np.ndarray], fade_ms: float = 30.0) -> np.ndarray:
    """Concatenates audio with an equal-power crossfade (cos/sin ramps) of `fade_ms` between neighbours, shortened
    where a piece is shorter; the result is sum(lengths) - sum(overlaps) samples."""
    fade = int(round(fade_ms * SAMPLE_RATE / 1000))
    out = np.zeros(0, np.float32)
    for wave in waves:
        wave = np.asarray(wave, np.float32)
        k = min(fade, len(out), len(wave))
        if k:
            t = (np.arange(k, dtype=np.float32) + 0.5) / k * (np.pi / 2)
            overlap = out[-k:] * np.cos(t) + wave[:k] * np.sin(t)
            out = np.concatenate([out[:-k], overlap, wave[k:]])
        else:
            out = np.concatenate([out, wave])
    return out

