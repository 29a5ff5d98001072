"""Text (+ context) in, 24 kHz audio out: `Generator`, with the original generator's interface, and `load_csm_1b`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csm_jax.core.codec import FRAME_SAMPLES, SAMPLE_RATE
from csm_jax.core.model import Csm
from csm_jax.inference.decode_model import load_decode_model
from csm_jax.inference.loop import FrameGenerator
from csm_jax.core.errors import UserError
from csm_jax.inference.quantize import QUANTIZED
from csm_jax.inference.prompt import RequestError, check_seeds, max_frames_for, prompt_frames
from csm_jax.inference.sampler_protocol import Sampler
from csm_jax.inference.sampling import FrameSampling, LogitsProcessor, SamplerConfig
from csm_jax.io.adapters import Adapter, AdapterError
from csm_jax.io.frames import Frames, Segment
from csm_jax.io.text import TextTokenizer


@dataclasses.dataclass
class Request:
    """One utterance to generate: the text, who says it, and the conversation before it."""

    text: str
    speaker: int | str = 0
    context: Sequence[Segment] = ()


def sampling_from(temperature: float, topk: int, sampling: FrameSampling | None) -> FrameSampling:
    """The original's (temperature, topk) for every codebook, unless a full `FrameSampling` is given."""
    return sampling if sampling is not None else FrameSampling.same(SamplerConfig(temperature=temperature, top_k=topk))


class Generator:
    """CSM text-to-speech with the original generator's interface; audio is 24 kHz mono float32 numpy.

    `generate` / `generate_batch` watermark their output when a watermarker is given (see `csm_jax.watermark`);
    streamed chunks are not watermarked, since the watermark is computed over a whole utterance.

    LoRA adapters (`csm_jax.io.adapters`): `adapter` is merged into the weights before decoding; with
    `keep_base=True` (implied by `adapter`) the base parameters are kept (one more copy of the weights) so that
    `use_adapter` can switch adapters, or go back to the base, without reloading anything.

    Sampling research: `sampler` (with its initial `sampler_state`) chooses every token inside the compiled loop
    (`csm_jax.inference.sampler_protocol`); `return_sampler_state=True` returns (result, final sampler state),
    and makes the streams yield (chunk, state after it) pairs that end with the final state.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model: Csm, tokenizer: TextTokenizer, mimi, watermarker=None, cpu_kernels: bool | None = None,
                 adapter: str | os.PathLike | None = None, keep_base: bool = False, weights_dtype: str | None = None):
        if tokenizer.vocab_size > model.config.text_vocab_size:
            raise UserError(f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} ids but the model embeds "
                             f"only {model.config.text_vocab_size}; use the tokenizer the model was trained with")
        self.config, self.cpu_kernels, self.weights_dtype = model.config, cpu_kernels, weights_dtype
        self.base = nnx.split(model) if keep_base or adapter is not None else None
        self.adapter: Adapter | None = None
        self.frames = FrameGenerator(model, cpu_kernels, weights_dtype) if adapter is None else None
        self.tokenizer = tokenizer
        self.mimi = mimi
        self.watermarker = watermarker
        if adapter is not None:
            self.use_adapter(adapter)

    def use_adapter(self, adapter: str | os.PathLike | Adapter | None) -> None:
        """Decodes from now on with `adapter` (a directory, ours or PEFT's, or a loaded `Adapter`) merged into the
        kept base weights; None goes back to the base."""
        from csm_jax.io.adapters import load_adapter, merged_params

        if self.base is None:
            raise AdapterError("this Generator did not keep its base weights, so it cannot switch adapters: build it "
                               "with load_csm_1b(..., keep_base=True) (or adapter=DIR there), or Generator(..., "
                               "keep_base=True)")
        graphdef, state = self.base
        if adapter is not None and not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter, self.config)
        if adapter is not None:
            merged = merged_params(nnx.to_pure_dict(state), adapter)
            state = jax.tree.map(lambda x: x, state)  # a new State over the same arrays, then the merged ones
            nnx.replace_by_pure_dict(state, merged)
        self.frames = FrameGenerator(nnx.merge(graphdef, state), self.cpu_kernels, self.weights_dtype)
        self.adapter = adapter

    def prompt(self, request: Request, max_frames: int = 1) -> Frames:
        """The request's prompt frames, after checking it (`csm_jax.inference.prompt.check_request`) and that the
        prompt leaves room for `max_frames` frames (checked before any context audio is encoded)."""
        if not isinstance(request, Request):
            raise RequestError(f"a request is a {type(request).__name__}; give Request(text, speaker, context)")
        config = self.frames.config
        return prompt_frames(self.tokenizer, self.mimi, request.text, request.speaker, request.context,
                             config.num_codebooks, max_frames=max_frames, max_seq_len=config.backbone.max_seq_len)

    def generate(self, text: str, speaker: int | str = 0, context: Sequence[Segment] = (),
                 max_audio_length_ms: float = 90_000, temperature: float = 0.9, topk: int = 50, *, seed: int = 0,
                 sampling: FrameSampling | None = None, logits_processor: LogitsProcessor | None = None,
                 sampler: Sampler | None = None, sampler_state: Any = None,
                 return_sampler_state: bool = False) -> np.ndarray | tuple[np.ndarray, Any]:
        """Audio (samples,) for one utterance; `sampling` overrides temperature/topk with per-stack settings."""
        out = self.generate_batch([Request(text, speaker, context)], max_audio_length_ms, temperature, topk,
                                  seeds=[seed], sampling=sampling, logits_processor=logits_processor, sampler=sampler,
                                  sampler_state=sampler_state, return_sampler_state=return_sampler_state)
        return (out[0][0], out[1]) if return_sampler_state else out[0]

    def generate_codes(self, requests: Sequence[Request], max_audio_length_ms: float = 90_000,
                       temperature: float = 0.9, topk: int = 50, *, seeds: Sequence[int] | None = None,
                       sampling: FrameSampling | None = None, logits_processor: LogitsProcessor | None = None,
                       sampler: Sampler | None = None, sampler_state: Any = None,
                       return_sampler_state: bool = False) -> list[np.ndarray] | tuple[list[np.ndarray], Any]:
        """Mimi codes (n, F_r) per request, all rows generated together on device."""
        if isinstance(requests, (Request, str)) or not hasattr(requests, "__len__") or len(requests) == 0:
            raise RequestError("requests must be a non-empty list of Request(text, speaker, context); for one "
                               "utterance call generate")
        max_frames = max_frames_for(max_audio_length_ms)
        seeds = check_seeds(seeds, len(requests))
        sampling = sampling_from(temperature, topk, sampling)
        prompts = [self.prompt(r, max_frames) for r in requests]
        return self.frames.generate(prompts, max_frames, sampling, seeds, logits_processor, sampler=sampler,
                                    sampler_state=sampler_state, return_sampler_state=return_sampler_state)

    def generate_batch(self, requests: Sequence[Request], max_audio_length_ms: float = 90_000,
                       temperature: float = 0.9, topk: int = 50, *, seeds: Sequence[int] | None = None,
                       sampling: FrameSampling | None = None, logits_processor: LogitsProcessor | None = None,
                       sampler: Sampler | None = None, sampler_state: Any = None,
                       return_sampler_state: bool = False) -> list[np.ndarray] | tuple[list[np.ndarray], Any]:
        """Audio per request; row r has exactly 1920 samples per generated frame."""
        out = self.generate_codes(requests, max_audio_length_ms, temperature, topk, seeds=seeds, sampling=sampling,
                                  logits_processor=logits_processor, sampler=sampler, sampler_state=sampler_state,
                                  return_sampler_state=True)
        audio = [self.mark(a) for a in self.decode(out[0])]
        return (audio, out[1]) if return_sampler_state else audio

    def decode(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Mimi-decodes rows of different lengths together (zero-padded: Mimi is causal, so padding after a row's
        end does not change its audio) and cuts each to its own length."""
        from csm_jax.io import audio

        longest = max(c.shape[1] for c in codes)
        if longest == 0:
            return [np.zeros(0, np.float32) for _ in codes]
        padded = np.stack([np.pad(c, ((0, 0), (0, longest - c.shape[1]))) for c in codes])
        wave = audio.decode(self.mimi, padded)
        return [wave[r, : c.shape[1] * FRAME_SAMPLES] for r, c in enumerate(codes)]

    def mark(self, wave: np.ndarray) -> np.ndarray:
        """Applies the watermark when a watermarker was given."""
        if self.watermarker is None or len(wave) == 0:
            return wave
        from csm_jax.io.watermark import apply_watermark

        return apply_watermark(self.watermarker, wave)

    def score(self, requests: Request | Frames | Sequence[Request | Frames],
              codes: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """Teacher-forced log-probabilities (F, n) of given codes (n, F) after a request's (or prompt's) frames; lists
        of both score all pairs in one batch (see `csm_jax.inference.score`)."""
        from csm_jax.inference.score import score_codes

        single = isinstance(requests, (Request, Frames))
        pairs = ([requests], [codes]) if single else (list(requests), list(codes))
        prompts = [p if isinstance(p, Frames) else self.prompt(p) for p in pairs[0]]
        scores = score_codes(self.frames.model, prompts, pairs[1])
        return scores[0] if single else scores

    def generate_stream(self, text: str, speaker: int | str = 0, context: Sequence[Segment] = (),
                        max_audio_length_ms: float = 90_000, temperature: float = 0.9, topk: int = 50, *,
                        seed: int = 0, sampling: FrameSampling | None = None,
                        logits_processor: LogitsProcessor | None = None, first_chunk_frames: int = 1,
                        chunk_frames: int = 4, sampler: Sampler | None = None, sampler_state: Any = None,
                        return_sampler_state: bool = False) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, Any]]:
        """Yields audio chunks as frames are sampled (Mimi streaming decode); concatenated they equal `generate`
        with the same seed (before watermarking). With `return_sampler_state`, yields (audio chunk, the sampler's
        state after it); the last pair holds the final state, as `generate` returns it (its chunk is empty when
        the utterance ended right after the chunk before)."""
        chunks = self.stream_codes(Request(text, speaker, context), max_audio_length_ms,
                                   sampling_from(temperature, topk, sampling), seed, logits_processor,
                                   first_chunk_frames, chunk_frames, sampler=sampler, sampler_state=sampler_state,
                                   return_sampler_state=return_sampler_state)
        return self.stream_audio(chunks)

    def stream_codes(self, request: Request, max_audio_length_ms: float, sampling: FrameSampling, seed: int,
                     logits_processor: LogitsProcessor | None = None, first_chunk_frames: int = 1,
                     chunk_frames: int = 4, *, sampler: Sampler | None = None, sampler_state: Any = None,
                     return_sampler_state: bool = False) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, Any]]:
        """Checks the request and builds its prompt now, then returns an iterator of code chunks (n, k), or of
        (codes, sampler state) pairs with `return_sampler_state` (see `FrameGenerator.stream`)."""
        max_frames = max_frames_for(max_audio_length_ms)
        (seed,) = check_seeds([seed], 1)
        for name, value in (("first_chunk_frames", first_chunk_frames), ("chunk_frames", chunk_frames)):
            if not isinstance(value, int) or value < 1:
                raise RequestError(f"{name}={value!r}; give a whole number of frames >= 1")
        prompt = self.prompt(request, max_frames)
        return self.frames.stream(prompt, max_frames, sampling, seed, logits_processor, first_chunk_frames,
                                  chunk_frames, sampler=sampler, sampler_state=sampler_state,
                                  return_sampler_state=return_sampler_state)

    def stream_audio(self, chunks: Iterator[np.ndarray] | Iterator[tuple[np.ndarray, Any]]
                     ) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, Any]]:
        """Mimi-decodes code chunks (n, k) as they come (streaming decode), into audio chunks (k * 1920,);
        (codes, sampler state) pairs become (audio, sampler state)."""
        from csm_jax.io import audio

        with audio.streaming_decoder(self.mimi, batch_size=1):
            for item in chunks:
                codes = item[0] if isinstance(item, tuple) else item
                wave = audio.decode(self.mimi, codes[None])[0] if codes.shape[1] else np.zeros(0, np.float32)
                yield (wave, item[1]) if isinstance(item, tuple) else wave


def load_csm_1b(checkpoint: str = "sesame/csm-1b", *, dtype=jnp.float32, param_dtype=None,
                tokenizer: str | None = None, mimi=None, mimi_device: str | None = None, watermark: bool = True,
                cache_dir: str | None = None, cpu_kernels: bool | None = None,
                adapter: str | os.PathLike | None = None, keep_base: bool = False) -> Generator:
    """A ready `Generator`, like the original's `load_csm_1b`.

    checkpoint: a csm-jax checkpoint directory, or anything the converter reads (a hub id such as
    "sesame/csm-1b", a PyTorch checkpoint directory or file), converted once into `cache_dir` (default
    $CSM_JAX_CACHE or ~/.cache/csm_jax; see `csm_jax.io.hub`). dtype: the compute dtype; param_dtype: the
    weights' dtype (default: dtype): float32, bfloat16, "int8" (weight-only, per-output-channel scales) or
    "int4" (weight-only, 4-bit codes with a scale and bias per group of 32 input rows; codebook heads int8),
    both quantized from the float32 weights (`csm_jax.inference.quantize`). On CPU the fastest choices are
    float32 compute over int4, int8 or bfloat16 weights.
    tokenizer: a path or hub id (default: the offline Llama-3 tokenizer). mimi: a moshi Mimi model, a weights
    path or hub id (default: kyutai's Mimi from the hub). mimi_device: torch's device for Mimi and the watermarker
    (default: the GPU JAX computes on, if torch sees it, else the CPU). cpu_kernels: the decode layout's kernel
    switch (see `csm_jax.inference.decode_model`). adapter: a LoRA adapter directory (ours or PEFT's) merged into the
    weights; the Generator then keeps the base to switch adapters with `use_adapter`, as it does with `keep_base`.
    """
    from csm_jax.io import audio
    from csm_jax.io.checkpoint import load_model, read_config
    from csm_jax.io.hub import resolve_checkpoint
    from csm_jax.io.text import load_tokenizer
    from csm_jax.io.watermark import load_watermarker

    # the cheap loads first, so that a wrong tokenizer or Mimi path is reported before the model is read
    text_tokenizer = load_tokenizer(tokenizer)
    param_dtype = dtype if param_dtype is None else param_dtype
    quantized = param_dtype if isinstance(param_dtype, str) and param_dtype in QUANTIZED else None
    load_dtype = jnp.float32 if quantized else jnp.dtype(param_dtype)
    path = resolve_checkpoint(checkpoint, jnp.dtype(load_dtype).name, cache_dir)
    config = read_config(path)
    mimi_device = mimi_device or audio.torch_device_beside_jax()
    if mimi is None or isinstance(mimi, (str, bytes)) or hasattr(mimi, "__fspath__"):
        mimi = audio.load_mimi(mimi, device=mimi_device, num_codebooks=config.num_codebooks)
    if quantized and adapter is None and not keep_base:  # no float32 model to keep: read it layer by layer
        model = load_decode_model(path, quantized, dtype=dtype, cpu_kernels=cpu_kernels)
    else:
        model = load_model(path, dtype=dtype, param_dtype=load_dtype)
    return Generator(model, text_tokenizer, mimi, load_watermarker(mimi_device) if watermark else None,
                     cpu_kernels=cpu_kernels, adapter=adapter, keep_base=keep_base, weights_dtype=quantized)
