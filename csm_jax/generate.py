r"""Command line: text (+ optional context utterances) -> a 24 kHz mono wav (or flac, ogg).

    python -m csm_jax.generate --text "Hello there." --speaker 0 --out hello.wav \
        --context prev.wav "What the previous speaker said." 1 --checkpoint sesame/csm-1b

A checkpoint is a csm-jax directory or anything the converter reads (a hub id such as sesame/csm-1b, a PyTorch
checkpoint), converted once into ~/.cache/csm_jax. `--stream` writes audio as frames are produced and reports
the time to first audio. Progress shows frames/s and the real-time factor (compute time / audio time; below 1
is faster than real time).

Every argument and file is checked before the model loads, and the prompt's length before generating. The output
is written to a temporary file beside --out and renamed onto it when complete; when interrupted (Ctrl-C,
SIGTERM) what was streamed is kept as OUT.partial.wav and --out is left as it was. Exit status: 0 done, 2 a
mistake in the arguments or files (one `error:` line says what to change), 130/143 interrupted, 1 a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from csm_jax import generate_modes
from csm_jax.core.codec import FRAME_SAMPLES, FRAME_SECONDS
from csm_jax.core.errors import ArgumentParser, UserError, run_main, signals_interrupt
from csm_jax.core.logs import configure_logging
from csm_jax.core.numbers import finite_float

# JAX would otherwise take 75% of a GPU's memory at start-up and leave too little for Mimi (PyTorch) beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


WEIGHT_DTYPES = ("float32", "bfloat16", "int8", "int4")  # int8 and int4: csm_jax.inference.quantize


def add_dtype_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype and --weights-dtype, shared with the server's command line."""
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--weights-dtype", choices=WEIGHT_DTYPES, default=None,
                   help="dtype the weights are held in (default: --dtype); int8: weight-only, per-channel scales; "
                        "int4: weight-only, 4-bit in groups of 32 input rows with a scale and bias each; on CPU "
                        "'--dtype float32' with int4, int8 or bfloat16 weights is the fastest")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m csm_jax.generate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=None, help="what to say (or --text-file, --script, --batch-file)")
    p.add_argument("--speaker", default="0", help="speaker id of the utterance, an integer >= 0 (default 0)")
    p.add_argument("--context", nargs="+", action="append", default=[], metavar="WAV TRANSCRIPT [SPEAKER]",
                   help="an earlier utterance: its audio file, its transcript and its speaker (default: --speaker); "
                        "repeat for several, oldest first")
    p.add_argument("--out", default=None, help="output file: .wav or .flac (24 kHz mono, 16-bit) or .ogg (vorbis); "
                   "replaced only once complete")
    p.add_argument("--checkpoint", default="sesame/csm-1b", help="csm-jax checkpoint directory, PyTorch "
                   "checkpoint or hub id (default sesame/csm-1b)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (python -m train ... lora.rank=N "
                   "writes WORKDIR/adapter; PEFT adapters of CsmForConditionalGeneration work too), merged into the "
                   "--checkpoint weights it was trained on")
    add_dtype_arguments(p)
    p.add_argument("--tokenizer", default=None, help="Llama-3 tokenizer directory or hub id (default: offline "
                   "tokenizer.model from llama-models)")
    p.add_argument("--mimi", default=None, help="Mimi weights (.safetensors, or a .pt read as tensors only) or hub "
                   "id (default: kyutai/moshiko-pytorch-bf16); 'random' builds random weights, for tests only")
    p.add_argument("--max-audio-length-ms", type=finite_float, default=90_000, help="frame cap (default 90000)")
    s = p.add_argument_group("sampling (codebook 0; the depth_ options default to the same values)")
    s.add_argument("--temperature", type=finite_float, default=0.9, help="0 = greedy (default 0.9)")
    s.add_argument("--topk", type=int, default=50, help="0 = off (default 50)")
    s.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus mass, 1 = off")
    s.add_argument("--min-p", type=finite_float, default=0.0, help="0 = off")
    s.add_argument("--greedy", action="store_true", help="argmax for every codebook")
    for name, kind in (("temperature", finite_float), ("topk", int), ("top-p", finite_float), ("min-p", finite_float)):
        s.add_argument(f"--depth-{name}", type=kind, default=None,
                       help=f"--{name} for the depth decoder's codebooks 1..31 (default: the same as --{name})")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed: the same seed gives the same audio")
    p.add_argument("--stream", action="store_true", help="write audio as it is generated; report time to first "
                   "audio")
    p.add_argument("--no-watermark", action="store_true", help="skip the silentcipher watermark")
    generate_modes.add_arguments(p)
    return p


def sampling_from_args(args):
    from csm_jax.inference.sampling import GREEDY, FrameSampling, SamplerConfig

    if args.greedy:
        return FrameSampling.same(GREEDY)
    first = SamplerConfig(temperature=args.temperature, top_k=args.topk, top_p=args.top_p, min_p=args.min_p)
    depth = SamplerConfig(
        temperature=args.temperature if args.depth_temperature is None else args.depth_temperature,
        top_k=args.topk if args.depth_topk is None else args.depth_topk,
        top_p=args.top_p if args.depth_top_p is None else args.depth_top_p,
        min_p=args.min_p if args.depth_min_p is None else args.depth_min_p)
    return FrameSampling(codebook0=first, depth=depth)


def context_from_args(args, speaker: int):
    from csm_jax.inference.prompt import speaker_id
    from csm_jax.io.audio import read_audio
    from csm_jax.io.frames import Segment

    segments = []
    for values in args.context:
        if len(values) not in (2, 3):
            raise UserError(f"--context takes WAV TRANSCRIPT [SPEAKER], got {len(values)} values: {values}; quote a "
                            f"transcript of several words")
        wav, text = values[0], values[1]
        who = speaker_id(values[2], f"--context {wav}'s speaker") if len(values) == 3 else speaker
        segments.append(Segment(who, text, read_audio(wav)))
    return segments


def main(argv: list[str] | None = None) -> int:
    """The command line under the exit-code convention of `csm_jax.core.errors` (0, 2 for a mistake, 130/143 when
    interrupted)."""
    return run_main(generate, argv)


def generate(argv: list[str] | None = None) -> int:
    """Checks every argument and file (the output path included) before loading the model, and the prompt's
    budget before generating; writes the output through a temporary file (`csm_jax.io.audio.audio_writer`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging.WARNING, "%(message)s")
    generate_modes.check_arguments(args, parser)
    with signals_interrupt():
        from csm_jax.inference.prompt import check_seeds, check_text, max_frames_for, speaker_id
        from csm_jax.io import audio

        if args.text is not None:
            check_text(args.text, "--text")
        speaker = speaker_id(args.speaker, "--speaker")
        max_frames = max_frames_for(args.max_audio_length_ms)
        check_seeds([args.seed], 1)
        sampling = sampling_from_args(args)
        out = audio.check_output_path(args.out) if args.out is not None else None
        plan = generate_modes.plan(args, speaker) if generate_modes.wanted(args) else None
        context = context_from_args(args, speaker)

        import jax.numpy as jnp

        from csm_jax.inference.generator import Request, load_csm_1b

        mimi = audio.random_mimi(0) if args.mimi == "random" else args.mimi
        generator = load_csm_1b(args.checkpoint, dtype=jnp.dtype(args.dtype),
                                param_dtype=args.weights_dtype or args.dtype, tokenizer=args.tokenizer,
                                mimi=mimi, watermark=not args.no_watermark, adapter=args.adapter)
        if plan is not None:
            return generate_modes.run(args, plan, generator, sampling, context)
        end_of_speech = generate_modes.end_of_speech_from_args(args)
        chunks = generator.stream_codes(Request(args.text, speaker, context), args.max_audio_length_ms, sampling,
                                        args.seed, end_of_speech.processor(),
                                        first_chunk_frames=1 if args.stream else 4,
                                        chunk_frames=4 if args.stream else 16)
        frames = run_with_progress(generator, chunks, max_frames, out, args.stream, end_of_speech)
    print(f"wrote {args.out}: {frames} frames, {frames * FRAME_SECONDS:.2f} s of 24 kHz audio", file=sys.stderr)
    if frames == 0:
        print("notice: the model ended the utterance at once, so the audio is empty; try another --seed",
              file=sys.stderr)
    return 0


def run_with_progress(generator, chunks, max_frames: int, out: Path, stream: bool, end_of_speech) -> int:
    """Consumes code chunks with a progress bar; writes the audio file (streamed or at the end, after the
    end-of-speech rules' cut and trim) through a temporary file. Returns the frame count."""
    import numpy as np
    from tqdm import tqdm

    from csm_jax.io import audio

    start = time.perf_counter()
    bar = tqdm(total=max_frames, unit="frame", file=sys.stderr, desc="generating")
    frames = 0

    def advance(n):
        nonlocal frames
        frames += n
        elapsed = time.perf_counter() - start
        bar.update(n)
        bar.set_postfix(fps=f"{frames / elapsed:.1f}", rtf=f"{elapsed / (frames * FRAME_SECONDS):.2f}")

    try:
        if stream:
            with audio.audio_writer(out) as file:
                for wave in generator.stream_audio(chunks):
                    if frames == 0:
                        bar.write(f"time to first audio: {time.perf_counter() - start:.3f} s", file=sys.stderr)
                    file.write(np.clip(wave, -1, 1))
                    advance(len(wave) // FRAME_SAMPLES)
            if generator.watermarker is not None:
                print("notice: streamed audio is not watermarked (the watermark needs the whole utterance)",
                      file=sys.stderr)
            return frames
        codes = []
        for chunk in chunks:
            codes.append(chunk)
            advance(chunk.shape[1])
    finally:
        bar.close()
    all_codes = np.concatenate(codes, axis=1) if codes else np.zeros((generator.frames.config.num_codebooks, 0), int)
    all_codes, wave = end_of_speech.finish(all_codes, generator.decode([all_codes])[0])
    audio.write_audio(out, generator.mark(wave))
    return all_codes.shape[1]


if __name__ == "__main__":
    sys.exit(main())
