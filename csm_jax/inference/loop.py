"""The on-device sampling loop: prompt frames in, Mimi codes out (no text or audio processing here).

The prompt is prefilled in one backbone call; then each frame is one compiled step (codebook 0
from the backbone hidden state, the 31 depth-decoder steps from an empty 32-slot cache, then the backbone
step on the new frame). The frames run inside one `lax.while_loop` until every row has produced its all-zero
end frame (dropped) or the frame cap, so no Python runs per frame. Prompts of a batch are left-padded
(segment id 0) and each row stops on its own. Randomness: row r's codebook i of frame t draws with the i-th
uniform of `fold_in(key_r, t)`, so a seed gives the same audio alone, in a batch, or streamed. A sampler of your
own (`csm_jax.inference.sampler_protocol`) can choose the tokens instead; its state rides in `DecodeState`.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from csm_jax.core.codec import CODEBOOK_SIZE
from csm_jax.core.layers import KVCache
from csm_jax.core.model import Csm
from csm_jax.inference.decode_model import DecodeCsm, decode_model
from csm_jax.inference.prompt import PROMPT_BUCKET, check_budget
from csm_jax.inference.sampler_protocol import Sampler, call_sampler, check_sampler, initial_state
from csm_jax.inference.sampling import FrameSampling, LogitsProcessor, sample
from csm_jax.io.frames import Frames


@struct.dataclass
class DecodeState:
    """Everything the frame loop carries, for B rows; lives on device and is donated from call to call."""

    step: jax.Array  # () int32: frames sampled so far (the same for all rows)
    hidden: jax.Array  # (B, D) the backbone hidden state that predicts the next frame
    cache: KVCache  # backbone KV cache: prompt slots then one slot per frame
    positions: jax.Array  # (B,) int32 the RoPE position of the next frame
    frames: jax.Array  # (B, F, n) int32 sampled frames
    num_frames: jax.Array  # (B,) int32 frames kept per row (the end frame excluded)
    done: jax.Array  # (B,) bool
    keys: jax.Array  # (B,) PRNG keys, one per row
    max_frames: jax.Array  # () int32 the frame cap
    sampler_state: Any = None  # your sampler's state (`csm_jax.inference.sampler_protocol`); None without one


def sample_frame(model: DecodeCsm, hidden: jax.Array, keys: jax.Array, step: jax.Array, sampling: FrameSampling,
                 processor: LogitsProcessor | None) -> jax.Array:
    """All n codebooks of one frame per row with the built-in draw: hidden (B, D) -> codes (B, n) int32.

    step: the frame index, () for the batch or (B,) per row; `sampling` holds `SamplerConfig`s, or `RowSampler`s
    for per-row settings (continuous batching, `csm_jax.inference.batcher`)."""
    return frame_codes(model, hidden, keys, step, sampling, processor, None, None)[0]


def frame_codes(model: DecodeCsm, hidden: jax.Array, keys: jax.Array, step: jax.Array, sampling: FrameSampling,
                processor: LogitsProcessor | None, sampler: Sampler | None, sampler_state: Any) -> tuple[jax.Array, Any]:
    """`sample_frame`, or with `sampler` choosing every token: (codes (B, n) int32, the sampler's next state),
    the state carried through the n codebooks in order."""
    n = model.config.num_codebooks
    b = hidden.shape[0]

    # one uniform per (row, codebook): row r's frame t depends only on key_r and t
    uniforms = None if sampler is not None else jax.vmap(
        lambda k, t: jax.random.uniform(jax.random.fold_in(k, t), (n,)))(keys, jnp.broadcast_to(step, keys.shape))

    def pick(logits, codebook, config, sampler_state):
        codebook = jnp.asarray(codebook, jnp.int32)
        if logits.shape[-1] > CODEBOOK_SIZE:  # never sample an id Mimi cannot decode
            logits = jnp.where(jnp.arange(logits.shape[-1]) < CODEBOOK_SIZE, logits, -jnp.inf)
        if processor is not None:
            logits = processor(logits, step, codebook)
        if sampler is not None:
            return call_sampler(sampler, logits, keys, step, codebook, sampler_state)
        return sample(jax.lax.dynamic_index_in_dim(uniforms, codebook, axis=1, keepdims=False), logits, config,
                      model.cpu_kernels), sampler_state

    c0, sampler_state = pick(model.codebook0_logits(hidden), 0, sampling.codebook0, sampler_state)
    cache = model.new_cache("decoder", b, n)
    first = jnp.stack([hidden.astype(model.dtype), model.embed_audio(c0, 0)], axis=1)  # positions 0 and 1 together
    h, cache = model.decoder_forward(first, jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (b, 2)), cache, 0)
    c1, sampler_state = pick(model.audio_logits(h[:, -1], 1), 1, sampling.depth, sampler_state)
    codes = jnp.zeros((b, n), jnp.int32).at[:, 0].set(c0).at[:, 1].set(c1)

    # step i attends to slots 0..i of the 32-slot cache: one causal table for all steps, a row of it per step
    causal = jnp.tril(jnp.ones((n, n), bool))

    def depth_step(i, carry):
        codes, cache, sampler_state = carry
        previous = jax.lax.dynamic_index_in_dim(codes, i - 1, axis=1, keepdims=False)
        x = model.embed_audio(previous, i - 1)[:, None]
        mask = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(causal, i, 1), (b, 1, n))
        h, cache = model.decoder_forward(x, jnp.full((b, 1), i, jnp.int32), cache, i, mask)
        code, sampler_state = pick(model.audio_logits(h[:, 0], i), i, sampling.depth, sampler_state)
        return jax.lax.dynamic_update_index_in_dim(codes, code, i, axis=1), cache, sampler_state

    codes, _, sampler_state = jax.lax.fori_loop(2, n, depth_step, (codes, cache, sampler_state))
    return codes, sampler_state


def decode_step(model: DecodeCsm, state: DecodeState, sampling: FrameSampling, processor: LogitsProcessor | None,
                sampler: Sampler | None) -> DecodeState:
    """Samples one frame for every row, records it, and runs the backbone on it."""
    n = model.config.num_codebooks
    b = state.hidden.shape[0]
    codes, sampler_state = frame_codes(model, state.hidden, state.keys, state.step, sampling, processor, sampler,
                                       state.sampler_state)
    is_end = jnp.all(codes == 0, axis=-1)
    keep = ~state.done & ~is_end
    frames = jax.lax.dynamic_update_index_in_dim(state.frames, codes, state.step, axis=1)
    num_frames = state.num_frames + keep.astype(jnp.int32)
    done = state.done | is_end | (state.step + 1 >= state.max_frames)

    tokens = jnp.concatenate([codes, jnp.zeros((b, 1), jnp.int32)], axis=-1)[:, None]
    mask = jnp.broadcast_to(jnp.arange(n + 1) < n, tokens.shape)
    cache_index = state.cache.segment_ids.shape[1] - state.frames.shape[1] + state.step
    hidden, cache = model.backbone(model.embed_frames(tokens, mask), state.positions[:, None],
                                   jnp.ones((b, 1), jnp.int32), state.cache, cache_index)
    return state.replace(step=state.step + 1, hidden=hidden[:, 0], cache=cache, positions=state.positions + 1,
                         frames=frames, num_frames=num_frames, done=done, sampler_state=sampler_state)


@functools.partial(jax.jit, static_argnames=("graphdef", "frame_capacity"))
def _prefill(graphdef, params, tokens, mask, segment_ids, keys, max_frames, frame_capacity: int) -> DecodeState:
    model = nnx.merge(graphdef, params)
    b, p = segment_ids.shape
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
    cache = model.new_cache("backbone", b, p + frame_capacity)
    hidden, cache = model.backbone(model.embed_frames(tokens, mask), positions, segment_ids, cache, 0)
    n = model.config.num_codebooks
    return DecodeState(step=jnp.zeros((), jnp.int32), hidden=hidden[:, -1], cache=cache,
                       positions=positions[:, -1] + 1, frames=jnp.zeros((b, frame_capacity, n), jnp.int32),
                       num_frames=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), keys=keys,
                       max_frames=jnp.asarray(max_frames, jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "processor", "sampler"),
                   donate_argnames=("state",))
def _run_until(graphdef, params, state: DecodeState, until, sampling: FrameSampling,
               processor: LogitsProcessor | None, sampler: Sampler | None = None) -> DecodeState:
    """Runs frames on device while some row is unfinished and fewer than `until` frames were sampled."""
    model = nnx.merge(graphdef, params)

    def unfinished(s):
        return (s.step < until) & ~jnp.all(s.done)

    return jax.lax.while_loop(unfinished, lambda s: decode_step(model, s, sampling, processor, sampler), state)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class FrameGenerator:
    """Generates Mimi frames from prompt frames with a `Csm`.

    Decodes with the model in the decode layout (`decode_model`; `cpu_kernels` is its kernel switch, and
    `weights_dtype="int8"` quantizes its weights); drop your own reference to a large model after building this to
    free its stacked arrays.
    """

    def __init__(self, model: Csm | DecodeCsm, cpu_kernels: bool | None = None, weights_dtype: str | None = None):
        self.model = model if isinstance(model, DecodeCsm) else decode_model(model, cpu_kernels, weights_dtype)
        self.graphdef, self.params = nnx.split(self.model)
        self.config = model.config

    def start(self, prompts: Sequence[Frames], max_frames: int, seeds: Sequence[int],
              frame_capacity: int | None = None, sampler_state: Any = None) -> DecodeState:
        """Left-pads the prompts into one batch, checks the budget and prefills the backbone. The cache holds the
        prompt then `frame_capacity` frames (default: max_frames rounded up to the prompt bucket); the state holds
        a copy of `sampler_state`, the initial state of the sampler given to `run`."""
        n = self.config.num_codebooks
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        for p in prompts:
            check_budget(len(p), max_frames, self.config.backbone.max_seq_len)
        length = _round_up(max(len(p) for p in prompts), PROMPT_BUCKET)
        tokens = np.zeros((len(prompts), length, n + 1), np.int32)
        mask = np.zeros(tokens.shape, bool)
        segment_ids = np.zeros((len(prompts), length), np.int32)
        for row, p in enumerate(prompts):
            tokens[row, length - len(p):] = p.tokens
            mask[row, length - len(p):] = p.mask
            segment_ids[row, length - len(p):] = 1
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        state = _prefill(self.graphdef, self.params, tokens, mask, segment_ids, keys, max_frames,
                         frame_capacity=_round_up(max_frames, PROMPT_BUCKET) if frame_capacity is None
                         else frame_capacity)
        return state.replace(sampler_state=initial_state(sampler_state))

    def run(self, state: DecodeState, until: int, sampling: FrameSampling, processor: LogitsProcessor | None = None,
            sampler: Sampler | None = None) -> DecodeState:
        """Continues the loop on device up to `until` frames (or until every row has stopped); `sampler` (see
        `csm_jax.inference.sampler_protocol`) chooses the tokens instead of `sampling`, carrying its state in
        `state.sampler_state`."""
        check_sampler(sampler, state.sampler_state)
        return _run_until(self.graphdef, self.params, state, jnp.asarray(until, jnp.int32), sampling, processor,
                          sampler)

    def generate(self, prompts: Sequence[Frames], max_frames: int, sampling: FrameSampling = FrameSampling(),
                 seeds: Sequence[int] | None = None, processor: LogitsProcessor | None = None, *,
                 sampler: Sampler | None = None, sampler_state: Any = None,
                 return_sampler_state: bool = False) -> list[np.ndarray] | tuple[list[np.ndarray], Any]:
        """Codes (n, F_r) int32 per prompt, F_r <= max_frames (the end frame is not included); with
        `return_sampler_state`, (codes, the sampler's final state)."""
        seeds = list(range(len(prompts))) if seeds is None else seeds
        state = self.run(self.start(prompts, max_frames, seeds, sampler_state=sampler_state), max_frames, sampling,
                         processor, sampler)
        frames, counts = jax.device_get((state.frames, state.num_frames))
        codes = [frames[r, :counts[r]].T for r in range(len(prompts))]
        return (codes, state.sampler_state) if return_sampler_state else codes

    def stream(self, prompt: Frames, max_frames: int, sampling: FrameSampling = FrameSampling(), seed: int = 0,
               processor: LogitsProcessor | None = None, first_chunk: int = 1, chunk: int = 4, *,
               sampler: Sampler | None = None, sampler_state: Any = None,
               return_sampler_state: bool = False) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, Any]]:
        """Yields codes (n, k) chunks as they are sampled: `first_chunk` frames first (time to first audio),
        then `chunk` frames at a time. Together they equal `generate([prompt], ...)` with the same seed (and
        sampler: its state goes on from chunk to chunk).

        With `return_sampler_state`, yields (codes, the sampler's state after them) and always ends with the
        final state, the one `generate` returns: that last chunk has 0 frames when the end frame was drawn after
        the chunk before."""
        state = self.start([prompt], max_frames, [seed], sampler_state=sampler_state)
        emitted, until = 0, first_chunk
        while True:
            state = self.run(state, min(until, max_frames), sampling, processor, sampler)
            count, done = (int(x) for x in jax.device_get((state.num_frames[0], state.done[0])))
            if count > emitted or (done and return_sampler_state):
                codes = np.asarray(state.frames[0, emitted:count]).T
                emitted = count
                # a copy: the next `run` donates the state's buffers
                yield (codes, jax.tree.map(jnp.copy, state.sampler_state)) if return_sampler_state else codes
            if done:
                return
            until += chunk
