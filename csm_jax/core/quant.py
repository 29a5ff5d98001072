"""Quantized weights: symmetric int8 per output channel and affine 4-bit in groups along the input axis (QLoRA's
frozen base, quantized decoding)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


def symmetric_int8(w: jax.Array, reduce_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scales) with w ~= values * scale: one scale per slice over `reduce_axes` (the input
    axes, so one scale per output channel; kept as size-1 axes so it broadcasts); an all-zero slice gets scale 1."""
    wf = jnp.asarray(w, jnp.float32)
    peak = jnp.max(jnp.abs(wf), axis=reduce_axes, keepdims=True)
    scale = jnp.where(peak > 0, peak / 127.0, 1.0)
    return jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8), scale.astype(jnp.float32)


class ReadWhole:
    """A weight container that sits in an `nnx.Param` in place of an array: `param[...]` gives it back whole."""

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError(f"{type(self).__name__} is read whole, with [...]")
        return self


@struct.dataclass
class Int8Weight(ReadWhole):
    """A weight as int8 `values` and float32 `scale`s per output channel, w ~= values * scale. The scale keeps the
    input axes with size 1, so it broadcasts and shards like the weight. Sits in an `nnx.Param` in place of the
    array (`param[...]` gives it back whole)."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def reshape(self, *shape) -> Int8Weight:
        """Reshapes whose last axis holds every output channel, as layers do to fold heads (the input axes into
        rows, the output axes into columns)."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if self.scale.size != shape[-1]:
            raise ValueError(f"an Int8Weight keeps its output axis: cannot reshape {self.values.shape} to {shape}")
        return Int8Weight(self.values.reshape(shape), self.scale.reshape((1,) * (len(shape) - 1) + shape[-1:]))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_int8(w: jax.Array, input_axes: tuple[int, ...] = (0,)) -> Int8Weight:
    """Symmetric int8 with one scale per output channel, reducing over `input_axes`."""
    return Int8Weight(*symmetric_int8(w, input_axes))


# ---- 4-bit weights ------------------------------------------------------------------------------------------

INT4_GROUPS = (32, 64, 128)  # the group sizes offered along the input axis
INT4_GROUP = 32  # the default: the only one that kept 90% of codebook-0 argmaxes on random weights (tests/test_int4.py)


@struct.dataclass
class Int4Weight(ReadWhole):
    """A weight as 4-bit codes in groups along the input axis: w ~= code * scale + bias, one float16 scale and bias
    per group of `group` input rows and output column (affine: the 16 levels span the group's values, least-squares
    fitted).

    Held as matrices (*lead, K, N): input axes folded into K (padded with zero rows to a whole number of groups),
    output axes into N; `in_shape` / `out_shape` are the unfolded axes, so `shape` and `dequantize` give the
    weight's own shape back. `packed` (*lead, K/2, N) uint8 holds rows 2i and 2i+1 in the low and high nibble of
    row i; `scale`, `bias` are (*lead, K/group, N) float16. Leading axes (stacked layers) slice like any array.

    `tile` > 0 is the CPU kernel's layout (`tiled`): the N columns (zero-padded to whole strips) in strips of `tile`,
    each strip's rows one contiguous block, so that a product streams each strip in one sequential read: `packed`
    (*lead, strips, K/2, tile), `scale` and `bias` (*lead, strips, K/group, tile)."""

    packed: jax.Array
    scale: jax.Array
    bias: jax.Array
    in_shape: tuple[int, ...] = struct.field(pytree_node=False)
    out_shape: tuple[int, ...] = struct.field(pytree_node=False)
    tile: int = struct.field(pytree_node=False, default=0)

    @property
    def rows(self) -> int:
        """The unpadded input size K."""
        return math.prod(self.in_shape)

    @property
    def group(self) -> int:
        return 2 * self.packed.shape[-2] // self.scale.shape[-2]

    @property
    def lead(self) -> tuple[int, ...]:
        """The leading (stacked layer) axes."""
        return self.packed.shape[:self.packed.ndim - (3 if self.tile else 2)]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.lead, *self.in_shape, *self.out_shape)

    def reshape(self, *shape) -> Int4Weight:
        """To a (K, N) matrix, as layers fold heads: input axes into K, output axes into N."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        k, n = self.rows, math.prod(self.out_shape)
        if self.lead or len(shape) != 2 or shape[0] not in (k, -1) or shape[1] not in (n, -1):
            raise ValueError(f"an Int4Weight folds only to its (K, N) = {(k, n)} matrix, not to {shape}")
        return self.replace(in_shape=(k,), out_shape=(n,))

    def tiled(self, tile: int) -> Int4Weight:
        """The same weight in strips of `tile` columns (see the class), as the CPU kernel reads it."""
        if self.tile:
            return self if self.tile == tile else self.untiled().tiled(tile)
        n = self.packed.shape[-1]
        strips = -(-n // tile)

        def strip(a):  # (*lead, R, N) -> (*lead, strips, R, tile), zero columns at the end
            a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, strips * tile - n)])
            return jnp.moveaxis(a.reshape(*a.shape[:-1], strips, tile), -2, -3)

        return self.replace(packed=strip(self.packed), scale=strip(self.scale), bias=strip(self.bias), tile=tile)

    def untiled(self) -> Int4Weight:
        """The same weight in the (*lead, K/2, N) layout."""
        if not self.tile:
            return self
        n = math.prod(self.out_shape)

        def join(a):  # (*lead, strips, R, tile) -> (*lead, R, N)
            a = jnp.moveaxis(a, -3, -2)
            return a.reshape(*a.shape[:-2], -1)[..., :n]

        return self.replace(packed=join(self.packed), scale=join(self.scale), bias=join(self.bias), tile=0)

    def codes(self) -> jax.Array:
        """The unpacked codes (*lead, K padded, N) uint8 in 0..15."""
        p = self.untiled().packed
        return jnp.stack([p & 15, p >> 4], axis=-2).reshape(*p.shape[:-2], 2 * p.shape[-2], p.shape[-1])

    def matrix(self, dtype=jnp.float32) -> jax.Array:
        """The dequantized (*lead, K padded, N) matrix (zero-padded rows included)."""
        flat = self.untiled()
        q = flat.codes()
        *lead, kp, n = q.shape
        groups = flat.scale.shape[-2]
        q = q.reshape(*lead, groups, kp // groups, n).astype(jnp.float32)
        w = q * flat.scale[..., None, :].astype(jnp.float32) + flat.bias[..., None, :].astype(jnp.float32)
        return w.reshape(*lead, kp, n).astype(dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = self.matrix(dtype)[..., :self.rows, :]
        return w.reshape(self.shape)


def int4_group(rows: int, group: int = INT4_GROUP) -> int:
    """The group size used for `rows` input rows: `group`, or all the rows (rounded up to even) when fewer."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size {group}: use one of {', '.join(map(str, INT4_GROUPS))}")
    return min(group, rows + rows % 2)


INT4_REFINEMENTS = 2  # least-squares passes over (scale, bias); measured: 2 cut the weights' squared error 10%


def _codes(m: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """The nearest codes (float, 0..15) of groups m (..., groups, group, N) under per-group scale and bias."""
    safe = jnp.where(scale > 0, scale, 1.0)[..., None, :]
    return jnp.clip(jnp.round((m - bias[..., None, :]) / safe), 0, 15)


def _fit_affine(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float16 (scale, bias) per group of m (..., groups, group, N): the group's min..max in 16 levels, then
    INT4_REFINEMENTS rounds of the least-squares scale and bias for the codes, and the codes for them."""
    lo, hi = jnp.min(m, axis=-2), jnp.max(m, axis=-2)
    scale, bias = (hi - lo) / 15.0, lo
    for _ in range(INT4_REFINEMENTS):
        c = _codes(m, scale, bias)
        cm, wm = jnp.mean(c, axis=-2), jnp.mean(m, axis=-2)
        var = jnp.mean((c - cm[..., None, :]) ** 2, axis=-2)
        cov = jnp.mean((c - cm[..., None, :]) * (m - wm[..., None, :]), axis=-2)
        fitted = (var > 0) & (cov > 0)
        scale = jnp.where(fitted, cov / jnp.where(fitted, var, 1.0), scale)
        bias = jnp.where(fitted, wm - scale * cm, bias)
    return scale.astype(jnp.float16), bias.astype(jnp.float16)


def quantize_int4(w: jax.Array, input_axes: tuple[int, ...] = (0,), group: int = INT4_GROUP) -> Int4Weight:
    """Affine 4-bit codes in groups of `group` along the (folded) input axes; `input_axes` must be consecutive,
    with the output axes after them (a matrix (K, N), or stacked layers (L, *in, *out))."""
    first, last = min(input_axes), max(input_axes)
    if tuple(input_axes) != tuple(range(first, last + 1)):
        raise ValueError(f"input axes {input_axes} are not consecutive")
    wf = jnp.asarray(w, jnp.float32)
    lead, in_shape, out_shape = wf.shape[:first], wf.shape[first:last + 1], wf.shape[last + 1:]
    k, n = math.prod(in_shape), math.prod(out_shape)
    g = int4_group(k, group)
    kp = -(-k // g) * g
    m = jnp.pad(wf.reshape(*lead, k, n), [(0, 0)] * len(lead) + [(0, kp - k), (0, 0)])
    m = m.reshape(*lead, kp // g, g, n)
    scale, bias = _fit_affine(m)
    s, b = scale.astype(jnp.float32), bias.astype(jnp.float32)  # the codes fit the rounded scale and bias
    q = _codes(m, s, b).astype(jnp.uint8).reshape(*lead, kp // 2, 2, n)
    packed = q[..., 0, :] | (q[..., 1, :] << 4)
    return Int4Weight(packed, scale, bias, tuple(in_shape), tuple(out_shape))


def concat_columns(matrices: list):
    """(K, N_i) matrices side by side, (K, sum N_i): arrays, `Int8Weight`s or (untiled) `Int4Weight`s. Each output
    column is quantized on its own, so joining quantized matrices equals quantizing the joined one."""
    first = matrices[0]
    if isinstance(first, Int8Weight):
        return Int8Weight(*(jnp.concatenate([getattr(m, f) for m in matrices], axis=-1) for f in ("values", "scale")))
    if isinstance(first, Int4Weight):
        if any(m.tile or m.in_shape != first.in_shape or m.group != first.group for m in matrices):
            raise ValueError("only untiled Int4Weights of the same rows and group size join")
        joined = [jnp.concatenate([getattr(m, f) for m in matrices], axis=-1) for f in ("packed", "scale", "bias")]
        return Int4Weight(*joined, first.in_shape, (joined[0].shape[-1],))
    return jnp.concatenate(matrices, axis=-1)


def is_quantized(x) -> bool:
    """An `Int8Weight` or an `Int4Weight`."""
    return isinstance(x, (Int8Weight, Int4Weight))
