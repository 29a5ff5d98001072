"""The matrix products of the decode layout: XLA's (`decode_dense`) or the CPU kernels' (`kernel_matmul`), and which
of the two is faster on this CPU, per product kind (`KINDS`: the weights' float32, bfloat16, int8 or int4).

Whether a kernel pays depends on the CPU: on the Intel machines with AVX-512 the kernels were 2-3x faster than
XLA's CPU products, on a 2-core AMD EPYC with AVX2 they were 2-2.6x slower. So `faster_kinds` measures both paths
once per CPU and kind (`calibrate`: single-row products as a decode step makes them; about a second per kind) and caches the result beside the compiled kernels, keyed by the CPU model,
its flags and the kernels' build. A decode layout measures its own products (the real shapes and weights, up to
CALIBRATION_BYTES of them), cached under their shapes, so a small model whose layers fit the caches and CSM-1B
each get their own answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from csm_jax.core.layers import DType, dense
from csm_jax.core.quant import INT4_GROUP, Int4Weight, Int8Weight
from csm_jax.inference import kernels
from csm_jax.inference.quantize import int4_dense, int8_dense

KINDS = ("float32", "bfloat16", "int8", "int4")
CALIBRATION_ROUNDS = 7  # interleaved rounds per path at most; the medians (first round left out) are compared
CALIBRATION_BYTES = 48 << 20  # weights per timed call: more than a CPU's last-level cache, as a decode step reads


def kind_of(w) -> str:
    """The product kind of a weight: "int8", "int4", or its dtype's name."""
    if isinstance(w, Int8Weight):
        return "int8"
    if isinstance(w, Int4Weight):
        return "int4"
    return jnp.dtype(w.dtype).name


def decode_dense(x: jax.Array, w, dtype: DType, out_dtype: DType | None = None) -> jax.Array:
    """`dense` through XLA, for float, int8 or int4 weights."""
    if isinstance(w, Int8Weight):
        return int8_dense(x, w, dtype, out_dtype)
    if isinstance(w, Int4Weight):
        return int4_dense(x, w, dtype, out_dtype)
    return dense(x, w, dtype, out_dtype)


def _kernel_takes(x: jax.Array, w, dtype: DType) -> bool:
    """Whether a CPU kernel can compute x @ w: float32 activations and compute, and weights that `kernels.applies`
    to, or int8 / int4 weights."""
    if isinstance(w, (Int8Weight, Int4Weight)):
        return jnp.dtype(dtype) == jnp.float32 and x.dtype == jnp.float32
    return kernels.applies(x, w, dtype)


def kernel_product(x: jax.Array, w) -> jax.Array:
    """x @ w (float32) through the CPU kernel of w's kind."""
    if isinstance(w, Int8Weight):
        return kernels.matvec_int8(x, w.values, w.scale.reshape(-1))
    if isinstance(w, Int4Weight):
        return kernels.matvec_int4(x, w)
    return kernels.matvec(x, w)


def for_kernels(params, kinds: frozenset[str]):
    """`params` (any tree) with its 4-bit weights in the kernel's strips (`Int4Weight.tiled`) when int4 products go
    through the kernel, so that they are rearranged once, not at every step."""
    if "int4" not in kinds:
        return params
    tile = kernels.int4_tile()
    return jax.tree.map(lambda w: w.tiled(tile) if isinstance(w, Int4Weight) else w, params,
                        is_leaf=lambda w: isinstance(w, Int4Weight))


def kernel_matmul(x: jax.Array, w, dtype: DType, out_dtype: DType | None = None, *,
                  kinds: frozenset[str] = frozenset(KINDS)) -> jax.Array:
    """`decode_dense`, through the CPU kernel where one takes the product and its kind is in `kinds`."""
    if kind_of(w) in kinds and _kernel_takes(x, w, dtype):
        return kernel_product(x, w)
    return decode_dense(x, w, dtype, out_dtype)


# ---- calibration ---------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return os.uname().machine


def calibration_path() -> Path:
    """The cached measurements for this CPU: beside the kernels built for it (their name carries the CPU's flags,
    the kernels' sources and JAX's version), and named by the CPU model too."""
    library = kernels.library_path()
    model = "".join(c if c.isalnum() else "-" for c in _cpu_model()).strip("-")[:60]
    return library.with_name(f"{library.stem}-{model}-calibration.json")


def _weights(kind: str) -> list:
    """Single-row products as decoding does them, whose weights add up to CALIBRATION_BYTES: float32 layers small
    enough for the kernel (`kernels.SMALL_F32_BYTES`), (2048, 8192) layers for the others. Their values do not
    matter to the timing, so they are drawn as integers and codes directly (drawing and quantizing normal weights
    would cost more than the timing)."""
    rng = np.random.default_rng(0)
    k, n = (512, kernels.SMALL_F32_BYTES // 2048) if kind == "float32" else (2048, 8192)
    if kind in ("float32", "bfloat16"):
        one = jnp.asarray(rng.integers(-128, 128, (k, n), np.int8), jnp.float32).astype(kind) * 1e-4
    elif kind == "int8":
        one = Int8Weight(jnp.asarray(rng.integers(-127, 128, (k, n), np.int8)), jnp.full((1, n), 1e-3))
    else:
        groups = k // INT4_GROUP
        one = Int4Weight(jnp.asarray(rng.integers(0, 256, (k // 2, n), np.uint8)),
                         jnp.full((groups, n), 1e-3, jnp.float16), jnp.full((groups, n), -8e-3, jnp.float16),
                         (k,), (n,))
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(one))
    return [jax.tree.map(jnp.copy, one) for _ in range(-(-CALIBRATION_BYTES // nbytes))]


def decode_products(params: dict, kind: str) -> list:
    """The (K, N) weights of `kind` that a batch-1 decode step of `decode_params`' tree would send to the kernel,
    in the tree's order, as many as add up to CALIBRATION_BYTES, but at least one of each shape."""
    def matrices(stack):
        for block in stack["blocks"].values():
            yield from (block["attn"]["wqkv"], block["attn"]["wo"], block["mlp"]["w_gate_up"], block["mlp"]["w_down"])

    every = [*matrices(params["backbone"]), params["codebook0_head"], *matrices(params["decoder"]),
             params["projection"], *params["audio_head"].values()]
    row = jnp.zeros((1, 1), jnp.float32)
    picked, shapes, total = [], set(), 0
    for w in every:
        if kind_of(w) != kind:
            continue
        w = w if isinstance(w, (Int8Weight, Int4Weight)) else w.reshape(-1, w.shape[-1])
        if not _kernel_takes(jnp.broadcast_to(row, (1, w.shape[0])), w, jnp.float32):
            continue
        nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(w))
        if total < CALIBRATION_BYTES or w.shape not in shapes:
            picked.append(w)
            shapes.add(w.shape)
            total += nbytes
    return picked


def calibrate(kind: str, weights: list | None = None) -> dict:
    """Seconds per call of both paths over the same single-row products ({"kernel": s, "xla": s}): medians of
    interleaved rounds (compiled first), up to CALIBRATION_ROUNDS, fewer once one path is twice as fast as the other.
    weights: the (K, N) weights to multiply (default: `_weights(kind)`)."""
    if not kernels.available():
        raise RuntimeError("the CPU kernels are not built here: nothing to calibrate")
    weights = weights or _weights(kind)
    rng = np.random.default_rng(1)
    x = [jnp.asarray(rng.standard_normal((1, w.shape[0]), np.float32)) for w in weights]
    products = {"kernel": lambda x, ws: [kernel_product(a, w) for a, w in zip(x, ws)],
                "xla": lambda x, ws: [decode_dense(a, w, jnp.float32) for a, w in zip(x, ws)]}
    inputs = {"kernel": for_kernels(weights, frozenset(KINDS)), "xla": weights}  # each in the layout it would read
    paths = {name: jax.jit(f).lower(x, inputs[name]).compile() for name, f in products.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for round_ in range(CALIBRATION_ROUNDS):
        for name, f in paths.items():
            start = time.perf_counter()
            jax.block_until_ready(f(x, inputs[name]))
            times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t[1:] if len(t) > 1 else t) for name, t in times.items()}
        if round_ >= 2 and max(medians.values()) > 2 * min(medians.values()):
            break
    return medians


def _read(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) and isinstance(record.get("kinds"), dict) else {}
    except (OSError, ValueError):
        return {}


def measurements(kinds=KINDS, params: dict | None = None) -> dict[str, dict]:
    """{kind: {"kernel": s, "xla": s}} for this CPU: from the cache, measuring (and caching) the kinds missing. With
    `params` (`decode_params`' tree) over that model's own products (`decode_products`; cached under the kind and
    a hash of their shapes), else over `_weights(kind)`; a kind with no product for the kernel is left out."""
    path = calibration_path()
    measured = _read(path).get("kinds", {})
    weights = {kind: decode_products(params, kind) if params is not None else None for kind in kinds}
    keys = {kind: kind if w is None else f"{kind} {_shapes_digest(w)}" for kind, w in weights.items() if w != []}
    missing = [k for k, key in keys.items()
               if not isinstance(measured.get(key), dict) or not {"kernel", "xla"} <= measured[key].keys()]
    if missing:
        measured = {**measured, **{keys[kind]: calibrate(kind, weights[kind]) for kind in missing}}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"cpu": _cpu_model(), "kinds": measured}, indent=1))
        partial.replace(path)
    return {kind: measured[key] for kind, key in keys.items()}


def _shapes_digest(weights: list) -> str:
    return hashlib.sha256(repr([tuple(w.shape) for w in weights]).encode()).hexdigest()[:12]


def faster_kinds(kinds=KINDS, params: dict | None = None) -> frozenset[str]:
    """The kinds among `kinds` whose kernel measured faster than XLA on this CPU (needs the kernels built), over
    the products of `params` if given (see `measurements`)."""
    return frozenset(kind for kind, t in measurements(kinds, params).items() if t["kernel"] < t["xla"])
