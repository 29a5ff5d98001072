r"""Command line: text (+ optional context utterances) -> a 24 kHz mono wav.

    python -m csm_jax.generate --text "Hello there." --speaker 0 --out hello.wav \
        --context prev.wav "What the previous speaker said." 1 --checkpoint sesame/csm-1b

A checkpoint is a csm-jax directory or anything the converter reads (a hub id such as sesame/csm-1b, a PyTorch
checkpoint), converted once into ~/.cache/csm_jax. `--stream` writes audio as frames are produced and reports
the time to first audio. Progress shows frames/s and the real-time factor (compute time / audio time; below 1
is faster than real time).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from csm_jax import generate_modes
from csm_jax.core.codec import FRAME_MS, FRAME_SECONDS

# JAX would otherwise take 75% of a GPU's memory at start-up and leave too little for Mimi (PyTorch) beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m csm_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=None, help="what to say (or --text-file, --script, --batch-file)")
    p.add_argument("--speaker", default="0", help="speaker id of the utterance (default 0)")
    p.add_argument("--context", nargs="+", action="append", default=[], metavar="WAV TRANSCRIPT [SPEAKER]",
                   help="an earlier utterance: its audio file, its transcript and its speaker (default: --speaker); "
                        "repeat for several, oldest first")
    p.add_argument("--out", default=None, help="output wav (24 kHz mono, 16-bit)")
    p.add_argument("--checkpoint", default="sesame/csm-1b", help="csm-jax checkpoint directory, PyTorch "
                   "checkpoint or hub id (default sesame/csm-1b)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype the weights are held in (default: --dtype); on CPU '--dtype float32 --weights-dtype "
                        "bfloat16' is the fastest")
    p.add_argument("--tokenizer", default=None, help="Llama-3 tokenizer directory or hub id (default: offline "
                   "tokenizer.model from llama-models)")
    p.add_argument("--mimi", default=None, help="Mimi weights (.safetensors) or hub id (default: "
                   "kyutai/moshiko-pytorch-bf16); 'random' builds random weights, for tests only")
    p.add_argument("--max-audio-length-ms", type=float, default=90_000, help="frame cap (default 90000)")
    s = p.add_argument_group("sampling (codebook 0; the depth_ options default to the same values)")
    s.add_argument("--temperature", type=float, default=0.9, help="0 = greedy (default 0.9)")
    s.add_argument("--topk", type=int, default=50, help="0 = off (default 50)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, 1 = off")
    s.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    s.add_argument("--greedy", action="store_true", help="argmax for every codebook")
    for name, kind in (("temperature", float), ("topk", int), ("top-p", float), ("min-p", float)):
        s.add_argument(f"--depth-{name}", type=kind, default=None,
                       help=f"--{name} for the depth decoder's codebooks 1..31 (default: the same as --{name})")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed: the same seed gives the same audio")
    p.add_argument("--stream", action="store_true", help="write audio as it is generated; report time to first "
                   "audio")
    p.add_argument("--no-watermark", action="store_true", help="skip the silentcipher watermark")
    generate_modes.add_arguments(p)
    return p


def sampling_from_args(args, parser):
    from csm_jax.inference.sampling import GREEDY, FrameSampling, SamplerConfig

    if args.greedy:
        return FrameSampling.same(GREEDY)
    try:
        first = SamplerConfig(temperature=args.temperature, top_k=args.topk, top_p=args.top_p, min_p=args.min_p)
        depth = SamplerConfig(
            temperature=args.temperature if args.depth_temperature is None else args.depth_temperature,
            top_k=args.topk if args.depth_topk is None else args.depth_topk,
            top_p=args.top_p if args.depth_top_p is None else args.depth_top_p,
            min_p=args.min_p if args.depth_min_p is None else args.depth_min_p)
    except ValueError as e:
        parser.error(str(e))
    return FrameSampling(codebook0=first, depth=depth)


def context_from_args(args, parser):
    from csm_jax.io.audio import AudioError, read_audio
    from csm_jax.io.frames import Segment

    segments = []
    for values in args.context:
        if len(values) not in (2, 3):
            parser.error(f"--context takes WAV TRANSCRIPT [SPEAKER], got {len(values)} values: {values}")
        wav, text, speaker = values[0], values[1], values[2] if len(values) == 3 else args.speaker
        if not Path(wav).is_file():
            parser.error(f"context audio {wav} does not exist")
        try:
            segments.append(Segment(speaker, text, read_audio(wav)))
        except AudioError as e:
            parser.error(str(e))
    return segments


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    generate_modes.check_arguments(args, parser)
    sampling = sampling_from_args(args, parser)
    context = context_from_args(args, parser)
    if args.max_audio_length_ms < FRAME_MS:
        parser.error(f"--max-audio-length-ms {args.max_audio_length_ms} is shorter than one {FRAME_MS} ms frame")
    if args.text is not None and not args.text.strip():
        parser.error("--text is empty; give the words to say")

    import jax.numpy as jnp

    from csm_jax.io import audio
    from csm_jax.inference.generator import Request, load_csm_1b
    from csm_jax.inference.prompt import max_frames_for

    try:
        mimi = audio.random_mimi(0) if args.mimi == "random" else args.mimi
        generator = load_csm_1b(args.checkpoint, dtype=jnp.dtype(args.dtype),
                                param_dtype=jnp.dtype(args.weights_dtype or args.dtype), tokenizer=args.tokenizer,
                                mimi=mimi, watermark=not args.no_watermark)
        if generate_modes.wanted(args):
            return generate_modes.run(args, generator, sampling, context)
        prompt = generator.prompt(Request(args.text, args.speaker, context))
        max_frames = max_frames_for(args.max_audio_length_ms)
        chunks = generator.frames.stream(prompt, max_frames, sampling, args.seed,
                                         generate_modes.end_of_speech_from_args(args).processor(),
                                         first_chunk=1 if args.stream else 4, chunk=4 if args.stream else 16)
        frames = run_with_progress(generator, chunks, max_frames, args)
    except (ValueError, OSError) as e:  # our user-facing errors are ValueErrors with the fix in the message
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {frames} frames, {frames * FRAME_SECONDS:.2f} s of 24 kHz audio", file=sys.stderr)
    return 0


def run_with_progress(generator, chunks, max_frames: int, args) -> int:
    """Consumes code chunks with a progress bar; writes the wav (streamed or at the end). Returns the frame count."""
    import numpy as np
    import soundfile as sf
    from tqdm import tqdm

    from csm_jax.io import audio

    start = time.perf_counter()
    bar = tqdm(total=max_frames, unit="frame", file=sys.stderr, desc="generating")
    codes, frames = [], 0

    def advance(n):
        nonlocal frames
        frames += n
        elapsed = time.perf_counter() - start
        bar.update(n)
        bar.set_postfix(fps=f"{frames / elapsed:.1f}", rtf=f"{elapsed / (frames * FRAME_SECONDS):.2f}")

    if args.stream:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with sf.SoundFile(args.out, "w", samplerate=audio.SAMPLE_RATE, channels=1, subtype="PCM_16") as out, \
                audio.streaming_decoder(generator.mimi):
            for chunk in chunks:
                wave = audio.decode(generator.mimi, chunk[None])[0]
                if frames == 0:
                    bar.write(f"time to first audio: {time.perf_counter() - start:.3f} s", file=sys.stderr)
                out.write(np.clip(wave, -1, 1))
                advance(chunk.shape[1])
        bar.close()
        if generator.watermarker is not None:
            print("notice: streamed audio is not watermarked (the watermark needs the whole utterance)",
                  file=sys.stderr)
        return frames
    for chunk in chunks:
        codes.append(chunk)
        advance(chunk.shape[1])
    bar.close()
    all_codes = np.concatenate(codes, axis=1) if codes else np.zeros((generator.frames.config.num_codebooks, 0), int)
    all_codes, wave = generate_modes.end_of_speech_from_args(args).finish(all_codes, generator.decode([all_codes])[0])
    audio.write_audio(args.out, generator.mark(wave))
    return all_codes.shape[1]


if __name__ == "__main__":
    sys.exit(main())
