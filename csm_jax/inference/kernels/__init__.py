"""CPU kernels for decoding: a matrix-vector product over float32, bfloat16, int8 or packed 4-bit weights
(matvec.cc) and the token sampler (sample.cc); each file says why XLA's CPU backend needs it.

Compiled on first use with the system C++ compiler (g++ or c++) for this CPU, cached under
$CSM_JAX_CACHE/kernels (default ~/.cache/csm_jax/kernels), and registered as an XLA FFI target. Whether decoding
uses them is the decode layout's switch (`csm_jax.inference.decode_model.use_cpu_kernels`: off on GPUs, and
never compiled there; on a CPU, per product kind, whichever of kernel and XLA measured faster on this CPU, see
`csm_jax.inference.products`). Without a compiler everything still works, through XLA's slower path, after a
one-time warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from csm_jax.core.quant import Int4Weight
from csm_jax.inference.quantize import when_needed
from csm_jax.io.hub import cache_dir

SOURCES = sorted(Path(__file__).parent.glob("*.cc"))
TARGETS = {  # FFI name -> C symbol
    "csm_matvec_bf16": "CsmMatvecBf16", "csm_matvec_f32": "CsmMatvecF32", "csm_matvec_i8": "CsmMatvecI8",
    "csm_matvec_i4": "CsmMatvecI4", "csm_sample_f32": "CsmSampleF32"}
MAX_ROWS = 16  # decode steps (batch x 1 or 2 positions); more rows are a prefill
SMALL_F32_BYTES = 2 << 20  # float32 weights up to this size take the kernel at batch 1 (see use_for)
_available: bool | None = None
_int4_tile: int | None = None


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = os.uname().machine
    return flags


def library_path() -> Path:
    """Where the kernels compiled for this CPU, these sources and this JAX are cached (built or not)."""
    sources = b"".join(path.read_bytes() for path in SOURCES)
    digest = hashlib.sha256(sources + jax.__version__.encode() + _cpu_signature().encode()).hexdigest()
    cache = cache_dir() / "kernels"
    return cache / f"kernels-{digest[:16]}.so"


def compile_library(library: Path, march: str = "native") -> Path:
    """Compiles the kernels for `-march=march` into `library` (through a temporary sibling, so a killed compile leaves
    nothing half-written)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run([compiler, "-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-w",
                    f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(partial)],
                   check=True, capture_output=True, text=True)
    partial.rename(library)
    return library


def register(library: Path) -> None:
    """Loads a compiled kernel library and registers its targets with XLA (once per process; `available` then says
    True)."""
    global _available, _int4_tile
    loaded = ctypes.cdll.LoadLibrary(str(library))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")
    loaded.CsmInt4Tile.restype = ctypes.c_int64
    _int4_tile = int(loaded.CsmInt4Tile())
    _available = True


def available() -> bool:
    """Whether the kernel is built and registered (tries once per process)."""
    global _available
    if _available is None:
        try:
            library = library_path()
            register(library if library.exists() else compile_library(library))
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            warnings.warn(f"the CPU decode kernels could not be built ({detail.strip()[:300]}); bfloat16 weights "
                          f"and sampling run through XLA instead, which is slower on CPU. Install g++ to fix.")
            _available = False
    return _available


def widened(rows: jax.Array, w, widen) -> jax.Array:
    """rows @ widen(w) for a prefill: the float32 weights made once rows is there (`when_needed`: one layer's at a
    time), unfused from the matmul (XLA's CPU matmul is slow on a fused widening)."""
    rows, w = when_needed(rows, w)
    return rows @ jax.lax.optimization_barrier(widen(w))


@jax.custom_vjp
def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) float32 @ w (K, N) bfloat16 or float32 -> (..., N) float32, exact (weights widened, float32
    sums): the kernel for up to MAX_ROWS rows on CPU, else a float32 matmul (on explicitly widened weights)."""
    k, n = w.shape
    rows = x.reshape(-1, k)

    def cpu(rows, w):
        if rows.shape[0] > MAX_ROWS:  # a prefill: widen bfloat16 weights once, unfused, then a float32 matmul
            return widened(rows, w, lambda w: w.astype(jnp.float32))
        target = "csm_matvec_bf16" if w.dtype == jnp.bfloat16 else "csm_matvec_f32"
        return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(rows, w)

    def other(rows, w):
        return rows @ w.astype(jnp.float32)

    return jax.lax.platform_dependent(rows, w, cpu=cpu, default=other).reshape(*x.shape[:-1], n)


def _forward(x, w):
    return matvec(x, w), (x, w)


def _backward(residuals, dy):
    x, w = residuals
    dx = dy @ w.astype(jnp.float32).T
    dw = jnp.einsum("...k,...n->kn", x, dy).astype(w.dtype)
    return dx, dw


matvec.defvjp(_forward, _backward)


def matvec_int8(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x (..., K) float32 @ (q (K, N) int8 x per-column scale (N,) float32) -> (..., N) float32, as
    (x @ q) * scale with float32 sums: the kernel for up to MAX_ROWS rows on CPU, else a float32 matmul."""
    k, n = q.shape
    rows = x.reshape(-1, k)

    def cpu(rows, q, scale):
        if rows.shape[0] > MAX_ROWS:
            return widened(rows, q, lambda q: q.astype(jnp.float32)) * scale
        return jax.ffi.ffi_call("csm_matvec_i8", jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(rows, q, scale)

    def other(rows, q, scale):
        return (rows @ q.astype(jnp.float32)) * scale

    return jax.lax.platform_dependent(rows, q, scale, cpu=cpu, default=other).reshape(*x.shape[:-1], n)


def int4_tile() -> int:
    """The strip width (columns) the 4-bit kernel reads its weights in (`Int4Weight.tiled`): 8 vector registers
    of this CPU's columns. Needs the kernels built (`available`)."""
    if not available():
        raise RuntimeError("the CPU kernels are not built here")
    return _int4_tile


def matvec_int4(x: jax.Array, w: Int4Weight) -> jax.Array:
    """x (..., K) float32 @ a 4-bit (K, N) weight -> (..., N) float32, with float32 sums of the dequantized
    values (x is padded with zeros to the weight's padded rows): the kernel for up to MAX_ROWS rows on CPU, else a
    float32 matmul of the dequantized matrix. The kernel reads `w.tiled(int4_tile())`: tile the weights once
    beforehand (the decode layout does), else every call rearranges them."""
    w = w.tiled(int4_tile())
    kp, n = 2 * w.packed.shape[-2], math.prod(w.out_shape)
    rows = x.reshape(-1, x.shape[-1])
    rows = jnp.pad(rows, ((0, 0), (0, kp - rows.shape[1])))

    def cpu(rows, packed, scale, bias):
        if rows.shape[0] > MAX_ROWS:
            return widened(rows, (packed, scale, bias),
                           lambda a: w.replace(packed=a[0], scale=a[1], bias=a[2]).matrix())
        strips = jax.ffi.ffi_call("csm_matvec_i4", jax.ShapeDtypeStruct((rows.shape[0], packed.shape[0] * w.tile),
                                                                        jnp.float32))(rows, packed, scale, bias)
        return strips[:, :n]

    def other(rows, packed, scale, bias):
        return rows @ w.replace(packed=packed, scale=scale, bias=bias).matrix()

    y = jax.lax.platform_dependent(rows, w.packed, w.scale, w.bias, cpu=cpu, default=other)
    return y.reshape(*x.shape[:-1], n)


def applies(x: jax.Array, w: jax.Array, dtype) -> bool:
    """Whether `matvec` takes this product: float32 activations against bfloat16 weights, and against float32
    weights of at most SMALL_F32_BYTES for a single row (batch-1 decoding of small layers, where a column slab per
    core lets the cores' L2 caches hold the depth decoder between its 31 steps; on the Intel machines with
    AVX-512, larger float32 layers, as in CSM-1B, decoded a few percent slower through the kernel). Whether the
    kernel is then faster than XLA on this CPU is measured (`csm_jax.inference.products`)."""
    small_single_row = x.size == x.shape[-1] and w.size * 4 <= SMALL_F32_BYTES
    return ((w.dtype == jnp.bfloat16 or (w.dtype == jnp.float32 and small_single_row))
            and jnp.dtype(dtype) == jnp.float32 and x.dtype == jnp.float32)


def sample_rows(uniforms: jax.Array, logits: jax.Array, temperature: float, top_k: int, top_p: float, min_p: float,
                fallback) -> jax.Array:
    """One token per row of float32 logits (B, V) with uniforms (B,): sample.cc on CPU, `fallback(uniforms, logits)`
    (the same draw in jnp) elsewhere."""

    def cpu(uniforms, logits):
        return jax.ffi.ffi_call("csm_sample_f32", jax.ShapeDtypeStruct(uniforms.shape, jnp.int32))(
            logits, uniforms, temperature=np.float32(temperature), top_k=np.int64(top_k), top_p=np.float32(top_p),
            min_p=np.float32(min_p))

    return jax.lax.platform_dependent(uniforms.astype(jnp.float32), logits.astype(jnp.float32), cpu=cpu,
                                      default=fallback)
