"""Many streaming Mimi decodes in batched calls: each stream owns a row of a streaming state (convolution tails,
transformer caches) for its lifetime, so a chunk of every live stream decodes in one Mimi call per state and
each stream's audio equals decoding it alone with `csm_jax.io.audio.streaming_decoder`. A new stream gets a free
row reset to the start (moshi's `reset_streaming` mask).

A call computes every row of its state, so the rows are split into banks of the decode batch's sizes (1, 4, 16
for 16 rows) and new streams go to the smallest bank that holds all open streams: one request pays for a 1-row
call, a full server for one call of all rows (two calls while the streams move over). Outside a call Mimi is not
streaming, so whole-clip encodes (voices, context audio) can run between calls under the same lock."""

from __future__ import annotations

import threading

import numpy as np

from csm_jax.inference.batcher import batch_sizes
from csm_jax.io import audio


class _Bank:
    def __init__(self, first: int, size: int):
        self.rows = range(first, first + size)
        self.state: dict | None = None  # the rows' streaming state between calls
        self.fresh: set[int] = set()  # rows opened since the last call: reset to the start in the next one


class MimiStreams:
    def __init__(self, mimi, rows: int = 1):
        if rows < 1:
            raise ValueError(f"need at least one stream row, got {rows}")
        self.mimi = mimi
        self.rows = rows
        self.lock = threading.Lock()  # one user of Mimi at a time: stream calls and encodes alike
        self.banks, first = [], 0
        for size in batch_sizes(rows):
            self.banks.append(_Bank(first, size))
            first += size
        self.open_rows: set[int] = set()

    def open(self, count: int = 1, expect: int = 0) -> list[int]:
        """Rows for `count` new streams, in the smallest bank that holds them with the open ones (and with
        `expect` streams, when more are known to be on their way); at most `rows` streams are open at a time."""
        if len(self.open_rows) + count > self.rows:
            raise ValueError(f"{len(self.open_rows)} of {self.rows} streams are open; cannot open {count} more")
        need = min(max(len(self.open_rows) + count, expect), self.rows)
        for bank in self.banks:  # the largest bank always qualifies: it has `rows` rows
            free = [r for r in bank.rows if r not in self.open_rows]
            if len(bank.rows) >= need and len(free) >= count:
                self.open_rows.update(free[:count])
                bank.fresh.update(free[:count])
                return free[:count]
        raise AssertionError("unreachable")

    def close(self, row: int) -> None:
        self.open_rows.discard(row)
        self._bank(row).fresh.discard(row)

    def banks_of(self, rows) -> list[range]:
        """The rows of each bank that holds one of `rows`."""
        return [bank.rows for bank in self.banks if any(r in bank.rows for r in rows)]

    def _bank(self, row: int) -> _Bank:
        return next(bank for bank in self.banks if row in bank.rows)

    def decode(self, codes: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Decodes the next codes (n, k_row) of open rows, one call per bank: returns each row's audio
        (k_row * 1920,) float32. Every row of a bank advances by the longest k given to the bank (rows left out or
        given fewer frames are zero-padded, which leaves their audio right, as Mimi is causal, but not their
        state), so a stream that goes on must get as many frames as the others in every call; fewer or none only
        in its last."""
        out = {}
        for bank in self.banks:
            given = {row: c for row, c in codes.items() if row in bank.rows}
            if given:
                out.update(self._decode_bank(bank, given))
        return out

    def _decode_bank(self, bank: _Bank, codes: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        import torch

        frames = max(c.shape[1] for c in codes.values())
        batch = np.zeros((len(bank.rows), next(iter(codes.values())).shape[0], frames), np.int64)
        for row, c in codes.items():
            batch[row - bank.rows.start, :, :c.shape[1]] = c
        with self.lock, audio.streaming_decoder(self.mimi, batch_size=len(bank.rows)):
            if bank.state is not None:
                self.mimi.set_streaming_state(bank.state)
            if bank.fresh:
                self.mimi.reset_streaming(torch.tensor([r in bank.fresh for r in bank.rows]))
                bank.fresh.clear()
            wave = audio.decode(self.mimi, batch)
            bank.state = self.mimi.get_streaming_state()
        return {row: wave[row - bank.rows.start, :c.shape[1] * audio.FRAME_SAMPLES] for row, c in codes.items()}

    def encode(self, wave: np.ndarray) -> np.ndarray:
        """Mimi codes (n, T) of a whole 24 kHz mono clip."""
        with self.lock:
            return audio.encode(self.mimi, wave)
