"""int8 weight-only quantization of the decode layout, for generation: each matrix a decode step multiplies by
(the fused q|k|v, wo, gate|up, down of every layer, the codebook-0 head, the projection and the audio heads) is held
as int8 with one float32 scale per output column (symmetric, scale = max |w| over the column / 127). Embeddings
and norms keep their dtype. A frame then reads about half the bytes of bfloat16 weights.

`quantize_decode_params` is a pure map of `decode_params`' tree; the decode layout's `matmul` computes
(x @ q) * scale in the compute dtype with float32 sums (`int8_dense`; on CPU `kernels.matvec_int8`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from csm_jax.core.quant import symmetric_int8

WEIGHT_DTYPES = ("float32", "bfloat16", "int8")  # what the weights of a decode layout can be held in


@struct.dataclass
class Int8Weight:
    """A (K, N) matrix as int8 `q` (K, N) and float32 `scale` (N,): w ~= q * scale. Sits in an `nnx.Param` in place
    of the array (`param[...]` gives it back whole)."""

    q: jax.Array
    scale: jax.Array

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError("an Int8Weight is read whole, with [...]")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def reshape(self, *shape) -> Int8Weight:
        """Reshapes that keep the output (last) axis, as layers do to fold heads into rows."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if shape[-1] != self.q.shape[-1]:
            raise ValueError(f"an Int8Weight keeps its output axis: cannot reshape {self.q.shape} to {shape}")
        return self.replace(q=self.q.reshape(shape))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_int8(w: jax.Array) -> Int8Weight:
    """(K, N) float -> per-output-column symmetric int8 (a zero column gets scale 1)."""
    q, scale = symmetric_int8(w, (0,))
    return Int8Weight(q=q, scale=scale[0])


def int8_dense(x: jax.Array, w: Int8Weight, dtype, out_dtype=None) -> jax.Array:
    """x (..., K) @ w in the compute dtype with float32 sums, scaled per output column after the product (int8
    values are exact in bfloat16, so only the sums round)."""
    y = jnp.dot(x.astype(dtype), w.q.astype(dtype), preferred_element_type=jnp.float32) * w.scale
    return y.astype(out_dtype or dtype)


def _quantize_stack(stack: dict) -> dict:
    def layer(block: dict) -> dict:
        attn, mlp = block["attn"], block["mlp"]
        wo = attn["wo"]
        return {**block,
                "attn": {"wqkv": quantize_int8(attn["wqkv"]), "wo": quantize_int8(wo.reshape(-1, wo.shape[-1]))},
                "mlp": {"w_gate_up": quantize_int8(mlp["w_gate_up"]), "w_down": quantize_int8(mlp["w_down"])}}

    return {"blocks": {i: layer(b) for i, b in stack["blocks"].items()}, "norm": stack["norm"]}


def quantize_decode_params(params: dict) -> dict:
    """`decode_params`' tree with every matrix a decode step multiplies by as an `Int8Weight`."""
    out = dict(params)
    for stack in ("backbone", "decoder"):
        out[stack] = _quantize_stack(params[stack])
    for name in ("codebook0_head", "projection"):
        out[name] = quantize_int8(params[name])
    out["audio_head"] = {i: quantize_int8(w) for i, w in params["audio_head"].items()}
    return out
