"""int8 weight-only quantization of the decode layout, for generation: each matrix a decode step multiplies by
(the fused q|k|v, wo, gate|up, down of every layer, the codebook-0 head, the projection and the audio heads) is held
as int8 with one float32 scale per output column (symmetric, scale = max |w| over the column / 127). Embeddings
and norms keep their dtype. A frame then reads about half the bytes of bfloat16 weights.

`quantize_decode_params` is a pure map of `decode_params`' tree; the decode layout's `matmul` computes
(x @ values) * scale in the compute dtype with float32 sums (`int8_dense`; on CPU `kernels.matvec_int8`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from csm_jax.core.quant import Int8Weight, quantize_int8

WEIGHT_DTYPES = ("float32", "bfloat16", "int8")  # what the weights of a decode layout can be held in


def int8_dense(x: jax.Array, w: Int8Weight, dtype, out_dtype=None) -> jax.Array:
    """x (..., K) @ w in the compute dtype with float32 sums, scaled per output column after the product (int8
    values are exact in bfloat16, so only the sums round)."""
    y = jnp.dot(x.astype(dtype), w.values.astype(dtype), preferred_element_type=jnp.float32) * w.scale.reshape(-1)
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
