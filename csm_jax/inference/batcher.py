"""Continuous batching: one decode batch of B slots on device, each slot an independent generation.

A request is prefilled alone (`FrameGenerator.start`, the same prefill as a single generation) and its KV-cache
row is written into a free slot of the shared cache (dynamic_update_slice on the batch axis) while the other
slots keep their state; every slot then advances one frame per step at its own cache column, RoPE position,
frame index, seed and sampler settings (`RowSampler` arrays, so the compiled step never changes with a
request). A slot's cache row holds exactly what a single generation's cache holds (the left-padded prompt, then
one column per frame), followed by empty columns, and its frame t draws with the uniforms of fold_in(seed, t):
a request gets the codes `FrameGenerator.generate` gives it alone with the same seed and settings.

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


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "length"))
def _empty(graphdef, params, slots: int, length: int) -> SlotState:
    model = nnx.merge(graphdef, params)
    zeros = jnp.zeros((slots,), jnp.int32)
    rows = RowSampler(jnp.zeros((slots,), jnp.float32), zeros, jnp.ones((slots,), jnp.float32),
                      jnp.zeros((slots,), jnp.float32))
    return SlotState(hidden=jnp.zeros((slots, model.config.backbone.dim), model.dtype),
                     cache=model.new_cache("backbone", slots, length), prefill=zeros, step=zeros, positions=zeros,
                     keys=jax.vmap(jax.random.key)(jnp.zeros((slots,), jnp.uint32)), max_frames=zeros,
                     done=jnp.ones((slots,), bool), sampling=RowFrameSampling(rows, rows))


@functools.partial(jax.jit, donate_argnames=("state",))
def _insert(state: SlotState, slot, row: DecodeState, max_frames, sampling: RowFrameSampling) -> SlotState:
    """Writes a prefilled single-row `DecodeState` (cache width W) into `slot`; the rest of the row is emptied."""
    width = row.cache.segment_ids.shape[1]
    length = state.cache.segment_ids.shape[1]
    zero = jnp.zeros((), jnp.int32)

    def put(column, value):  # column (B, ...), value (...)
        return jax.lax.dynamic_update_index_in_dim(column, jnp.asarray(value, column.dtype), slot, axis=0)

    def put_cache(big, small):  # (B, L, K, hd) <- (1, W, K, hd) at (slot, 0)
        return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (slot, zero, zero, zero))

    segments = jnp.zeros((1, length), jnp.int32).at[:, :width].set(row.cache.segment_ids)
    cache = KVCache(k=jax.tree.map(put_cache, state.cache.k, row.cache.k),
                    v=jax.tree.map(put_cache, state.cache.v, row.cache.v),
                    segment_ids=jax.lax.dynamic_update_slice(state.cache.segment_ids, segments, (slot, zero)))
    return SlotState(hidden=put(state.hidden, row.hidden[0]), cache=cache, prefill=put(state.prefill, width),
                     step=put(state.step, 0), positions=put(state.positions, row.positions[0]),
                     keys=put(state.keys, row.keys[0]), max_frames=put(state.max_frames, max_frames),
                     done=put(state.done, False),
                     sampling=jax.tree.map(lambda column, value: put(column, value[0]), state.sampling, sampling))


@functools.partial(jax.jit, donate_argnames=("state",))
def _release(state: SlotState, slot) -> SlotState:
    return state.replace(done=state.done.at[slot].set(True))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class SlotBatcher:
    """B generation slots over one `FrameGenerator`'s model.

    `length` is every slot's cache length: by default the backbone's max_seq_len plus one prompt bucket (a
    left-padded prompt takes up to PROMPT_BUCKET - 1 padding columns beyond what the frame budget counts).
    """

    def __init__(self, frames: FrameGenerator, slots: int, length: int | None = None):
        if slots < 1:
            raise ValueError(f"need at least one slot, got {slots}")
        self.frames = frames
        self.slots = slots
        self.max_seq_len = frames.config.backbone.max_seq_len
        self.length = _round_up(self.max_seq_len, PROMPT_BUCKET) + PROMPT_BUCKET if length is None else length
        self.state = _empty(frames.graphdef, frames.params, slots, self.length)

    def check(self, prompt: Frames, max_frames: int) -> None:
        """Raises `PromptTooLongError` (a `UserError`) when the request cannot be generated."""
        check_budget(len(prompt), max_frames, min(self.max_seq_len, self.length - PROMPT_BUCKET))

    def insert(self, slot: int, prompt: Frames, max_frames: int, seed: int, sampling: FrameSampling) -> None:
        """Prefills `prompt` and places it in `slot` (which must be free); the other slots are untouched."""
        self.check(prompt, max_frames)
        row = self.frames.start([prompt], max_frames, [seed], frame_capacity=0)
        rows = RowFrameSampling(RowSampler.of([sampling.codebook0]), RowSampler.of([sampling.depth]))
        self.state = _insert(self.state, jnp.int32(slot), row, jnp.int32(max_frames), rows)

    def release(self, slot: int) -> None:
        """Stops `slot` at once (a cancelled request); its row is replaced by the next insert."""
        self.state = _release(self.state, jnp.int32(slot))

    def run(self, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advances every running slot by up to `frames` frames: codes (B, frames, n), kept (B, frames) (the
        slot's real frames, in order) and done (B,) after the run, on the host."""
        self.state, codes, kept = _run_frames(self.frames.graphdef, self.frames.params, self.state, frames)
        return jax.device_get((codes, kept, self.state.done))
