"""Symmetric int8 weights: the one quantization rule of the project (QLoRA's frozen base, int8 decoding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def symmetric_int8(w: jax.Array, reduce_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scales) with w ~= values * scale: one scale per slice over `reduce_axes` (the input
    axes, so one scale per output channel; kept as size-1 axes so it broadcasts); an all-zero slice gets scale 1."""
    wf = jnp.asarray(w, jnp.float32)
    peak = jnp.max(jnp.abs(wf), axis=reduce_axes, keepdims=True)
    scale = jnp.where(peak > 0, peak / 127.0, 1.0)
    return jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8), scale.astype(jnp.float32)
