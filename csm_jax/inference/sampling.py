"""Pure token samplers over float32 logits (B, V), traceable inside the on-device generation loop.

Order of the filters, as in transformers' sampling: temperature, then top-k, top-p, min-p. Every filter keeps
ties at its threshold (the reference's top-k keeps every logit >= the k-th largest). Filtered logits become
-inf; an inverse-CDF draw from the softmax of the rest has the distribution of the reference's exponential
race. A temperature of 0 means greedy (argmax), whatever the filters.

Settings are either static (`SamplerConfig`: one compile per setting, the fused CPU kernel applies) or per row
(`RowSampler`: (B,) arrays, so one compiled step serves rows with different settings, as continuous batching
needs); both make the same draw for the same setting.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from csm_jax.core.errors import UserError
from csm_jax.inference import kernels

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
        if not 0 <= self.temperature < float("inf"):
            problems.append(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplerConfig(temperature=0.0, top_k=0)


class RowSampler(NamedTuple):
    """`SamplerConfig` per row: (B,) arrays (temperature float32, top_k int32, top_p and min_p float32)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array

    @classmethod
    def of(cls, configs: Sequence[SamplerConfig]) -> RowSampler:
        def column(name, dtype):
            return np.array([getattr(c, name) for c in configs], dtype)

        return cls(column("temperature", np.float32), column("top_k", np.int32), column("top_p", np.float32),
                   column("min_p", np.float32))


def _static(x) -> bool:
    return isinstance(x, (int, float))


def _unless_all(skip: jax.Array, f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """f(x), or x itself when every row skips f (per-row settings: the 32-pass bisections run only when some row
    filters)."""
    return jax.lax.cond(jnp.all(skip), lambda x: x, f, x)


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (sign-magnitude to offset binary), so thresholds can be bisected."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key_where(keys: jax.Array, enough: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Per row, the largest key t with `enough(keys >= t)` true (`enough` must be monotone in the kept set and true
    for the smallest key): a 32-step bisection of compare-and-reduce passes. XLA's CPU sort and top_k call a
    comparator per comparison and are ~10x slower on these 2051-wide rows; bisection is also exact on ties."""
    lo, hi = keys.min(axis=-1), keys.max(axis=-1)
    for _ in range(32):
        gap = hi - lo
        mid = lo + gap // 2 + (gap & 1)
        ok = enough(keys >= mid[..., None])
        lo, hi = jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    return lo


def top_k_mask(logits: jax.Array, k: int | jax.Array) -> jax.Array:
    """Keeps logits >= the k-th largest of each row (ties at the k-th value are kept); k: an int or one per row.

    On the CPU the k-th value comes from a bisection (`_largest_key_where`); for a static k elsewhere from
    `lax.top_k`, one or two kernels on a GPU instead of the bisection's ~240 small ones (the same threshold, so the
    same kept set)."""
    off = (k <= 0) | (k >= logits.shape[-1])
    if _static(k):
        if off:
            return logits
        return jax.lax.platform_dependent(logits, cpu=functools.partial(top_k_bisection, k=k),
                                          default=functools.partial(top_k_sorted, k=k))
    return _unless_all(off, lambda x: jnp.where(off[..., None], x, top_k_bisection(x, k)), logits)


def top_k_bisection(logits: jax.Array, k: int | jax.Array) -> jax.Array:
    keys = _order_keys(logits)
    kth = _largest_key_where(keys, lambda kept: kept.sum(axis=-1) >= k)
    return jnp.where(keys >= kth[..., None], logits, NEG_INF)


def top_k_sorted(logits: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_mask(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability sums to >= p (always the top one); p: a
    float or one per row."""
    off = p >= 1.0
    if _static(p) and off:
        return logits

    def mask(logits):
        probs = jax.nn.softmax(logits, axis=-1)
        keys = _order_keys(logits)
        threshold = _largest_key_where(keys, lambda kept: jnp.where(kept, probs, 0.0).sum(axis=-1) >= p)
        return jnp.where((keys >= threshold[..., None]) | jnp.asarray(off)[..., None], logits, NEG_INF)

    return mask(logits) if _static(p) else _unless_all(off, mask, logits)


def min_p_mask(logits: jax.Array, min_p: float | jax.Array) -> jax.Array:
    """Keeps tokens whose probability is >= min_p times the most likely token's; min_p: a float or one per row
    (0 keeps every token: log 0 = -inf)."""
    if _static(min_p) and min_p <= 0.0:
        return logits
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits >= top + jnp.log(jnp.asarray(min_p, jnp.float32))[..., None], logits, NEG_INF)


def filter_logits(logits: jax.Array, config: SamplerConfig | RowSampler) -> jax.Array:
    """Temperature-scaled, filtered float32 logits (B, V); non-candidates are -inf."""
    if isinstance(config, SamplerConfig):
        scale = config.temperature if not config.greedy else 1.0
    else:
        scale = jnp.where(config.temperature > 0, config.temperature, 1.0)[..., None]
    logits = logits.astype(jnp.float32) / scale
    return min_p_mask(top_p_mask(top_k_mask(logits, config.top_k), config.top_p), config.min_p)


def sample(uniforms: jax.Array, logits: jax.Array, config: SamplerConfig | RowSampler,
           cpu_kernel: bool = False) -> jax.Array:
    """One token per row by inverse-CDF sampling: uniforms (B,) in [0, 1), logits (B, V) -> (B,) int32.

    One uniform per draw (not V Gumbel variates: random bits dominate a small model's frame on CPU), and each
    row's draw depends only on its own uniform. The distribution is the reference's (softmax of the filtered
    logits). With `cpu_kernel` the fused CPU kernel of `csm_jax.inference.kernels` makes the same draw.
    """
    if isinstance(config, RowSampler):  # rows with temperature 0 take the argmax
        greedy, rows = jnp.argmax(logits, axis=-1).astype(jnp.int32), config.temperature == 0
        return jax.lax.cond(jnp.all(rows), lambda: greedy,
                            lambda: jnp.where(rows, greedy, inverse_cdf_sample(uniforms, logits, config)))
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if cpu_kernel:
        return kernels.sample_rows(uniforms, logits, config.temperature, config.top_k, config.top_p, config.min_p,
                                   fallback=functools.partial(inverse_cdf_sample, config=config))
    return inverse_cdf_sample(uniforms, logits, config)


def inverse_cdf_sample(uniforms: jax.Array, logits: jax.Array, config: SamplerConfig | RowSampler) -> jax.Array:
    """`sample` in jnp: the filtered softmax's cumulative sums, and the first entry above uniform x total."""
    filtered = filter_logits(logits, config)
    weights = jnp.exp(filtered - jnp.max(filtered, axis=-1, keepdims=True))  # 0 for filtered-out tokens
    cdf = blocked_cumsum(weights)
    target = uniforms[..., None] * cdf[..., -1:]
    index = jnp.sum(cdf <= target, axis=-1)
    return jnp.minimum(index, logits.shape[-1] - 1).astype(jnp.int32)


def blocked_cumsum(x: jax.Array, block: int = 64) -> jax.Array:
    """Cumulative sum over the last axis as two small matmuls with triangular ones: within blocks of `block`, then
    over the block totals. XLA lowers a plain cumsum to a reduce-window, quadratic in the length on CPU and one of
    the slowest parts of a small model's frame."""
    v = x.shape[-1]
    blocks = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -v % block)]).reshape(*x.shape[:-1], -1, block)
    exact = jax.lax.Precision.HIGHEST  # no reduced-precision (TF32) passes on GPUs
    within = jnp.matmul(blocks, jnp.triu(jnp.ones((block, block), x.dtype)), precision=exact)
    totals = within[..., -1]
    before = jnp.matmul(totals, jnp.triu(jnp.ones((totals.shape[-1],) * 2, x.dtype), k=1), precision=exact)
    return (within + before[..., None]).reshape(*x.shape[:-1], -1)[..., :v]


@dataclasses.dataclass(frozen=True)
class FrameSampling:
    """Sampler settings for one frame: codebook 0 (backbone head) and codebooks 1..n-1 (depth decoder)."""

    codebook0: SamplerConfig = SamplerConfig()
    depth: SamplerConfig = SamplerConfig()

    @classmethod
    def same(cls, config: SamplerConfig) -> FrameSampling:
        return cls(codebook0=config, depth=config)
