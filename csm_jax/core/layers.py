"""Llama-3 building blocks in Flax NNX: RMSNorm, scaled RoPE, GQA attention with a fixed-size KV cache, SwiGLU.

Numerics follow the reference (transformers' Llama/CSM, torchtune): norms normalise in float32 and cast back
before the scale; RoPE angles are float32; attention scores and softmax are float32; matmuls run in the compute
`dtype` with parameters stored in `param_dtype`. Every parameter carries `logical_axes` metadata that
`csm_jax.core.sharding` maps to mesh axes. Linear kernels are stored (in, out); q/k use the rotate-half RoPE layout of
transformers (the converter permutes the original's interleaved layout).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from csm_jax.core.config import RopeScaling, TransformerConfig
from csm_jax.core.lora import LoraWeight

DType = Any
# How a layer multiplies activations (..., K) by a weight (K, N): (x, w, dtype, out_dtype) -> (..., N). `dense` by
# default; the decode layout (csm_jax.inference.decode_model) may pass a CPU-kernel product instead.
Matmul = Callable[..., jax.Array]
_init = nnx.initializers.normal(0.02)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: DType,
          init=_init) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: DType, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("norm",), param_dtype, init=nnx.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_frequencies(head_dim: int, base: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) in float32, computed in float32 as the reference does."""
    inv = (np.float32(1.0) / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                   / np.float32(head_dim)))).astype(np.float32)
    if scaling is None:
        return inv
    f = np.float32
    low_wavelen = f(scaling.original_max_position) / f(scaling.low_freq_factor)
    high_wavelen = f(scaling.original_max_position) / f(scaling.high_freq_factor)
    wavelen = f(2 * np.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / f(scaling.factor), inv)
    smooth = ((f(scaling.original_max_position) / wavelen - f(scaling.low_freq_factor))
              / (f(scaling.high_freq_factor) - f(scaling.low_freq_factor)))
    blended = (1 - smooth) * scaled / f(scaling.factor) + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


class RotaryEmbedding(nnx.Module):
    """Rotate-half RoPE with Llama-3 frequency scaling; angles in float32, applied in the activation dtype."""

    def __init__(self, head_dim: int, base: float, scaling: RopeScaling | None):
        self.head_dim, self.base, self.scaling = head_dim, base, scaling

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: (B, T, N, hd); positions: (B, T) int."""
        angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(self.head_dim, self.base, self.scaling)
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
        x1, x2 = jnp.split(x, 2, axis=-1)
        return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


@struct.dataclass
class KVCache:
    """Fixed-size cache for a whole layer stack.

    k, v: (L, B, S, K, hd) in the compute dtype, or (`per_layer`, for the decode layout's unrolled layers) tuples of L
    (B, S, K, hd) arrays, so that a decode step updates each layer in place instead of copying slices of one
    stacked array; segment_ids: (B, S) int32, the segment of the token written in each slot (0 = empty or
    padding), shared by all layers. Slots are written at one index for the whole batch, or at one index per
    row (continuous batching, where every row is at its own frame).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    segment_ids: jax.Array

    @classmethod
    def empty(cls, cfg: TransformerConfig, batch: int, length: int, dtype: DType, per_layer: bool = False) -> KVCache:
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        if per_layer:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        else:
            k = v = jnp.zeros((cfg.num_layers, *shape), dtype)
        return cls(k=k, v=v, segment_ids=jnp.zeros((batch, length), jnp.int32))


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What every layer needs besides x: RoPE positions (B, T) and the mask (B, T, S) over the S key slots."""

    positions: jax.Array
    mask: jax.Array


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, q_offset: jax.Array | int) -> jax.Array:
    """(B, T, S) bool: causal over slots (query t sits at slot q_offset + t) within equal segment ids.

    q_offset: one offset () for the batch, or one per row (B,). Padding (segment 0) attends only to padding, so
    padded rows stay finite and never leak into real tokens.
    """
    t = q_segments.shape[1]
    s = k_segments.shape[1]
    query_slots = jnp.arange(t) + jnp.asarray(q_offset)[..., None]  # (T,) or (B, T)
    causal = jnp.arange(s) <= query_slots[..., None]  # (T, S) or (B, T, S)
    return causal & (q_segments[:, :, None] == k_segments[:, None, :])


def write_slots(cache: jax.Array, x: jax.Array, index: jax.Array | int) -> jax.Array:
    """cache (B, S, ...) with x (B, T, ...) written at slots [index, index + T): one index () for the batch, or
    one per row (B,)."""
    index = jnp.asarray(index, jnp.int32)
    zeros = (jnp.zeros((), jnp.int32),) * (cache.ndim - 2)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, x, (jnp.zeros((), jnp.int32), index, *zeros))
    return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (i, *zeros)))(cache, x, index)


ATTENTION_ENV = "CSM_JAX_ATTENTION"


def cudnn_attention_fits(dtype: DType, head_dim: int, q_len: int, kv_len: int) -> bool:
    """Whether cuDNN's flash attention takes these operands with our mask (passed as its bias): bfloat16/float16,
    a head size that is a multiple of 8 up to 128, and even lengths (its training kernels refuse a bias with odd
    ones)."""
    return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
            and q_len % 2 == 0 and kv_len % 2 == 0)


def _jax_has_cudnn() -> bool:
    """Whether this JAX can build cuDNN attention at all: its CUDA plugin (with cuDNN) is installed."""
    try:
        from jax._src.lib import cuda_versions  # what jax.nn.dot_product_attention(implementation="cudnn") checks
    except ImportError:
        return False
    return cuda_versions is not None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`jax.nn.dot_product_attention` of q (B, T, H, hd) against k, v (B, S, K, hd) under mask (B, T, S): cuDNN's
    flash attention where the program runs on a CUDA GPU and the operands fit (`cudnn_attention_fits`), XLA's
    everywhere else (CPU, TPU, float32). The platform's choice is made as the program is lowered
    (`lax.platform_dependent`), so one traced program, or one `jax.export` for several platforms, takes each
    platform's own. $CSM_JAX_ATTENTION=xla|cudnn overrides the choice."""
    forced = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if forced and forced not in ("xla", "cudnn"):
        raise ValueError(f"{ATTENTION_ENV}={forced!r} is not an attention implementation; set xla or cudnn (or unset)")

    def attend(implementation: str):
        return lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                                                   implementation=implementation)

    if forced:
        return attend(forced)(q, k, v, mask)
    if cudnn_attention_fits(q.dtype, q.shape[-1], q.shape[1], k.shape[1]) and _jax_has_cudnn():
        return jax.lax.platform_dependent(q, k, v, mask, cuda=attend("cudnn"), default=attend("xla"))
    return attend("xla")(q, k, v, mask)


def dense(x: jax.Array, w: jax.Array | LoraWeight, dtype: DType, out_dtype: DType | None = None) -> jax.Array:
    """x (..., K) @ w (K, N) in the compute dtype (accumulated to `out_dtype` if given).

    x is folded to (tokens, K) first: w's gradient then contracts one axis, which XLA's CPU backend computes in
    place, where contracting (batch, time) transposes the whole output gradient first (a quarter of a small
    model's training step)."""
    rows = x.reshape(-1, x.shape[-1])
    if isinstance(w, LoraWeight):
        y = w.dense(rows, dtype, out_dtype)
    else:
        y = jnp.dot(rows, w.astype(dtype), preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _project_in(x: jax.Array, w: jax.Array, dtype: DType, matmul: Matmul) -> jax.Array:
    """"btd,dnh->btnh" as one 2-D matmul: XLA's CPU backend runs the 3-D einsum form at ~6 GB/s of weights, the
    (free) reshaped matmul at full bandwidth."""
    d, n, h = w.shape
    return matmul(x, w.reshape(d, n * h), dtype).reshape(*x.shape[:-1], n, h)


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 matmul: Matmul = dense):
        self.dtype, self.matmul = dtype, matmul
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.init_qkv(cfg.dim, rngs, param_dtype)
        self.wo = param(rngs, (cfg.num_heads, cfg.head_dim, cfg.dim), ("heads", "head_dim", "embed"), param_dtype)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)

    def init_qkv(self, d: int, rngs: nnx.Rngs, param_dtype: DType) -> None:
        h, k, hd = self.num_heads, self.num_kv_heads, self.head_dim
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.wk = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wv = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), param_dtype)

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, T, D) -> q (B, T, H, hd), k and v (B, T, K, hd)."""
        return tuple(_project_in(x, w[...], self.dtype, self.matmul) for w in (self.wq, self.wk, self.wv))

    def __call__(self, x: jax.Array, inputs: AttentionInputs, kv: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | int = 0):
        """x: (B, T, D). kv: this layer's cache (k, v), each (B, S, K, hd), or None to attend within x.

        Returns (out (B, T, D), updated (k, v) or None).
        """
        dt = self.dtype
        q, k, v = self.project_qkv(x)
        q = self.rope(q, inputs.positions)
        k = self.rope(k, inputs.positions)
        if kv is not None:
            k_all = write_slots(kv[0], k.astype(kv[0].dtype), cache_index)
            v_all = write_slots(kv[1], v.astype(kv[1].dtype), cache_index)
            new_kv = (k_all, v_all)
            k, v = k_all.astype(dt), v_all.astype(dt)
        else:
            new_kv = None
        b, t, h, hd = q.shape
        if t > 1:  # prefill and training: one fused attention (cuDNN flash attention on GPU where it applies)
            out = dot_product_attention(q, k, v, inputs.mask)
        else:  # a decode step: one query row against the cache
            groups = h // k.shape[2]
            q = q.reshape(b, t, k.shape[2], groups, hd)
            scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
            scores = jnp.where(inputs.mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, h, hd)
        wo = self.wo[...]
        return self.matmul(out.reshape(b, t, h * hd), wo.reshape(h * hd, wo.shape[-1]), dt), new_kv


class MLP(nnx.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, dim: int, hidden: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 matmul: Matmul = dense):
        self.dtype, self.matmul = dtype, matmul
        self.init_gate_up(dim, hidden, rngs, param_dtype)
        self.w_down = param(rngs, (hidden, dim), ("mlp", "embed"), param_dtype)

    def init_gate_up(self, dim: int, hidden: int, rngs: nnx.Rngs, param_dtype: DType) -> None:
        self.w_gate = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype)
        self.w_up = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype)

    def gate_up(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.matmul(x, self.w_gate[...], self.dtype), self.matmul(x, self.w_up[...], self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = self.gate_up(x)
        return self.matmul(jax.nn.silu(gate) * up, self.w_down[...], self.dtype)


class Block(nnx.Module):
    """Pre-norm Llama block: h = x + attn(norm(x)); y = h + mlp(norm(h))."""

    def __init__(self, cfg: TransformerConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 matmul: Matmul = dense, attention=Attention, mlp=MLP):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul=matmul)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = mlp(cfg.dim, cfg.mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul=matmul)

    def __call__(self, x, inputs: AttentionInputs, kv=None, cache_index=0):
        a, new_kv = self.attn(self.attn_norm(x), inputs, kv, cache_index)
        h = x + a
        return h + self.mlp(self.mlp_norm(h)), new_kv


def layer_inputs(positions: jax.Array, segment_ids: jax.Array, cache: KVCache | None,
                 cache_index: jax.Array | int, mask: jax.Array | None = None) -> tuple[AttentionInputs, jax.Array | None]:
    """The attention inputs every layer shares, and the cache's updated segment ids (None without a cache).

    Without a cache, tokens attend causally within x (and within equal segment ids, which allows packing). With a
    cache, x is written at slots [cache_index, cache_index + T) (cache_index: () or one per row (B,)) and attends to
    every filled slot. A precomputed `mask` (B, T, S) replaces both (the cache's segment ids are then left as they
    are): the depth decoder's steps take theirs from one table instead of rebuilding it every step."""
    if mask is not None:
        return AttentionInputs(positions=positions, mask=mask), None if cache is None else cache.segment_ids
    if cache is None:
        return AttentionInputs(positions=positions, mask=attention_mask(segment_ids, segment_ids, 0)), None
    seg = write_slots(cache.segment_ids, segment_ids.astype(jnp.int32), cache_index)
    return AttentionInputs(positions=positions, mask=attention_mask(segment_ids, seg, cache_index)), seg


# Activation rematerialisation of each scanned block (training memory): "none" keeps every activation for the
# backward pass; "full" keeps only each block's input and recomputes the rest; "dots" keeps the weight products'
# outputs (no batch dimensions) and recomputes the cheap elementwise work and attention.
REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a REMAT_POLICIES name (None for "full": save nothing; "none" is no remat)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} is not a policy; choose one of {', '.join(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


class Transformer(nnx.Module):
    """A stack of `num_layers` blocks, then the final RMSNorm.

    The blocks' parameters are stacked on a leading "layers" axis and run with `jax.lax.scan` (one compiled layer
    body, whatever the depth: fast compiles, the layout checkpoints and training use). Decoding uses another
    layout of the same parameters (`csm_jax.inference.decode_model`).
    """

    def __init__(self, cfg: TransformerConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs, matmul: Matmul = dense, remat: str = "none"):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat  # see REMAT_POLICIES

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul=matmul)

        self.blocks = make_blocks(rngs)
        for _, p in nnx.iter_graph(self.blocks):
            if isinstance(p, nnx.Param):
                p.set_metadata(logical_axes=("layers", *p.get_metadata()["logical_axes"]))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | int = 0, mask: jax.Array | None = None):
        """x: (B, T, D); positions, segment_ids: (B, T) int32 (segment 0 = padding); see `layer_inputs` (also for
        `mask`).

        Returns (final-norm hidden (B, T, D), updated cache or None).
        """
        x = x.astype(self.dtype)
        inputs, seg = layer_inputs(positions, segment_ids, cache, cache_index, mask)
        graphdef, state = nnx.split(self.blocks)

        def layer(h, xs):
            block_state, kv = xs
            return nnx.merge(graphdef, block_state)(h, inputs, kv, cache_index)

        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(self.remat))

        if cache is None:
            x, _ = jax.lax.scan(lambda h, s: (layer(h, (s, None))[0], None), x, state)
            return self.norm(x), None
        x, (k, v) = jax.lax.scan(layer, x, (state, (cache.k, cache.v)))
        return self.norm(x), KVCache(k=k, v=v, segment_ids=seg)
