"""Speak new text in the voice of a recorded clip: the clip and its transcript are the context.

    python examples/voice_from_clip.py clip.wav "What the clip says." out.wav --text "New words in that voice."
"""

import argparse

from csm_jax import Segment, load_csm_1b
from csm_jax.io.audio import read_audio, write_audio

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("clip", help="a recording of the voice (wav, flac, ogg, mp3; any rate or channels)")
parser.add_argument("transcript", help="what is said in the clip")
parser.add_argument("out", help="the .wav, .flac or .ogg to write")
parser.add_argument("--text", default="Hello! This is my voice, made from a short clip.")
parser.add_argument("--max-audio-length-ms", type=float, default=10_000, help="the frame cap of the utterance")
parser.add_argument("--checkpoint", default="sesame/csm-1b", help="hub id, PyTorch or csm-jax checkpoint")
parser.add_argument("--mimi", help="Mimi weights file (default: kyutai's, from the hub)")
args = parser.parse_args()

generator = load_csm_1b(args.checkpoint, mimi=args.mimi)  # a hub checkpoint is converted once, then cached
voice = [Segment(speaker=0, text=args.transcript, audio=read_audio(args.clip))]
audio = generator.generate(args.text, speaker=0, context=voice, max_audio_length_ms=args.max_audio_length_ms,
                           seed=0)
write_audio(args.out, audio)  # 24 kHz mono
print(f"wrote {args.out}: {len(audio) / 24_000:.2f} s")
