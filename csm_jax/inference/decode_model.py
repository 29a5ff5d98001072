"""The decode layout: `Csm`'s parameters rearranged for generating one frame at a time.

Training and checkpoints keep every transformer's layers stacked on a leading axis (`Transformer`, run with
`lax.scan`). A decode step would then copy each layer's weights out of the stacked arrays on every step (measured
on CPU: 5 GB/s instead of 22+ GB/s), so decoding uses `DecodeCsm`: one array per layer (an unrolled loop), q|k|v
and gate|up side by side in one array each (one small product instead of three and two), and one audio-head array
per codebook (picked with a switch instead of sliced). `decode_params` is the pure map from the stacked parameter
tree to this one; `decode_model` applies it to a `Csm`, optionally with int8 or int4 weight-only quantization
(`csm_jax.inference.quantize`, which the layout's `matmul` understands); `load_decode_model` reads a checkpoint
straight into a quantized layout, one stacked weight at a time.

CPU kernels (`csm_jax.inference.kernels`) are a switch of the decode layout, resolved once when it is built:
`cpu_kernels=True/False` forces them on or off, else the environment variable `CSM_JAX_CPU_KERNELS` (1/0), else,
when JAX's default backend is the CPU, each product kind takes whichever of kernel and XLA measured faster on this
CPU (`csm_jax.inference.products.faster_kinds`). Nothing else of the model uses them.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from csm_jax.core.config import CsmConfig, TransformerConfig
from csm_jax.core.layers import Attention, Block, DType, KVCache, MLP, Matmul, RMSNorm, dense, layer_inputs, param
from csm_jax.core.model import Csm
from csm_jax.core.quant import concat_columns
from csm_jax.inference import kernels
from csm_jax.inference.products import decode_dense, faster_kinds, for_kernels, kernel_matmul, KINDS
from csm_jax.inference.quantize import QUANTIZED, matrix_quantizer, product_kinds, quantize_heads
from csm_jax.io.checkpoint import abstract_model, check_stored_shapes, read_config, restore_part

KERNELS_ENV = "CSM_JAX_CPU_KERNELS"


class FusedAttention(Attention):
    """`Attention` with wq, wk and wv side by side in one (D, (H + 2K) * hd) array."""

    def init_qkv(self, d: int, rngs: nnx.Rngs, param_dtype: DType) -> None:
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = param(rngs, (d, width), ("embed", None), param_dtype)

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.matmul(x, self.wqkv[...], self.dtype)
        q, k, v = jnp.split(qkv, [q_width, q_width + kv_width], axis=-1)
        return tuple(a.reshape(*x.shape[:-1], -1, self.head_dim) for a in (q, k, v))


class FusedMLP(MLP):
    """`MLP` with w_gate and w_up side by side in one (D, 2F) array."""

    def init_gate_up(self, dim: int, hidden: int, rngs: nnx.Rngs, param_dtype: DType) -> None:
        self.w_gate_up = param(rngs, (dim, 2 * hidden), ("embed", None), param_dtype)

    def gate_up(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return tuple(jnp.split(self.matmul(x, self.w_gate_up[...], self.dtype), 2, axis=-1))


class LayerList(nnx.Module):
    """A transformer as a Python loop over per-layer blocks; its KV cache holds one array per layer (`KVCache`
    with `per_layer`), so a step updates each layer's cache in place."""

    def __init__(self, cfg: TransformerConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 matmul: Matmul = dense):
        self.cfg, self.dtype = cfg, dtype
        self.blocks = nnx.List([Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul=matmul,
                                      attention=FusedAttention, mlp=FusedMLP) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache | None = None,
                 cache_index: jax.Array | int = 0, mask: jax.Array | None = None):
        """As `Transformer.__call__`."""
        x = x.astype(self.dtype)
        inputs, seg = layer_inputs(positions, segment_ids, cache, cache_index, mask)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, new_kv = block(x, inputs, None if cache is None else (cache.k[i], cache.v[i]), cache_index)
            if cache is not None:
                ks.append(new_kv[0])
                vs.append(new_kv[1])
        return self.norm(x), None if cache is None else KVCache(k=tuple(ks), v=tuple(vs), segment_ids=seg)


class DecodeCsm(Csm):
    """`Csm` in the decode layout (see the module docstring); `cpu_kernels` says whether the CPU kernels are on
    (the sampler's kernel), `kernel_kinds` which product kinds go through them."""

    def __init__(self, config: CsmConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs, cpu_kernels: bool = False, kernel_kinds: frozenset[str] = frozenset()):
        self.cpu_kernels = cpu_kernels
        self.kernel_kinds = frozenset(kernel_kinds) if cpu_kernels else frozenset()
        matmul = functools.partial(kernel_matmul, kinds=self.kernel_kinds) if self.kernel_kinds else decode_dense
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul=matmul, stack=LayerList)

    def make_audio_head(self, rngs: nnx.Rngs, param_dtype: DType):
        c = self.config
        return nnx.List([param(rngs, (c.decoder.dim, c.audio_vocab_size), ("embed", "vocab"), param_dtype)
                         for _ in range(c.num_codebooks - 1)])

    def audio_logits(self, hidden: jax.Array, codebook: jax.Array | int) -> jax.Array:
        if isinstance(codebook, int):  # a constant codebook (the unrolled depth loop): its head directly
            return self.matmul(hidden, self.audio_head[codebook - 1][...], self.dtype, jnp.float32)
        branches = [lambda h, w=head: self.matmul(h, w[...], self.dtype, jnp.float32) for head in self.audio_head]
        return jax.lax.switch(jnp.asarray(codebook) - 1, branches, hidden)

    def depth_logits(self, hidden: jax.Array, codes: jax.Array) -> jax.Array:
        raise NotImplementedError("teacher-forced depth logits use the stacked layout: call them on `Csm`")

    def new_cache(self, stack: str, batch: int, length: int) -> KVCache:
        """An empty per-layer KV cache for "backbone" or "decoder"."""
        cfg = self.config.backbone if stack == "backbone" else self.config.decoder
        return KVCache.empty(cfg, batch, length, self.dtype, per_layer=True)


def kernel_switch(requested: bool | None = None) -> bool | None:
    """The kernel switch: `requested`, else $CSM_JAX_CPU_KERNELS (1/0), else None (measure per product kind)."""
    if requested is None:
        env = os.environ.get(KERNELS_ENV, "").strip().lower()
        if env in ("1", "true", "on", "yes"):
            requested = True
        elif env in ("0", "false", "off", "no"):
            requested = False
        elif env:
            raise ValueError(f"{KERNELS_ENV}={env!r} is not a switch; set it to 1 or 0 (or unset it)")
    return requested


def use_cpu_kernels(requested: bool | None = None) -> bool:
    """Whether the kernels are on: `kernel_switch` not off, JAX running on the CPU, and the kernels built on this
    machine (`kernels.available`, which warns once when they do not)."""
    return kernel_switch(requested) is not False and jax.default_backend() == "cpu" and kernels.available()


def kernel_kinds(requested: bool | None = None, kinds=KINDS, params: dict | None = None) -> frozenset[str]:
    """The product kinds among `kinds` that go through the kernels: all when the switch is on, none when it is
    off or the kernels are not on (`use_cpu_kernels`), else those measured faster here (`faster_kinds`, over the
    products of `params`, `decode_params`' tree, if given)."""
    if not use_cpu_kernels(requested):
        return frozenset()
    return frozenset(kinds) if kernel_switch(requested) else faster_kinds(kinds, params)


MATRICES = {"attn": ("wq", "wk", "wv", "wo"), "mlp": ("w_gate", "w_up", "w_down")}  # a layer's, by module
MODULE_OF = {w: m for m, names in MATRICES.items() for w in names}


def layer_matrix(name: str, w: jax.Array) -> jax.Array:
    """One layer's weight `name` as the (K, N) matrix a decode step multiplies by: heads folded into the columns
    (wq, wk, wv) or into the rows (wo)."""
    return w.reshape(-1, w.shape[-1]) if name == "wo" else w.reshape(w.shape[0], -1)


def _fused_stack(matrix, norms: dict, num_layers: int) -> dict:
    """A transformer's per-layer, fused pure dict of `LayerList`. matrix(name, i): layer i's weight `name` as
    `layer_matrix` gives it, plain or quantized (q|k|v and gate|up are joined after quantizing: each column is
    quantized alone, so it is the same); norms: the stacked norms ({"attn_norm", "mlp_norm"}) and "norm"."""
    def layer(i: int) -> dict:
        return {"attn_norm": {"scale": norms["attn_norm"]["scale"][i]},
                "attn": {"wqkv": concat_columns([matrix(w, i) for w in ("wq", "wk", "wv")]), "wo": matrix("wo", i)},
                "mlp_norm": {"scale": norms["mlp_norm"]["scale"][i]},
                "mlp": {"w_gate_up": concat_columns([matrix(w, i) for w in ("w_gate", "w_up")]),
                        "w_down": matrix("w_down", i)}}

    return {"blocks": {i: jax.block_until_ready(layer(i)) for i in range(num_layers)}, "norm": norms["norm"]}


def _unfused(params: dict, config: CsmConfig) -> dict:
    """What the decode layout keeps of `Csm`'s tree as it is (embeddings, heads): all but the stacks, with one
    audio-head array per codebook."""
    out = {k: v for k, v in params.items() if k not in ("backbone", "decoder", "audio_head")}
    out["audio_head"] = {i: params["audio_head"][i] for i in range(config.num_codebooks - 1)}
    return out


def decode_params(params: dict, config: CsmConfig, quantize=None) -> dict:
    """The pure map from `Csm`'s parameter tree (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`) to
    `DecodeCsm`'s; `quantize` maps each layer matrix as it is sliced (one float32 matrix at a time)."""
    prepare = quantize or (lambda w: w)
    out = _unfused(params, config)
    for stack, cfg in (("backbone", config.backbone), ("decoder", config.decoder)):
        blocks = params[stack]["blocks"]

        def matrix(name: str, i: int, blocks=blocks):
            return prepare(layer_matrix(name, blocks[MODULE_OF[name]][name][i]))

        out[stack] = _fused_stack(matrix, {**blocks, "norm": params[stack]["norm"]}, cfg.num_layers)
    return out


def _check_weights_dtype(weights_dtype: str | None) -> None:
    if weights_dtype not in (None, *QUANTIZED):
        raise ValueError(f"weights_dtype={weights_dtype!r}: the decode layout quantizes only to "
                         f"{' or '.join(map(repr, QUANTIZED))} (other dtypes are chosen when the model is loaded, "
                         f"with param_dtype)")


def decode_model(model: Csm, cpu_kernels: bool | None = None, weights_dtype: str | None = None) -> DecodeCsm:
    """`model` in the decode layout (new arrays for what is rearranged; drop `model` afterwards to free them).

    weights_dtype: None keeps the model's weights; "int8" or "int4" quantizes the matrices
    (`csm_jax.inference.quantize`, one layer matrix at a time as the layout is made). Measuring whether the kernels
    pay (`kernel_kinds`) happens here, once per CPU.
    """
    _check_weights_dtype(weights_dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    quantize = matrix_quantizer(weights_dtype) if weights_dtype else None
    return _built(model.config, model.dtype, model.text_embeddings[...].dtype,
                  decode_params(params, model.config, quantize), weights_dtype, cpu_kernels)


def load_decode_model(path: str | os.PathLike, weights_dtype: str, dtype: DType = jnp.float32,
                      cpu_kernels: bool | None = None) -> DecodeCsm:
    """A checkpoint (`csm_jax.io.checkpoint`) read straight into the decode layout with "int8" or "int4" weights:
    as `decode_model(load_model(path), cpu_kernels, weights_dtype)`, but reading one stacked weight at a time and
    quantizing its layers before the next, so the float32 model is never whole in memory (CSM-1B int4: a peak near
    its float32 embeddings and one stacked weight, not the whole float32 model)."""
    if weights_dtype not in QUANTIZED:
        raise ValueError(f"weights_dtype={weights_dtype!r}: load_decode_model quantizes to "
                         f"{' or '.join(map(repr, QUANTIZED))}; load other dtypes with load_model")
    config = read_config(path)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param)))
    check_stored_shapes(path, target)
    rest = {k: v for k, v in target.items() if k not in ("backbone", "decoder")}
    for stack in ("backbone", "decoder"):
        blocks = target[stack]["blocks"]  # attn and mlp hold only matrices
        rest[stack] = {"norm": target[stack]["norm"],  # the stacked norms
                       "blocks": {m: sub for m, sub in blocks.items() if m not in MATRICES}}
    params = jax.tree.map(jnp.asarray, restore_part(path, rest))
    quantize = matrix_quantizer(weights_dtype)
    out = _unfused(params, config)
    for stack, cfg in (("backbone", config.backbone), ("decoder", config.decoder)):
        layers = {}
        for m, names in MATRICES.items():
            for w in names:
                stacked = restore_part(path, {stack: {"blocks": {m: {w: target[stack]["blocks"][m][w]}}}})
                stacked = stacked[stack]["blocks"][m][w]
                layers[w] = [jax.block_until_ready(quantize(layer_matrix(w, jnp.asarray(stacked[i]))))
                             for i in range(cfg.num_layers)]
                del stacked

        def taken(name: str, i: int, layers=layers):  # each quantized part dropped once it is joined
            part, layers[name][i] = layers[name][i], None
            return part

        blocks = params[stack]["blocks"]
        out[stack] = _fused_stack(taken, {**blocks, "norm": params[stack]["norm"]}, cfg.num_layers)
    return _built(config, dtype, jnp.float32, out, weights_dtype, cpu_kernels)


def _built(config: CsmConfig, dtype: DType, param_dtype: DType, params: dict, weights_dtype: str | None,
           cpu_kernels: bool | None) -> DecodeCsm:
    """The `DecodeCsm` over `decode_params`' tree (its stacks quantized already if `weights_dtype`; the heads are
    quantized here), with its kernel kinds measured."""
    if weights_dtype is not None:
        params = quantize_heads(params, weights_dtype)
    use = use_cpu_kernels(cpu_kernels)
    used = product_kinds(weights_dtype or jnp.dtype(param_dtype).name)
    kinds = kernel_kinds(cpu_kernels, used, params) if use and jnp.dtype(dtype) == jnp.float32 else frozenset()
    params = for_kernels(params, kinds)
    abstract = nnx.eval_shape(lambda: DecodeCsm(config, dtype=dtype, param_dtype=param_dtype,
                                                rngs=nnx.Rngs(0), cpu_kernels=use, kernel_kinds=kinds))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
