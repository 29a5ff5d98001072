"""Many streaming Mimi decodes over one Mimi: each stream keeps its own streaming state (convolution tails,
transformer caches), swapped in for its chunk, so interleaved requests decode exactly as each would alone with
`csm_jax.io.audio.streaming_decoder`. Outside a chunk Mimi is not streaming, so whole-clip encodes (voices,
context audio) can run between chunks under the same lock."""

from __future__ import annotations

import threading

import numpy as np

from csm_jax.io import audio


class MimiStreams:
    def __init__(self, mimi):
        self.mimi = mimi
        self.lock = threading.Lock()  # one user of Mimi at a time: stream chunks and encodes alike

    def decode(self, state: dict | None, codes: np.ndarray) -> tuple[dict, np.ndarray]:
        """Decodes the next codes (n, k) of the stream whose state is `state` (None for a new stream): returns
        its new state and the audio (k * 1920,) float32."""
        with self.lock, audio.streaming_decoder(self.mimi, batch_size=1):
            if state is not None:
                self.mimi.set_streaming_state(state)
            wave = audio.decode(self.mimi, codes[None])[0]
            return self.mimi.get_streaming_state(), wave

    def encode(self, wave: np.ndarray) -> np.ndarray:
        """Mimi codes (n, T) of a whole 24 kHz mono clip."""
        with self.lock:
            return audio.encode(self.mimi, wave)
