"""A batch job: every line of a text file spoken as its own utterance, several lines at a time on the device.

    python examples/batch_job.py lines.txt lines/ --batch-size 8     # lines/001.wav, lines/002.wav, ...

(The command line does the same: python -m csm_jax.generate --batch-file lines.txt --out-dir lines/.)
"""

import argparse
from pathlib import Path

from csm_jax import Request, load_csm_1b
from csm_jax.io.audio import write_audio

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("lines", help="a text file, one utterance per line")
parser.add_argument("out_dir")
parser.add_argument("--batch-size", type=int, default=8, help="lines generated together")
parser.add_argument("--speaker", type=int, default=0)
parser.add_argument("--max-audio-length-ms", type=float, default=15_000, help="the frame cap of each line")
parser.add_argument("--checkpoint", default="sesame/csm-1b", help="hub id, PyTorch or csm-jax checkpoint")
parser.add_argument("--mimi", help="Mimi weights file (default: kyutai's, from the hub)")
args = parser.parse_args()

lines = [line.strip() for line in Path(args.lines).read_text().splitlines() if line.strip()]
generator = load_csm_1b(args.checkpoint, mimi=args.mimi)
for start in range(0, len(lines), args.batch_size):
    batch = lines[start:start + args.batch_size]
    requests = [Request(text, args.speaker) for text in batch]
    seeds = range(start, start + len(batch))  # one seed per line: the same line gives the same audio in any batch
    audios = generator.generate_batch(requests, max_audio_length_ms=args.max_audio_length_ms, seeds=seeds)
    for number, audio in enumerate(audios, start + 1):
        write_audio(Path(args.out_dir) / f"{number:03d}.wav", audio)
    print(f"lines {start + 1}-{start + len(batch)} of {len(lines)} done")
