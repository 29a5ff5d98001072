"""Text (+ context) in, 24 kHz audio out: `Generator`, with the original generator's interface, and `load_csm_1b`."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from csm_jax.core.codec import FRAME_SAMPLES, SAMPLE_RATE
from csm_jax.core.model import Csm
from csm_jax.inference.loop import FrameGenerator
from csm_jax.inference.prompt import max_frames_for, prompt_frames
from csm_jax.inference.sampling import FrameSampling, LogitsProcessor, SamplerConfig
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
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model: Csm, tokenizer: TextTokenizer, mimi, watermarker=None, cpu_kernels: bool | None = None):
        if tokenizer.vocab_size > model.config.text_vocab_size:
            raise ValueError(f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} ids but the model embeds "
                             f"only {model.config.text_vocab_size}; use the tokenizer the model was trained with")
        self.frames = FrameGenerator(model, cpu_kernels)
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
                        chunk_frames: int = 4) -> Iterator[np.ndarray]:
        """Yields audio chunks as frames are sampled (Mimi streaming decode); concatenated they equal `generate`
        with the same seed (before watermarking)."""
        from csm_jax.io import audio

        prompt = self.prompt(Request(text, speaker, context))
        chunks = self.frames.stream(prompt, max_frames_for(max_audio_length_ms),
                                    sampling_from(temperature, topk, sampling), seed, logits_processor,
                                    first_chunk_frames, chunk_frames)
        with audio.streaming_decoder(self.mimi, batch_size=1):
            for codes in chunks:
                yield audio.decode(self.mimi, codes[None])[0]


def load_csm_1b(checkpoint: str = "sesame/csm-1b", *, dtype=jnp.float32, param_dtype=None,
                tokenizer: str | None = None, mimi=None, mimi_device: str = "cpu", watermark: bool = True,
                cache_dir: str | None = None, cpu_kernels: bool | None = None) -> Generator:
    """A ready `Generator`, like the original's `load_csm_1b`.

    checkpoint: a csm-jax checkpoint directory, or anything the converter reads (a hub id such as
    "sesame/csm-1b", a PyTorch checkpoint directory or file), converted once into `cache_dir` (default
    $CSM_JAX_CACHE or ~/.cache/csm_jax; see `csm_jax.io.hub`). dtype: the compute dtype; param_dtype: the
    weights' dtype (default: dtype). On CPU the fastest choice is float32 compute over bfloat16 weights.
    tokenizer: a path or hub id (default: the offline Llama-3 tokenizer). mimi: a moshi Mimi model, a weights
    path or hub id (default: kyutai's Mimi from the hub). cpu_kernels: the decode layout's kernel switch (see
    `csm_jax.inference.decode_model`).
    """
    from csm_jax.io import audio
    from csm_jax.io.checkpoint import load_model
    from csm_jax.io.hub import resolve_checkpoint
    from csm_jax.io.text import load_tokenizer
    from csm_jax.io.watermark import load_watermarker

    param_dtype = dtype if param_dtype is None else param_dtype
    path = resolve_checkpoint(checkpoint, jnp.dtype(param_dtype).name, cache_dir)
    model = load_model(path, dtype=dtype, param_dtype=param_dtype)
    if mimi is None or isinstance(mimi, (str, bytes)) or hasattr(mimi, "__fspath__"):
        mimi = audio.load_mimi(mimi, device=mimi_device, num_codebooks=model.config.num_codebooks)
    return Generator(model, load_tokenizer(tokenizer), mimi, load_watermarker(mimi_device) if watermark else None,
                     cpu_kernels=cpu_kernels)
