"""Continuous batching: one decode batch of up to B slots on device, each slot an independent generation.

Requests are prefilled with the prefill of a single generation (`FrameGenerator.start`; requests admitted
together and of one prompt-width bucket share one call, each row padded as it would be alone) and each KV-cache
row is written into a free row of the shared cache (dynamic_update_slice on the batch axis) while the other
slots keep their state; every slot then advances one frame per step at its own cache column, RoPE position,
frame index, seed and sampler settings (`RowSampler` arrays, so the compiled step never changes with a
request). A slot's cache row holds exactly what a single generation's cache holds (the left-padded prompt, then
one column per frame), followed by empty columns, and its frame t draws with the uniforms of fold_in(seed, t):
a request gets the codes `FrameGenerator.generate` gives it alone with the same seed and settings. The batch
holds only as many rows as a few compiled sizes need (1, 4, 16 for 16 slots); growing and shrinking it copies
rows whole, so nothing a slot computes changes.

Host side, `SlotBatcher` is not thread-safe: one thread owns it (see `csm_jax.serving.engine`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from csm_jax.core.layers import KVCache
from csm_jax.inference.loop import DecodeState, FrameGenerator, sample_frame
from csm_jax.inference.prompt import PROMPT_BUCKET, check_budget
from csm_jax.inference.sampling import FrameSampling, RowSampler
from csm_jax.io.frames import Frames


class RowFrameSampling(NamedTuple):
    """`FrameSampling` with per-row settings: codebook 0 and the depth decoder's codebooks."""

    codebook0: RowSampler
    depth: RowSampler


@struct.dataclass
class SlotState:
    """The B slots on device; free slots are `done` and their computations are ignored."""

    hidden: jax.Array  # (B, D)
    cache: KVCache  # (B, L) columns: a slot's prefill, then one column per frame
    prefill: jax.Array  # (B,) int32: the cache column of the slot's frame 0 (its prefill width)
    step: jax.Array  # (B,) int32: frames sampled so far by the slot's request
    positions: jax.Array  # (B,) int32: RoPE position of the next frame
    keys: jax.Array  # (B,) PRNG keys
    max_frames: jax.Array  # (B,) int32
    done: jax.Array  # (B,) bool
    sampling: RowFrameSampling  # (B,) arrays


def _slot_step(model, state: SlotState) -> tuple[SlotState, jax.Array, jax.Array]:
    """One frame for every slot: (new state, codes (B, n), kept (B,): a real frame of a running slot)."""
    n = model.config.num_codebooks
    b = state.hidden.shape[0]
    codes = sample_frame(model, state.hidden, state.keys, state.step, state.sampling, None)
    running = ~state.done
    kept = running & ~jnp.all(codes == 0, axis=-1)
    tokens = jnp.concatenate([codes, jnp.zeros((b, 1), jnp.int32)], axis=-1)[:, None]
    mask = jnp.broadcast_to(jnp.arange(n + 1) < n, tokens.shape)
    # a finished slot stays at its column (rewriting it harmlessly) until a new request replaces its row
    hidden, cache = model.backbone(model.embed_frames(tokens, mask), state.positions[:, None],
                                   jnp.ones((b, 1), jnp.int32), state.cache, state.prefill + state.step)
    advance = running.astype(jnp.int32)
    done = state.done | ~kept | (state.step + 1 >= state.max_frames)
    return state.replace(hidden=jnp.where(running[:, None], hidden[:, 0], state.hidden), cache=cache,
                         step=state.step + advance, positions=state.positions + advance, done=done), codes, kept


@functools.partial(jax.jit, static_argnames=("graphdef", "frames"), donate_argnames=("state",))
def _run_frames(graphdef, params, state: SlotState, frames: int):
    """`frames` steps of every slot: (state, codes (B, frames, n), kept (B, frames))."""
    model = nnx.merge(graphdef, params)

    def body(state, _):
        state, codes, kept = _slot_step(model, state)
        return state, (codes, kept)

    state, (codes, kept) = jax.lax.scan(body, state, None, length=frames)
    return state, codes.transpose(1, 0, 2), kept.T


def _blank(model, slots: int, length: int) -> SlotState:
    zeros = jnp.zeros((slots,), jnp.int32)
    rows = RowSampler(jnp.zeros((slots,), jnp.float32), zeros, jnp.ones((slots,), jnp.float32),
                      jnp.zeros((slots,), jnp.float32))
    return SlotState(hidden=jnp.zeros((slots, model.config.backbone.dim), model.dtype),
                     cache=model.new_cache("backbone", slots, length), prefill=zeros, step=zeros, positions=zeros,
                     keys=jax.vmap(jax.random.key)(jnp.zeros((slots,), jnp.uint32)), max_frames=zeros,
                     done=jnp.ones((slots,), bool), sampling=RowFrameSampling(rows, rows))


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "length"))
def _empty(graphdef, params, slots: int, length: int) -> SlotState:
    return _blank(nnx.merge(graphdef, params), slots, length)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _resize(graphdef, params, state: SlotState, index) -> SlotState:
    """A state of len(index) rows: row i is `state`'s row index[i], or an empty row where index[i] is -1."""
    blank = _blank(nnx.merge(graphdef, params), 1, state.cache.segment_ids.shape[1])
    pool = jax.tree.map(lambda rows, empty: jnp.concatenate([rows, empty]), state, blank)
    return jax.tree.map(lambda rows: rows[index], pool)  # -1 picks the blank row at the end


@functools.partial(jax.jit, donate_argnames=("state",))
def _insert(state: SlotState, slot, rows: DecodeState, index, max_frames, sampling: RowFrameSampling) -> SlotState:
    """Writes row `index` of prefilled `rows` (cache width W) into `slot`; the rest of the slot's row is emptied."""
    width = rows.cache.segment_ids.shape[1]
    length = state.cache.segment_ids.shape[1]
    zero = jnp.zeros((), jnp.int32)

    def put(column, value):  # column (B, ...), value (...)
        return jax.lax.dynamic_update_index_in_dim(column, jnp.asarray(value, column.dtype), slot, axis=0)

    def pick(values):  # (R, ...) -> (...)
        return jax.lax.dynamic_index_in_dim(values, index, axis=0, keepdims=False)

    def put_cache(big, small):  # (B, L, K, hd) <- row `index` of (R, W, K, hd) at (slot, 0)
        row = jax.lax.dynamic_slice_in_dim(small, index, 1, axis=0)
        return jax.lax.dynamic_update_slice(big, row.astype(big.dtype), (slot, zero, zero, zero))

    segments = jnp.zeros((1, length), jnp.int32).at[:, :width].set(
        jax.lax.dynamic_slice_in_dim(rows.cache.segment_ids, index, 1, axis=0))
    cache = KVCache(k=jax.tree.map(put_cache, state.cache.k, rows.cache.k),
                    v=jax.tree.map(put_cache, state.cache.v, rows.cache.v),
                    segment_ids=jax.lax.dynamic_update_slice(state.cache.segment_ids, segments, (slot, zero)))
    return SlotState(hidden=put(state.hidden, pick(rows.hidden)), cache=cache, prefill=put(state.prefill, width),
                     step=put(state.step, 0), positions=put(state.positions, pick(rows.positions)),
                     keys=put(state.keys, pick(rows.keys)), max_frames=put(state.max_frames, max_frames),
                     done=put(state.done, False),
                     sampling=jax.tree.map(lambda column, value: put(column, value[0]), state.sampling, sampling))


@functools.partial(jax.jit, donate_argnames=("state",))
def _release(state: SlotState, slot) -> SlotState:
    return state.replace(done=state.done.at[slot].set(True))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def batch_sizes(slots: int) -> tuple[int, ...]:
    """The decode batch sizes compiled for `slots` slots: powers of 4 below it, then `slots` (1, 4, 16 for 16)."""
    sizes = [1]
    while sizes[-1] * 4 < slots:
        sizes.append(sizes[-1] * 4)
    return tuple(sizes) + ((slots,) if slots > 1 else ())


class SlotBatcher:
    """B generation slots over one `FrameGenerator`'s model.

    The decode batch is only as large as it needs to be: it holds the smallest of `sizes` rows (default
    `batch_sizes(slots)`) that fits the busy slots, growing at an insert into a full batch and shrinking (the busy
    rows moved to the front) once the busy slots have fit a smaller size for `shrink_after` runs in a row, so
    one request on a 16-slot server pays for a 1-row step. Slot numbers stay what the caller gave.

    `length` is every slot's cache length: by default the backbone's max_seq_len plus one prompt bucket (a
    left-padded prompt takes up to PROMPT_BUCKET - 1 padding columns beyond what the frame budget counts).
    """

    def __init__(self, frames: FrameGenerator, slots: int, length: int | None = None,
                 sizes: tuple[int, ...] | None = None, shrink_after: int = 8):
        if slots < 1:
            raise ValueError(f"need at least one slot, got {slots}")
        self.sizes = batch_sizes(slots) if sizes is None else tuple(sorted(sizes))
        if self.sizes[-1] != slots or self.sizes[0] < 1:
            raise ValueError(f"batch sizes {self.sizes} must be positive and end at the {slots} slots")
        self.frames = frames
        self.slots = slots
        self.shrink_after = shrink_after
        self.max_seq_len = frames.config.backbone.max_seq_len
        self.length = _round_up(self.max_seq_len, PROMPT_BUCKET) + PROMPT_BUCKET if length is None else length
        self.state = _empty(frames.graphdef, frames.params, self.sizes[0], self.length)
        self.row_of: dict[int, int] = {}  # busy slot -> its row in the decode batch
        self.small_runs = 0  # runs in a row whose busy slots fit a smaller batch

    @property
    def rows(self) -> int:
        return self.state.done.shape[0]

    def check(self, prompt: Frames, max_frames: int) -> None:
        """Raises `PromptTooLongError` (a `UserError`) when the request cannot be generated."""
        check_budget(len(prompt), max_frames, min(self.max_seq_len, self.length - PROMPT_BUCKET))

    def insert(self, slot: int, prompt: Frames, max_frames: int, seed: int, sampling: FrameSampling) -> None:
        """Prefills `prompt` and places it in `slot` (which must be free); the other slots are untouched."""
        self.insert_many([(slot, prompt, max_frames, seed, sampling)])

    def insert_many(self, requests: list[tuple[int, Frames, int, int, FrameSampling]]) -> None:
        """`insert` for several (slot, prompt, max_frames, seed, sampling) at once: prompts of one width bucket
        are prefilled together, in one call of a batch size (the rest of it filled with copies)."""
        slots = [slot for slot, *_ in requests]
        if len(set(slots)) < len(slots) or any(s in self.row_of or not 0 <= s < self.slots for s in slots):
            raise ValueError(f"slots {slots} are busy, repeated or not among the {self.slots} slots")
        for _, prompt, max_frames, _, _ in requests:
            self.check(prompt, max_frames)
        busy = len(self.row_of) + len(requests)
        if busy > self.rows:
            self._move(min(s for s in self.sizes if s >= busy))
        free = sorted(set(range(self.rows)) - set(self.row_of.values()))
        widths: dict[int, list] = {}
        for request in requests:
            widths.setdefault(_round_up(len(request[1]), PROMPT_BUCKET), []).append(request)
        for group in widths.values():
            while group:
                size = min((s for s in self.sizes if s >= len(group)), default=self.sizes[-1])
                part, group = group[:size], group[size:]
                padded = part + part[:1] * (size - len(part))
                rows = self.frames.start([p for _, p, *_ in padded], 1, [seed for *_, seed, _ in padded],
                                         frame_capacity=0)
                for index, (slot, _, max_frames, _, sampling) in enumerate(part):
                    row = free.pop(0)
                    settings = RowFrameSampling(RowSampler.of([sampling.codebook0]), RowSampler.of([sampling.depth]))
                    self.state = _insert(self.state, jnp.int32(row), rows, jnp.int32(index), jnp.int32(max_frames),
                                         settings)
                    self.row_of[slot] = row

    def release(self, slot: int) -> None:
        """Stops `slot` at once (a cancelled request); its row is taken by a later insert."""
        if slot in self.row_of:
            self.state = _release(self.state, jnp.int32(self.row_of.pop(slot)))

    def run(self, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advances every running slot by up to `frames` frames: codes (B, frames, n), kept (B, frames) (the
        slot's real frames, in order) and done (B,) after the run, on the host; a finished slot is free."""
        fits = min(s for s in self.sizes if s >= max(len(self.row_of), 1))
        self.small_runs = self.small_runs + 1 if fits < self.rows else 0
        if self.small_runs >= self.shrink_after:
            self._move(fits)
        self.state, codes, kept = _run_frames(self.frames.graphdef, self.frames.params, self.state, frames)
        codes, kept, done = jax.device_get((codes, kept, self.state.done))
        out = (np.zeros((self.slots,) + codes.shape[1:], codes.dtype), np.zeros((self.slots, frames), bool),
               np.ones((self.slots,), bool))
        for slot, row in list(self.row_of.items()):
            out[0][slot], out[1][slot], out[2][slot] = codes[row], kept[row], done[row]
            if done[row]:
                del self.row_of[slot]
        return out

    def _move(self, size: int) -> None:
        """Resizes the decode batch to `size` rows, the busy rows first."""
        busy = sorted(self.row_of, key=self.row_of.get)
        index = [self.row_of[slot] for slot in busy] + [-1] * (size - len(busy))
        self.state = _resize(self.frames.graphdef, self.frames.params, self.state, jnp.asarray(index, jnp.int32))
        self.row_of = {slot: row for row, slot in enumerate(busy)}
        self.small_runs = 0
