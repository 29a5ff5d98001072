"""Weight-only quantization of the decode layout, for generation: each matrix a decode step multiplies by (the
fused q|k|v, wo, gate|up, down of every layer, the codebook-0 head, the projection and the audio heads) is held as
int8 with one float32 scale per output column (symmetric, scale = max |w| over the column / 127), or as 4-bit codes
with a float16 scale and bias per group of input rows (`csm_jax.core.quant.Int4Weight`). With int4 the codebook
heads (codebook 0's and the audio heads) stay int8: they are about 2% of a frame's bytes at full size, and measured
on random weights they caused half of int4's codebook-0 argmax changes. Embeddings and norms keep their dtype. A
frame then reads about half (int8) or 5/16 (int4 in groups of 32: 4 bits and 1 bit of scale and bias per weight)
of the bytes of bfloat16 weights.

`quantize_decode_params` is a pure map of `decode_params`' tree; the decode layout's `matmul` computes the products
in the compute dtype with float32 sums (`int8_dense`, `int4_dense`; on CPU the kernels of
`csm_jax.inference.kernels`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from csm_jax.core.quant import INT4_GROUP, Int4Weight, Int8Weight, quantize_int4, quantize_int8

QUANTIZED = ("int8", "int4")


def product_kinds(weights_dtype: str) -> tuple[str, ...]:
    """The kinds of product (`csm_jax.inference.products.KINDS`) a decode layout of these weights computes."""
    return ("int4", "int8") if weights_dtype == "int4" else (weights_dtype,)


def when_needed(x: jax.Array, w):
    """(x, w) through an optimization barrier, so that whatever widens w comes after x: widening depends on
    nothing else, and XLA did it for every layer before the first product (a CSM-1B int4 prefill held 3.9 GB of
    float32 weights at once) or could hoist it out of a decode loop."""
    return jax.lax.optimization_barrier((x, w))


def int8_dense(x: jax.Array, w: Int8Weight, dtype, out_dtype=None) -> jax.Array:
    """x (..., K) @ w in the compute dtype with float32 sums, scaled per output column after the product (int8
    values are exact in bfloat16, so only the sums round)."""
    x, w = when_needed(x, w)
    y = jnp.dot(x.astype(dtype), w.values.astype(dtype), preferred_element_type=jnp.float32) * w.scale.reshape(-1)
    return y.astype(out_dtype or dtype)


def int4_dense(x: jax.Array, w: Int4Weight, dtype, out_dtype=None) -> jax.Array:
    """x (..., K) @ w in the compute dtype with float32 sums of the dequantized weights (unpacked and scaled in
    the same jitted computation, which XLA may fuse into the product); x is padded to the weight's padded rows."""
    rows = x.reshape(-1, x.shape[-1])
    rows = jnp.pad(rows, ((0, 0), (0, 2 * w.packed.shape[-2] - rows.shape[1])))
    rows, w = when_needed(rows, w)
    y = jnp.dot(rows.astype(dtype), w.matrix(dtype), preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], y.shape[-1]).astype(out_dtype or dtype)


def matrix_quantizer(weights_dtype: str, group: int = INT4_GROUP):
    """The quantizer of a (K, N) matrix: "int8" (`quantize_int8`), "int4" (`quantize_int4`, groups of `group`)."""
    if weights_dtype not in QUANTIZED:
        raise ValueError(f"weights_dtype={weights_dtype!r}: quantize to one of {', '.join(QUANTIZED)}")
    return quantize_int8 if weights_dtype == "int8" else functools.partial(quantize_int4, group=group)


def quantize_layer(block: dict, weights_dtype: str = "int8", group: int = INT4_GROUP) -> dict:
    """One layer of `decode_params`' stacks with its four matrices quantized (see `quantize_decode_params`)."""
    quantize = matrix_quantizer(weights_dtype, group)
    attn, mlp = block["attn"], block["mlp"]
    wo = attn["wo"]
    return {**block,
            "attn": {"wqkv": quantize(attn["wqkv"]), "wo": quantize(wo.reshape(-1, wo.shape[-1]))},
            "mlp": {"w_gate_up": quantize(mlp["w_gate_up"]), "w_down": quantize(mlp["w_down"])}}


def quantize_heads(params: dict, weights_dtype: str = "int8", group: int = INT4_GROUP) -> dict:
    """`decode_params`' tree with the projection and the codebook heads quantized, the stacks as they are."""
    out = dict(params)
    out["projection"] = matrix_quantizer(weights_dtype, group)(params["projection"])
    out["codebook0_head"] = quantize_int8(params["codebook0_head"])
    out["audio_head"] = {i: quantize_int8(w) for i, w in params["audio_head"].items()}
    return out


def quantize_decode_params(params: dict, weights_dtype: str = "int8", group: int = INT4_GROUP) -> dict:
    """`decode_params`' tree with every matrix a decode step multiplies by as an `Int8Weight` ("int8") or an
    `Int4Weight` ("int4", in groups of `group` input rows; the codebook heads as `Int8Weight`s)."""
    out = quantize_heads(params, weights_dtype, group)
    for stack in ("backbone", "decoder"):
        blocks = params[stack]["blocks"]
        out[stack] = {"blocks": {i: quantize_layer(b, weights_dtype, group) for i, b in blocks.items()},
                      "norm": params[stack]["norm"]}
    return out
