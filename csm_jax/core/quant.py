"""Symmetric int8 weights: the one quantization rule of the project (QLoRA's frozen base, int8 decoding)."""

from __future__ import annotations

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


def is_int8(x) -> bool:
    return isinstance(x, Int8Weight)
