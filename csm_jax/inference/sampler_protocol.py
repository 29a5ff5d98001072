"""Your own sampler inside the compiled loop, for sampling research.

A `Sampler` is a JAX function

    sampler(logits (B, V) float32, keys (B,) PRNG keys, frame () int32, codebook () int32, state) -> (tokens (B,)
    int32, state)

traced once into the on-device loop (so written with jnp: branch on `codebook` with `jnp.where`, not `if`).
`sampler_processor` runs it through the loop's `logits_processor` hook: its token becomes the only finite logit,
so whichever built-in sampler follows (any temperature, filters or greedy) picks exactly that token. Row r's keys
are `fold_in(fold_in(fold_in(key(seed), r), frame), codebook)`: a seed gives the same draws in every run.

`state` is what you pass in (e.g. per-codebook temperatures as an array); through the hook it is the same at
every call, since the loop carries no sampler state between codebooks and frames, so the returned state is not
kept: make anything that must change from step to step a function of `frame` and `codebook`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from csm_jax.inference.sampling import LogitsProcessor

Sampler = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def sampler_processor(sampler: Sampler, seed: int = 0, state: Any = None) -> LogitsProcessor:
    """A logits processor that makes the loop emit `sampler`'s tokens (see the module docstring)."""
    base = jax.random.key(seed)

    def processor(logits, frame, codebook):
        b, v = logits.shape
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, r), frame),
                                                     codebook))(jnp.arange(b))
        tokens, _ = sampler(logits.astype(jnp.float32), keys, frame, codebook, state)
        return jnp.where(jnp.arange(v)[None] == tokens[:, None].astype(jnp.int32), 0.0, -jnp.inf).astype(logits.dtype)

    return processor
