"""Run as its own process (XLA takes one library per kernel name): the CPU kernels compiled for another instruction
set than this CPU's best (`-march=haswell`: AVX2 + FMA + F16C; `-march=x86-64`: no SIMD), each product checked
against a float64 product of the same weights; prints a JSON report.

    python -m tests.kernel_isa haswell OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's packages first
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from csm_jax.core.quant import quantize_int4, quantize_int8  # noqa: E402
from csm_jax.inference import kernels  # noqa: E402

SHAPES = [(1, 64, 2051), (1, 256, 300), (3, 40, 300), (16, 256, 1024), (1, 24, 17), (8, 192, 96), (2, 2048, 520)]


def worst(got, expect, k: int) -> float:
    """The largest error in units of float32 rounding of k terms of size ~0.3 (bounds of tests/test_int4.py)."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - expect) / (1e-5 * np.abs(expect) + 1e-5 * np.sqrt(k) * 0.3)))


def main(march: str, out: Path) -> dict:
    kernels.register(kernels.compile_library(out / f"kernels-{march}.so", march))
    errors = {}
    for rows, k, n in SHAPES:
        rng = np.random.default_rng(rows + n)
        w = jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32)
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        xf = np.asarray(x, np.float64)
        q4, q8, wb = quantize_int4(w, group=32 if k % 64 else 64), quantize_int8(w), w.astype(jnp.bfloat16)
        errors[f"int4 {rows}x{k}x{n}"] = worst(jax.jit(kernels.matvec_int4)(x, q4),
                                               xf @ np.asarray(q4.dequantize(), np.float64), k)
        errors[f"int8 {rows}x{k}x{n}"] = worst(jax.jit(kernels.matvec_int8)(x, q8.values, q8.scale.reshape(-1)),
                                               xf @ np.asarray(q8.dequantize(), np.float64), k)
        errors[f"bf16 {rows}x{k}x{n}"] = worst(jax.jit(kernels.matvec)(x, wb),
                                               xf @ np.asarray(wb.astype(jnp.float32), np.float64), k)
    return {"march": march, "int4_tile": kernels.int4_tile(), "worst": max(errors.values()), "errors": errors}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
