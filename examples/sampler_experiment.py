"""A sampling experiment: the built-in sampler against a custom one on the same seeds, each take scored by the
model itself, then the best of N takes of the custom sampler kept.

    python examples/sampler_experiment.py best.wav --text "The quick brown fox." -n 8
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from csm_jax import Request, load_csm_1b
from csm_jax.inference.score import best_of_n
from csm_jax.io.audio import write_audio

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out", help="the best take of the custom sampler (.wav)")
parser.add_argument("--text", default="The quick brown fox jumps over the lazy dog.")
parser.add_argument("-n", type=int, default=8, help="takes per sampler")
parser.add_argument("--max-audio-length-ms", type=float, default=6_000, help="the frame cap of each take")
parser.add_argument("--checkpoint", default="sesame/csm-1b", help="hub id, PyTorch or csm-jax checkpoint")
parser.add_argument("--mimi", help="Mimi weights file (default: kyutai's, from the hub)")
args = parser.parse_args()


def no_repeat(logits, keys, frame, codebook, previous):
    """Temperature 0.8, but codebook c never repeats its code of the frame before (previous: (B, 32)).

    A sampler runs inside the compiled loop: logits (B, V) float32, keys (B,), frame and codebook scalars, and
    its own state, carried from codebook to codebook and frame to frame; it returns (tokens (B,), state)."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) == previous[:, codebook, None], -jnp.inf, logits)
    tokens = jax.vmap(jax.random.categorical)(keys, logits / 0.8)
    return tokens, previous.at[:, codebook].set(tokens)


generator = load_csm_1b(args.checkpoint, mimi=args.mimi)
request, n, max_ms = Request(args.text, 0), args.n, args.max_audio_length_ms
samplers = {"built-in, t=0.9 top-k 50": {},
            "no-repeat, t=0.8": {"sampler": no_repeat, "sampler_state": jnp.full((n, 32), -1)}}
print(f"{'sampler':26} {'mean log-prob':>14} {'spread':>7} {'frames':>7}")
for name, kwargs in samplers.items():
    takes = generator.generate_codes([request] * n, max_ms, seeds=range(n), **kwargs)
    scores = generator.score([request] * n, takes)  # (frames, 32) log-probabilities of each take's own codes
    means = np.array([s.mean() for s in scores if s.size])
    print(f"{name:26} {means.mean():14.3f} {means.std():7.3f} {np.mean([t.shape[1] for t in takes]):7.1f}")

codes, means = best_of_n(generator, request, n=n, max_audio_length_ms=max_ms, sampler=no_repeat,
                         sampler_state=jnp.full((n, 32), -1))
print(f"best of {n}: take {int(np.argmax(means))}, mean log-prob {means.max():.3f}")
write_audio(args.out, generator.decode([codes])[0])
