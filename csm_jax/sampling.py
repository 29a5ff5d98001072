"""Pure token samplers over float32 logits (B, V), traceable inside the on-device generation loop.

Order of the filters, as in transformers' sampling: temperature, then top-k, top-p, min-p. Every filter keeps
ties at its threshold (the reference's top-k keeps every logit >= the k-th largest). Filtered logits become
-inf; a categorical draw (Gumbel-max, like the reference's exponential race) picks among the rest. A
temperature of 0 means greedy (argmax), whatever the filters.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf

# A user hook applied to raw logits before sampling: (logits (B, V) f32, frame index, codebook index) -> logits.
# Frame and codebook are traced int32 scalars, so the hook must be written with jnp (e.g. jnp.where on codebook).
LogitsProcessor = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to pick one codebook's token. Defaults are the reference's: temperature 0.9, top-k 50.

    temperature: 0 for greedy. top_k: 0 (or >= vocab) disables. top_p: 1.0 disables. min_p: 0.0 disables.
    """

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplerConfig(temperature=0.0, top_k=0)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Keeps logits >= the k-th largest of each row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability sums to >= p (always the top one)."""
    if p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked strictly higher
    kept = jnp.where(mass_before < p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def min_p_mask(logits: jax.Array, min_p: float) -> jax.Array:
    """Keeps tokens whose probability is >= min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits >= top + jnp.log(min_p), logits, NEG_INF)


def filter_logits(logits: jax.Array, config: SamplerConfig) -> jax.Array:
    """Temperature-scaled, filtered float32 logits (B, V); non-candidates are -inf."""
    logits = logits.astype(jnp.float32) / (config.temperature if not config.greedy else 1.0)
    return min_p_mask(top_p_mask(top_k_mask(logits, config.top_k), config.top_p), config.min_p)


def sample(keys: jax.Array, logits: jax.Array, config: SamplerConfig) -> jax.Array:
    """One token per row: keys (B,) PRNG keys (one per row, so a row's draw does not depend on the batch),
    logits (B, V) -> (B,) int32."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, config)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class FrameSampling:
    """Sampler settings for one frame: codebook 0 (backbone head) and codebooks 1..n-1 (depth decoder)."""

    codebook0: SamplerConfig = SamplerConfig()
    depth: SamplerConfig = SamplerConfig()

    @classmethod
    def same(cls, config: SamplerConfig) -> FrameSampling:
        return cls(codebook0=config, depth=config)
