"""Speech generation: prompt building as the reference does it, and an on-device sampling loop.

Prompt (Sesame's generator): for each context segment its text frames (`[speaker]text` between begin/end of
text) then its audio frames (Mimi codes plus one all-zero end frame); then the target's text frames.
Generation: the prompt is prefilled in one backbone call; then each frame is one compiled step (codebook 0
from the backbone hidden state, the 31 depth-decoder steps from an empty 32-slot cache, then the backbone
step on the new frame). The frames run inside one `lax.while_loop` until every row has produced its all-zero
end frame (dropped) or the frame cap, so no Python runs per frame. Prompts of a batch are left-padded
(segment id 0) and each row stops on its own. Randomness: row r's codebook i of frame t draws with the i-th
uniform of `fold_in(key_r, t)`, so a seed gives the same audio alone, in a batch, or streamed.
"""

from __future__ import annotations

import dataclasses
import sys
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from csm_jax.layers import KVCache
from csm_jax.model import Csm
from csm_jax.sampling import FrameSampling, LogitsProcessor, sample
from csm_jax.text import TextTokenizer, tokenize_segment_text

FRAME_MS = 80
CODEC_CODES = 2048  # Mimi codebook size; audio ids 2048..2050 exist in the vocabulary but decode to nothing
PROMPT_BUCKET = 64  # prompt lengths and frame caps are rounded up to this, so few shapes are ever compiled


class PromptTooLongError(ValueError):
    """The prompt and the requested audio length do not fit in the model's sequence length."""


# ---- prompts -----------------------------------------------------------------------------------------------------


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


def prompt_frames(tokenizer: TextTokenizer, mimi, text: str, speaker: int | str, context: Sequence[Segment] = (),
                  num_codebooks: int = 32) -> Frames:
    """The reference's prompt: every context segment (text then Mimi-encoded audio), then the target's text."""
    from csm_jax import audio

    parts = []
    for i, seg in enumerate(context):
        if seg.audio is None:
            raise ValueError(f"context segment {i} ({seg.text[:40]!r}) has no audio; every context segment needs "
                             f"the 24 kHz mono audio of its text")
        codes = audio.encode(mimi, np.asarray(seg.audio, np.float32).reshape(-1))
        parts.append(segment_frames(tokenizer, seg, codes[:num_codebooks], num_codebooks))
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


# ---- the on-device loop ------------------------------------------------------------------------------------------


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


def sample_frame(model: Csm, hidden: jax.Array, keys: jax.Array, step: jax.Array, sampling: FrameSampling,
                 processor: LogitsProcessor | None) -> jax.Array:
    """All n codebooks of one frame per row: hidden (B, D) -> codes (B, n) int32."""
    n = model.config.num_codebooks
    b = hidden.shape[0]

    # one uniform per (row, codebook): row r's frame t depends only on key_r and t
    uniforms = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (n,)))(keys)

    def pick(logits, codebook, config):
        codebook = jnp.asarray(codebook, jnp.int32)
        if logits.shape[-1] > CODEC_CODES:  # never sample an id Mimi cannot decode
            logits = jnp.where(jnp.arange(logits.shape[-1]) < CODEC_CODES, logits, -jnp.inf)
        if processor is not None:
            logits = processor(logits, step, codebook)
        return sample(jax.lax.dynamic_index_in_dim(uniforms, codebook, axis=1, keepdims=False), logits, config)

    c0 = pick(model.codebook0_logits(hidden), 0, sampling.codebook0)
    cache = KVCache.empty(model.config.decoder, b, n, model.dtype, per_layer=not model.decoder.scan_layers)
    first = jnp.stack([hidden.astype(model.dtype), model.embed_audio(c0, 0)], axis=1)  # positions 0 and 1 together
    h, cache = model.decoder_forward(first, jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (b, 2)), cache, 0)
    codes = jnp.zeros((b, n), jnp.int32).at[:, 0].set(c0)
    codes = codes.at[:, 1].set(pick(model.audio_logits(h[:, -1], 1), 1, sampling.depth))

    def depth_step(i, carry):
        codes, cache = carry
        previous = jax.lax.dynamic_index_in_dim(codes, i - 1, axis=1, keepdims=False)
        x = model.embed_audio(previous, i - 1)[:, None]
        h, cache = model.decoder_forward(x, jnp.full((b, 1), i, jnp.int32), cache, i)
        code = pick(model.audio_logits(h[:, 0], i), i, sampling.depth)
        return jax.lax.dynamic_update_index_in_dim(codes, code, i, axis=1), cache

    codes, _ = jax.lax.fori_loop(2, n, depth_step, (codes, cache))
    return codes


def decode_step(model: Csm, state: DecodeState, sampling: FrameSampling,
                processor: LogitsProcessor | None) -> DecodeState:
    """Samples one frame for every row, records it, and runs the backbone on it."""
    n = model.config.num_codebooks
    b = state.hidden.shape[0]
    codes = sample_frame(model, state.hidden, state.keys, state.step, sampling, processor)
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
                         frames=frames, num_frames=num_frames, done=done)


@functools.partial(jax.jit, static_argnames=("graphdef", "frame_capacity"))
def _prefill(graphdef, params, tokens, mask, segment_ids, keys, max_frames, frame_capacity: int) -> DecodeState:
    model = nnx.merge(graphdef, params)
    b, p = segment_ids.shape
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
    cache = KVCache.empty(model.config.backbone, b, p + frame_capacity, model.dtype,
                          per_layer=not model.backbone.scan_layers)
    hidden, cache = model.backbone(model.embed_frames(tokens, mask), positions, segment_ids, cache, 0)
    n = model.config.num_codebooks
    return DecodeState(step=jnp.zeros((), jnp.int32), hidden=hidden[:, -1], cache=cache,
                       positions=positions[:, -1] + 1, frames=jnp.zeros((b, frame_capacity, n), jnp.int32),
                       num_frames=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), keys=keys,
                       max_frames=jnp.asarray(max_frames, jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "processor"), donate_argnames=("state",))
def _run_until(graphdef, params, state: DecodeState, until, sampling: FrameSampling,
               processor: LogitsProcessor | None) -> DecodeState:
    """Runs frames on device while some row is unfinished and fewer than `until` frames were sampled."""
    model = nnx.merge(graphdef, params)

    def unfinished(s):
        return (s.step < until) & ~jnp.all(s.done)

    return jax.lax.while_loop(unfinished, lambda s: decode_step(model, s, sampling, processor), state)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class FrameGenerator:
    """Generates Mimi frames from prompt frames with a `Csm` (no text or audio processing here).

    Decodes with a per-layer copy of the layer parameters (`Csm.unstacked`); drop your own reference to a large
    model after building this to free its stacked arrays.
    """

    def __init__(self, model: Csm):
        self.model = model.unstacked() if model.backbone.scan_layers else model
        self.graphdef, self.params = nnx.split(self.model)
        self.config = model.config

    def start(self, prompts: Sequence[Frames], max_frames: int, seeds: Sequence[int]) -> DecodeState:
        """Left-pads the prompts into one batch, checks the budget and prefills the backbone."""
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
        return _prefill(self.graphdef, self.params, tokens, mask, segment_ids, keys, max_frames,
                        frame_capacity=_round_up(max_frames, PROMPT_BUCKET))

    def run(self, state: DecodeState, until: int, sampling: FrameSampling,
            processor: LogitsProcessor | None = None) -> DecodeState:
        """Continues the loop on device up to `until` frames (or until every row has stopped)."""
        return _run_until(self.graphdef, self.params, state, jnp.asarray(until, jnp.int32), sampling, processor)

    def generate(self, prompts: Sequence[Frames], max_frames: int, sampling: FrameSampling = FrameSampling(),
                 seeds: Sequence[int] | None = None, processor: LogitsProcessor | None = None) -> list[np.ndarray]:
        """Codes (n, F_r) int32 per prompt, F_r <= max_frames (the end frame is not included)."""
        seeds = list(range(len(prompts))) if seeds is None else seeds
        state = self.run(self.start(prompts, max_frames, seeds), max_frames, sampling, processor)
        frames, counts = jax.device_get((state.frames, state.num_frames))
        return [frames[r, :counts[r]].T for r in range(len(prompts))]

    def stream(self, prompt: Frames, max_frames: int, sampling: FrameSampling = FrameSampling(), seed: int = 0,
               processor: LogitsProcessor | None = None, first_chunk: int = 1,
               chunk: int = 4) -> Iterator[np.ndarray]:
        """Yields codes (n, k) chunks as they are sampled: `first_chunk` frames first (time to first audio),
        then `chunk` frames at a time. Together they equal `generate([prompt], ...)` with the same seed."""
        state = self.start([prompt], max_frames, [seed])
        emitted, until = 0, first_chunk
        while True:
            state = self.run(state, min(until, max_frames), sampling, processor)
            count, done = (int(x) for x in jax.device_get((state.num_frames[0], state.done[0])))
            if count > emitted:
                yield np.asarray(state.frames[0, emitted:count]).T
                emitted = count
            if done:
                return
            until += chunk


# ---- text + audio in, 24 kHz audio out ---------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    """One utterance to generate: the text, who says it, and the conversation before it."""

    text: str
    speaker: int | str = 0
    context: Sequence[Segment] = ()


def sampling_from(temperature: float, topk: int, sampling: FrameSampling | None) -> FrameSampling:
    """The original's (temperature, topk) for every codebook, unless a full `FrameSampling` is given."""
    from csm_jax.sampling import SamplerConfig

    return sampling if sampling is not None else FrameSampling.same(SamplerConfig(temperature=temperature, top_k=topk))


class Generator:
    """CSM text-to-speech with the original generator's interface; audio is 24 kHz mono float32 numpy.

    `generate` / `generate_batch` watermark their output when a watermarker is given (see `csm_jax.watermark`);
    streamed chunks are not watermarked, since the watermark is computed over a whole utterance.
    """

    sample_rate = 24_000

    def __init__(self, model: Csm, tokenizer: TextTokenizer, mimi, watermarker=None):
        if tokenizer.vocab_size > model.config.text_vocab_size:
            raise ValueError(f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} ids but the model embeds "
                             f"only {model.config.text_vocab_size}; use the tokenizer the model was trained with")
        self.frames = FrameGenerator(model)
        self.tokenizer = tokenizer
        self.mimi = mimi
        self.watermarker = watermarker

    def prompt(self, request: Request) -> Frames:
        return prompt_frames(self.tokenizer, self.mimi, request.text, request.speaker, request.context,
                             self.frames.config.num_codebooks)

    def generate(self, text: str, speaker: int | str = 0, context: Sequence[Segment] = (),
                 max_audio_length_ms: float = 90_000, temperature: float = 0.9, topk: int = 50, *, seed: int = 0,
                 sampling: FrameSampling | None = None, logits_processor: LogitsProcessor | None = None) -> np.ndarray:
        """Audio (samples,) for one utterance; `sampling` overrides temperature/topk with per-stack settings."""
        return self.generate_batch([Request(text, speaker, context)], max_audio_length_ms, temperature, topk,
                                   seeds=[seed], sampling=sampling, logits_processor=logits_processor)[0]

    def generate_codes(self, requests: Sequence[Request], max_audio_length_ms: float = 90_000,
                       temperature: float = 0.9, topk: int = 50, *, seeds: Sequence[int] | None = None,
                       sampling: FrameSampling | None = None,
                       logits_processor: LogitsProcessor | None = None) -> list[np.ndarray]:
        """Mimi codes (n, F_r) per request, all rows generated together on device."""
        prompts = [self.prompt(r) for r in requests]
        seeds = list(range(len(requests))) if seeds is None else seeds
        return self.frames.generate(prompts, max_frames_for(max_audio_length_ms),
                                    sampling_from(temperature, topk, sampling), seeds, logits_processor)

    def generate_batch(self, requests: Sequence[Request], max_audio_length_ms: float = 90_000,
                       temperature: float = 0.9, topk: int = 50, *, seeds: Sequence[int] | None = None,
                       sampling: FrameSampling | None = None,
                       logits_processor: LogitsProcessor | None = None) -> list[np.ndarray]:
        """Audio per request; row r has exactly 1920 samples per generated frame."""
        codes = self.generate_codes(requests, max_audio_length_ms, temperature, topk, seeds=seeds,
                                    sampling=sampling, logits_processor=logits_processor)
        return [self.mark(a) for a in self.decode(codes)]

    def decode(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Mimi-decodes rows of different lengths together (zero-padded: Mimi is causal, so padding after a row's
        end does not change its audio) and cuts each to its own length."""
        from csm_jax import audio

        longest = max(c.shape[1] for c in codes)
        if longest == 0:
            return [np.zeros(0, np.float32) for _ in codes]
        padded = np.stack([np.pad(c, ((0, 0), (0, longest - c.shape[1]))) for c in codes])
        wave = audio.decode(self.mimi, padded)
        return [wave[r, : c.shape[1] * audio.FRAME_SAMPLES] for r, c in enumerate(codes)]

    def mark(self, wave: np.ndarray) -> np.ndarray:
        """Applies the watermark when a watermarker was given."""
        if self.watermarker is None or len(wave) == 0:
            return wave
        from csm_jax.watermark import apply_watermark

        return apply_watermark(self.watermarker, wave)

    def generate_stream(self, text: str, speaker: int | str = 0, context: Sequence[Segment] = (),
                        max_audio_length_ms: float = 90_000, temperature: float = 0.9, topk: int = 50, *,
                        seed: int = 0, sampling: FrameSampling | None = None,
                        logits_processor: LogitsProcessor | None = None, first_chunk_frames: int = 1,
                        chunk_frames: int = 4) -> Iterator[np.ndarray]:
        """Yields audio chunks as frames are sampled (Mimi streaming decode); concatenated they equal `generate`
        with the same seed (before watermarking)."""
        from csm_jax import audio

        prompt = self.prompt(Request(text, speaker, context))
        chunks = self.frames.stream(prompt, max_frames_for(max_audio_length_ms),
                                    sampling_from(temperature, topk, sampling), seed, logits_processor,
                                    first_chunk_frames, chunk_frames)
        with audio.streaming_decoder(self.mimi, batch_size=1):
            for codes in chunks:
                yield audio.decode(self.mimi, codes[None])[0]


def load_csm_1b(checkpoint: str = "sesame/csm-1b", *, dtype=jnp.float32, param_dtype=None,
                tokenizer: str | None = None, mimi=None, mimi_device: str = "cpu", watermark: bool = True,
                cache_dir: str | None = None) -> Generator:
    """A ready `Generator`, like the original's `load_csm_1b`.

    checkpoint: a csm-jax checkpoint directory, or anything the converter reads (a hub id such as
    "sesame/csm-1b", a PyTorch checkpoint directory or file), converted once into `cache_dir`
    (default ~/.cache/csm_jax). dtype: the compute dtype; param_dtype: the weights' dtype (default: dtype).
    On CPU the fastest choice is float32 compute over bfloat16 weights. tokenizer: a path or hub id (default:
    the offline Llama-3 tokenizer). mimi: a moshi Mimi model, a weights path or hub id (default: kyutai's Mimi
    from the hub).
    """
    from csm_jax import audio
    from csm_jax.checkpoint import load_model
    from csm_jax.text import load_tokenizer
    from csm_jax.watermark import load_watermarker

    param_dtype = dtype if param_dtype is None else param_dtype
    model = load_model(resolve_checkpoint(checkpoint, param_dtype, cache_dir), dtype=dtype, param_dtype=param_dtype)
    if mimi is None or isinstance(mimi, (str, bytes)) or hasattr(mimi, "__fspath__"):
        mimi = audio.load_mimi(mimi, device=mimi_device, num_codebooks=model.config.num_codebooks)
    return Generator(model, load_tokenizer(tokenizer), mimi, load_watermarker(mimi_device) if watermark else None)


def resolve_checkpoint(checkpoint: str, dtype=jnp.float32, cache_dir: str | None = None):
    """A csm-jax checkpoint directory for `checkpoint`, converting (once, into the cache) when it is not one."""
    import os
    from pathlib import Path

    path = Path(checkpoint).expanduser()
    if (path / "metadata.json").exists() and (path / "params").exists():
        return path
    cache = Path(cache_dir or os.environ.get("CSM_JAX_CACHE", Path.home() / ".cache" / "csm_jax"))
    name = str(checkpoint).strip("/").replace("/", "--")
    target = cache / f"{name}-{jnp.dtype(dtype).name}"
    if not (target / "metadata.json").exists():
        from convert.from_torch import convert_to_orbax

        print(f"converting {checkpoint} into {target} (once)", file=sys.stderr)
        convert_to_orbax(checkpoint, target, dtype=jnp.dtype(dtype).name)
    return target
