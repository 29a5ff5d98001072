"""Llama-3 building blocks in Flax NNX: RMSNorm, scaled RoPE, GQA attention with a fixed-size KV cache, SwiGLU.

Numerics follow the reference (transformers' Llama/CSM, torchtune): norms normalise in float32 and cast back
before the scale; RoPE angles are float32; attention scores and softmax are float32; matmuls run in the compute
`dtype` with parameters stored in `param_dtype`. Every parameter carries `logical_axes` metadata that
`csm_jax.sharding` maps to mesh axes. Linear kernels are stored (in, out); q/k use the rotate-half RoPE layout of
transformers (the converter permutes the original's interleaved layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from csm_jax import kernels
from csm_jax.config import RopeScaling, TransformerConfig

DType = Any
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

    k, v: (L, B, S, K, hd) in the compute dtype, or (`per_layer`, for an unstacked Transformer) tuples of L
    (B, S, K, hd) arrays, so that a decode step updates each layer in place instead of copying slices of one
    stacked array; segment_ids: (B, S) int32, the segment of the token written in each slot (0 = empty or
    padding), shared by all layers. Slots are written at one index for the whole batch.
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

    Padding (segment 0) attends only to padding, so padded rows stay finite and never leak into real tokens.
    """
    t = q_segments.shape[1]
    s = k_segments.shape[1]
    causal = (jnp.arange(s)[None, :] <= (jnp.arange(t) + q_offset)[:, None])  # (T, S)
    return causal[None] & (q_segments[:, :, None] == k_segments[:, None, :])


def dense(x: jax.Array, w: jax.Array, dtype: DType, out_dtype: DType | None = None) -> jax.Array:
    """x (..., K) @ w (K, N) in the compute dtype (accumulated to `out_dtype` if given). float32 activations of a
    decode step (a few rows) against bfloat16 or float32 weights use the CPU kernel of `csm_jax.kernels` (XLA's
    CPU backend reads bfloat16 weights at ~1.7 GB/s, and runs small products on one core); that case is float32
    either way."""
    if kernels.use_for(x, w, dtype):
        return kernels.matvec(x, w)
    return jnp.dot(x, w.astype(dtype), preferred_element_type=out_dtype)


def _project_in(x: jax.Array, w: jax.Array, dtype: DType) -> jax.Array:
    """"btd,dnh->btnh" as one 2-D matmul: XLA's CPU backend runs the 3-D einsum form at ~6 GB/s of weights, the
    (free) reshaped matmul at full bandwidth."""
    d, n, h = w.shape
    return dense(x, w.reshape(d, n * h), dtype).reshape(*x.shape[:-1], n, h)


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d, h, k, hd = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = dtype
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.wk = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wv = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), param_dtype)
        self.rope = RotaryEmbedding(hd, cfg.rope_base, cfg.rope_scaling)
        self.wqkv: nnx.Param | None = nnx.data(None)  # see `fuse`

    def fuse(self):
        """For decoding: wq, wk and wv side by side in one (D, (H + 2K) * hd) array, so that a step makes one small
        matrix product instead of three (on CPU each is a kernel call with its own overhead)."""
        d = self.wq.shape[0]
        self.wqkv = nnx.Param(jnp.concatenate([w[...].reshape(d, -1) for w in (self.wq, self.wk, self.wv)], axis=1),
                              logical_axes=("embed", None))
        self.wq = self.wk = self.wv = None

    def _project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, T, D) -> q (B, T, H, hd), k and v (B, T, K, hd)."""
        if self.wqkv is None:
            return tuple(_project_in(x, w[...], self.dtype) for w in (self.wq, self.wk, self.wv))
        hd = self.wo.shape[1]
        h = self.wo.shape[0]
        qkv = dense(x, self.wqkv[...], self.dtype)
        q, k, v = jnp.split(qkv, [h * hd, h * hd + (qkv.shape[-1] - h * hd) // 2], axis=-1)
        return tuple(a.reshape(*x.shape[:-1], -1, hd) for a in (q, k, v))

    def __call__(self, x: jax.Array, inputs: AttentionInputs, kv: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | int = 0):
        """x: (B, T, D). kv: this layer's cache (k, v), each (B, S, K, hd), or None to attend within x.

        Returns (out (B, T, D), updated (k, v) or None).
        """
        dt = self.dtype
        q, k, v = self._project_qkv(x)
        q = self.rope(q, inputs.positions)
        k = self.rope(k, inputs.positions)
        if kv is not None:
            zero = jnp.zeros((), jnp.int32)
            index = jnp.asarray(cache_index, jnp.int32)
            k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (zero, index, zero, zero))
            v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (zero, index, zero, zero))
            new_kv = (k_all, v_all)
            k, v = k_all.astype(dt), v_all.astype(dt)
        else:
            new_kv = None
        b, t, h, hd = q.shape
        groups = h // k.shape[2]
        q = q.reshape(b, t, k.shape[2], groups, hd)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
        scores = jnp.where(inputs.mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, h, hd)
        wo = self.wo[...]
        return dense(out.reshape(b, t, h * hd), wo.reshape(h * hd, wo.shape[-1]), dt), new_kv


class MLP(nnx.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, dim: int, hidden: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.dtype = dtype
        self.w_gate = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype)
        self.w_up = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype)
        self.w_down = param(rngs, (hidden, dim), ("mlp", "embed"), param_dtype)
        self.w_gate_up: nnx.Param | None = nnx.data(None)  # see `fuse`

    def fuse(self):
        """For decoding: w_gate and w_up side by side in one (D, 2F) array (one matrix product per step)."""
        self.w_gate_up = nnx.Param(jnp.concatenate([self.w_gate[...], self.w_up[...]], axis=1),
                                   logical_axes=("embed", None))
        self.w_gate = self.w_up = None

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        if self.w_gate_up is None:
            gate, up = dense(x, self.w_gate[...], dt), dense(x, self.w_up[...], dt)
        else:
            gate, up = jnp.split(dense(x, self.w_gate_up[...], dt), 2, axis=-1)
        return dense(jax.nn.silu(gate) * up, self.w_down[...], dt)


class Block(nnx.Module):
    """Pre-norm Llama block: h = x + attn(norm(x)); y = h + mlp(norm(h))."""

    def __init__(self, cfg: TransformerConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, inputs: AttentionInputs, kv=None, cache_index=0):
        a, new_kv = self.attn(self.attn_norm(x), inputs, kv, cache_index)
        h = x + a
        return h + self.mlp(self.mlp_norm(h)), new_kv


class Transformer(nnx.Module):
    """A stack of `num_layers` blocks, then the final RMSNorm.

    By default the blocks' parameters are stacked on a leading "layers" axis and run with `jax.lax.scan` (one
    compiled layer body, whatever the depth: fast compiles, the layout checkpoints use). `unstacked()` gives a
    copy holding one array per layer, run as an unrolled loop: for decoding, where XLA would otherwise copy each
    layer's weights out of the stacked array on every step (measured on CPU: 5 GB/s instead of 22+ GB/s).
    """

    def __init__(self, cfg: TransformerConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs, scan_layers: bool = True):
        self.cfg = cfg
        self.dtype = dtype
        self.scan_layers = scan_layers
        if not scan_layers:
            self.blocks = nnx.List([Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                    for _ in range(cfg.num_layers)])
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
            return

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.blocks = make_blocks(rngs)
        for _, p in nnx.iter_graph(self.blocks):
            if isinstance(p, nnx.Param):
                p.set_metadata(logical_axes=("layers", *p.get_metadata()["logical_axes"]))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | int = 0):
        """x: (B, T, D); positions, segment_ids: (B, T) int32 (segment 0 = padding).

        Without a cache, tokens attend causally within x (and within equal segment ids, which allows packing).
        With a cache, x is written at slots [cache_index, cache_index + T) and attends to every filled slot.
        Returns (final-norm hidden (B, T, D), updated cache or None).
        """
        x = x.astype(self.dtype)
        if cache is None:
            mask = attention_mask(segment_ids, segment_ids, 0)
        else:
            seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                               (jnp.zeros((), jnp.int32), jnp.asarray(cache_index, jnp.int32)))
            mask = attention_mask(segment_ids, seg, cache_index)
        inputs = AttentionInputs(positions=positions, mask=mask)
        if not self.scan_layers:
            return self._unrolled(x, inputs, cache, cache_index, seg if cache is not None else None)
        graphdef, state = nnx.split(self.blocks)

        def layer(h, xs):
            block_state, kv = xs
            h, new_kv = nnx.merge(graphdef, block_state)(h, inputs, kv, cache_index)
            return h, new_kv

        if cache is None:
            x, _ = jax.lax.scan(lambda h, s: (layer(h, (s, None))[0], None), x, state)
            return self.norm(x), None
        x, (k, v) = jax.lax.scan(layer, x, (state, (cache.k, cache.v)))
        return self.norm(x), KVCache(k=k, v=v, segment_ids=seg)

    def _unrolled(self, x, inputs: AttentionInputs, cache: KVCache | None, cache_index, segment_ids):
        """The blocks as a Python loop; the cache comes back per layer (see `KVCache`)."""
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, new_kv = block(x, inputs, None if cache is None else (cache.k[i], cache.v[i]), cache_index)
            if cache is not None:
                ks.append(new_kv[0])
                vs.append(new_kv[1])
        if cache is None:
            return self.norm(x), None
        return self.norm(x), KVCache(k=tuple(ks), v=tuple(vs), segment_ids=segment_ids)

    def unstacked(self) -> Transformer:
        """A copy with one parameter array per layer (see the class docstring) and fused input projections
        (`Attention.fuse`, `MLP.fuse`); the norm is shared."""
        assert self.scan_layers, "already unstacked"
        param_dtype = self.norm.scale[...].dtype
        flat = nnx.eval_shape(lambda: Transformer(self.cfg, dtype=self.dtype, param_dtype=param_dtype,
                                                  rngs=nnx.Rngs(0), scan_layers=False))
        stacked = nnx.state(self.blocks)
        for i, block in enumerate(flat.blocks):
            nnx.update(block, jax.tree.map(lambda a: a[i], stacked))
            block.attn.fuse()
            block.mlp.fuse()
        flat.norm = self.norm
        return flat
