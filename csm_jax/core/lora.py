"""LoRA as pure functions over the stacked parameter tree, and the int8 / int4 base weights of QLoRA.

An adapter is its own pytree beside the model's parameters, stacked over layers like the weight it adapts:
`{stack: {target: {"a": (L, *in, r), "b": (L, r, *out)}}}`, e.g. for the backbone's q projection (D, H, hd):
a (L, D, r) and b (L, r, H, hd). The effective weight is W + scale * a @ b (contracted over r), scale = alpha / r
(alpha / sqrt(r) with rsLoRA), as in PEFT. Two forms of the same product:
- `merge` forms W + scale * a @ b in a pure parameter dict: generation merges once when an adapter is chosen, and
  export writes the merged weights.
- `adapted` puts a `LoraWeight` in the weight's place, which the layers' `dense` computes as
  x @ W + scale * (x @ a) @ b: training uses it, so the frozen W gets no gradient (the merged form would compute
  a full-size weight gradient, x^T dy, only to project it onto a and b) and dropout acts on each token's input,
  as PEFT's does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from csm_jax.core.quant import ReadWhole, is_quantized, quantize_int4, quantize_int8

# target name -> (module, parameter, number of leading input axes of the per-layer weight)
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("attn", "wq", 1),  # (D, H, hd)
    "k": ("attn", "wk", 1),  # (D, K, hd)
    "v": ("attn", "wv", 1),  # (D, K, hd)
    "o": ("attn", "wo", 2),  # (H, hd, D)
    "gate": ("mlp", "w_gate", 1),  # (D, F)
    "up": ("mlp", "w_up", 1),  # (D, F)
    "down": ("mlp", "w_down", 1),  # (F, D)
}
STACKS = ("backbone", "decoder")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What an adapter adapts and how strongly; `dropout` only matters in training (see `merge`)."""

    rank: int = 32
    alpha: float = 32.0
    targets: tuple[str, ...] = tuple(TARGETS)
    stacks: tuple[str, ...] = STACKS
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS] + [s for s in self.stacks if s not in STACKS]
        if bad or not self.targets or not self.stacks or self.rank < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"invalid LoRA settings (rank {self.rank}, dropout {self.dropout}, targets "
                             f"{self.targets}, stacks {self.stacks}): rank >= 1, 0 <= dropout < 1, targets among "
                             f"{', '.join(TARGETS)}, stacks among {', '.join(STACKS)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def pairs(self):
        """(stack, target) for every adapted weight, in a fixed order."""
        return [(s, t) for s in self.stacks for t in self.targets]


def weight_path(stack: str, target: str) -> tuple[str, ...]:
    """Path of the adapted (stacked) weight in the model's pure parameter dict."""
    module, name, _ = TARGETS[target]
    return (stack, "blocks", module, name)


def get_path(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of the nested dict `tree` with the leaf at `path` replaced (the other leaves shared)."""
    if not path:
        return value
    return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}


def split_shape(shape: tuple[int, ...], target: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A stacked weight's shape -> (layers, input axes, output axes)."""
    n_in = TARGETS[target][2]
    return tuple(shape[:1]), tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def adapter_shapes(weight_shape: tuple[int, ...], target: str, rank: int) -> dict[str, tuple[int, ...]]:
    layers, ins, outs = split_shape(weight_shape, target)
    return {"a": (*layers, *ins, rank), "b": (*layers, rank, *outs)}


def adapter_axes(weight_axes: tuple, target: str) -> dict[str, tuple]:
    """Logical axes of a and b from those of the weight: a (layers, *in, None), b (layers, None, *out); so the
    sharding rules that place a weight place its adapter consistently."""
    layers, ins, outs = split_shape(tuple(weight_axes), target)
    return {"a": (*layers, *ins, None), "b": (*layers, None, *outs)}


def init_adapters(key: jax.Array, params: dict, spec: LoraSpec) -> dict:
    """PEFT's default init: a ~ U(+-1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)), b = 0, so training starts
    from the base model. `params` may hold arrays or ShapeDtypeStructs (only shapes are read)."""
    adapters: dict = {}
    for i, (stack, target) in enumerate(spec.pairs()):
        shapes = adapter_shapes(get_path(params, weight_path(stack, target)).shape, target, spec.rank)
        fan_in = math.prod(shapes["a"][1:-1])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), shapes["a"], jnp.float32, -bound, bound)
        adapters.setdefault(stack, {})[target] = {"a": a, "b": jnp.zeros(shapes["b"], jnp.float32)}
    return adapters


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (L, *in, r) @ b (L, r, *out) -> (L, *in, *out) in float32."""
    layers, rank = a.shape[0], a.shape[-1]
    flat = jnp.matmul(a.reshape(layers, -1, rank).astype(jnp.float32), b.reshape(layers, rank, -1).astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    return flat.reshape(*a.shape[:-1], *b.shape[2:])


def merge(params: dict, adapters: dict, spec: LoraSpec) -> dict:
    """params with every adapted weight replaced by W + scale * a @ b in float32 (`Int8Weight`s and `Int4Weight`s are dequantised):
    for generation and export."""
    params = dequantize_tree(params)
    for stack, target in spec.pairs():
        path = weight_path(stack, target)
        a, b = adapters[stack][target]["a"], adapters[stack][target]["b"]
        w = get_path(params, path)
        merged = w.astype(jnp.float32) + spec.scale * delta(a, b)
        params = set_path(params, path, merged)
    return params


@struct.dataclass
class LoraWeight(ReadWhole):
    """A frozen weight `base` (an array, `Int8Weight` or `Int4Weight`) with its adapter `a` (*in, r), `b` (r, *out): the layers'
    `dense` computes x @ base + scale * (dropout(x) @ a) @ b without forming the merged weight. Stacked over layers
    (a leading axis on every array, `dropout_key` a key per layer), it is sliced per layer by the blocks' scan
    like any parameter."""

    base: Any
    a: jax.Array
    b: jax.Array
    dropout_key: jax.Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def reshape(self, k: int, n: int) -> LoraWeight:
        """As a (K, N) matrix: input axes folded into K, output axes into N (how the layers fold heads)."""
        return self.replace(base=self.base.reshape(k, n), a=self.a.reshape(k, -1), b=self.b.reshape(-1, n))

    def dense(self, x: jax.Array, dtype, out_dtype=None) -> jax.Array:
        base = self.base.dequantize(dtype) if is_quantized(self.base) else self.base.astype(dtype)
        y = jnp.dot(x, base, preferred_element_type=out_dtype)
        if self.dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(self.dropout_key, 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
        low = jnp.dot(jnp.dot(x, self.a.astype(dtype)), self.b.astype(dtype), preferred_element_type=out_dtype)
        return y + (self.scale * low).astype(y.dtype)


def adapted(params: dict, adapters: dict, spec: LoraSpec, dropout_key: jax.Array | None = None) -> dict:
    """params with every adapted (stacked) weight replaced by a `LoraWeight` over it; `dropout_key` (training
    only) draws `spec.dropout` masks, independent per weight, layer and token."""
    for i, (stack, target) in enumerate(spec.pairs()):
        path = weight_path(stack, target)
        w = get_path(params, path)
        keys = None
        if dropout_key is not None and spec.dropout > 0:
            keys = jax.random.split(jax.random.fold_in(dropout_key, i), w.shape[0])
        params = set_path(params, path, LoraWeight(w, adapters[stack][target]["a"], adapters[stack][target]["b"],
                                                   keys, spec.scale, spec.dropout))
    return params


# ---- int8 / int4 base weights (QLoRA) -------------------------------------------------------------------------

BASE_DTYPES = ("float32", "bfloat16", "int8", "int4")  # what the frozen base can be held in


def input_axes(target: str) -> tuple[int, ...]:
    """The input axes of a target's stacked weight (layers, *in, *out)."""
    return tuple(range(1, 1 + TARGETS[target][2]))


def dequantize_tree(params: dict, dtype=jnp.float32) -> dict:
    """Every quantized weight of a parameter tree -> a dense array (`dtype`; None = float32); other leaves as they
    are."""
    return jax.tree.map(lambda x: x.dequantize(dtype or jnp.float32) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def frozen_base(params: dict, base_dtype: str) -> dict:
    """The frozen base of LoRA training: "float32" as is; "bfloat16" every matrix in bfloat16 (norm scales stay
    float32); "int8" / "int4" the blocks' projection weights in int8 (`Int8Weight`) or 4-bit groups (`Int4Weight`),
    the other matrices in bfloat16."""
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"unknown LoRA base dtype {base_dtype!r}: use {', '.join(BASE_DTYPES)}")
    if base_dtype == "float32":
        return jax.tree.map(lambda x: x.astype(jnp.float32), params)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x.astype(jnp.float32), params)
    if base_dtype in ("int8", "int4"):
        quantize = quantize_int8 if base_dtype == "int8" else quantize_int4
        for stack in STACKS:
            for target in TARGETS:
                path = weight_path(stack, target)
                base = set_path(base, path, quantize(get_path(params, path), input_axes(target)))
    return base
