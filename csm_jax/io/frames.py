"""CSM's frames: the model's input format for text and audio, as the reference builds a conversation segment.

A frame is n + 1 tokens (columns 0..n-1: Mimi codebooks, column n: a text token) with a mask of the same shape; a
segment is its text frames (`[speaker]text` between begin/end of text) followed, when it has audio, by the Mimi
codes as audio frames and one all-zero end-of-utterance frame. Generation's prompts and training's examples are
both built here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from csm_jax.io.text import TextTokenizer, tokenize_segment_text


@dataclasses.dataclass
class Segment:
    """One utterance of a conversation: who spoke, what was said, and (for context) the 24 kHz mono audio."""

    speaker: int | str
    text: str
    audio: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Frames:
    """A frame sequence: tokens (S, n+1) int32 (columns 0..n-1 audio codes, n text) and mask (S, n+1) bool."""

    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def concat(parts: Sequence[Frames]) -> Frames:
        return Frames(np.concatenate([p.tokens for p in parts]), np.concatenate([p.mask for p in parts]))


def text_frames(token_ids: Sequence[int], num_codebooks: int = 32) -> Frames:
    """One text frame per token: only the last column is set and unmasked."""
    tokens = np.zeros((len(token_ids), num_codebooks + 1), np.int32)
    tokens[:, -1] = token_ids
    mask = np.zeros_like(tokens, bool)
    mask[:, -1] = True
    return Frames(tokens, mask)


def audio_frames(codes: np.ndarray) -> Frames:
    """Codes (n, T) -> T + 1 audio frames: the codes, then the all-zero end-of-utterance frame."""
    n, t = codes.shape
    tokens = np.zeros((t + 1, n + 1), np.int32)
    tokens[:t, :n] = np.asarray(codes).T
    mask = np.zeros_like(tokens, bool)
    mask[:, :n] = True
    return Frames(tokens, mask)


def segment_frames(tokenizer: TextTokenizer, segment: Segment, codes: np.ndarray | None,
                   num_codebooks: int = 32) -> Frames:
    """A segment's text frames, then (when `codes` (n, T) is given) its audio frames."""
    text = text_frames(tokenize_segment_text(tokenizer, segment.text, segment.speaker), num_codebooks)
    return text if codes is None else Frames.concat([text, audio_frames(codes)])
