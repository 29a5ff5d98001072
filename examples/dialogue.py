"""A dialogue between two speakers: each turn is generated after the turns before it, which are its context.

    python examples/dialogue.py talk.wav
"""

import argparse

import numpy as np

from csm_jax import load_csm_1b
from csm_jax.inference.longform import Turn, generate_conversation
from csm_jax.io.audio import write_audio

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out", help="the whole dialogue (.wav); each turn also goes to OUT_001.wav, OUT_002.wav, ...")
parser.add_argument("--max-audio-length-ms", type=float, default=8_000, help="the frame cap of each turn")
parser.add_argument("--checkpoint", default="sesame/csm-1b", help="hub id, PyTorch or csm-jax checkpoint")
parser.add_argument("--mimi", help="Mimi weights file (default: kyutai's, from the hub)")
args = parser.parse_args()

turns = [Turn(speaker=0, text="Did you hear? The library stays open late tonight."),
         Turn(speaker=1, text="Great, I still have a book to return."),
         Turn(speaker=0, text="Then let's walk over together after dinner.")]

generator = load_csm_1b(args.checkpoint, mimi=args.mimi)
results = generate_conversation(generator, turns, max_audio_length_ms=args.max_audio_length_ms, seed=0)
stem = args.out.removesuffix(".wav")
for i, result in enumerate(results, 1):
    write_audio(f"{stem}_{i:03d}.wav", result.audio)
    print(f"turn {i}: speaker {turns[i - 1].speaker}, {result.codes.shape[1]} frames, earlier turns in its "
          f"prompt: {result.context_turns}")
write_audio(args.out, np.concatenate([r.audio for r in results]))
