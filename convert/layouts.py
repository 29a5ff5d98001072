"""The two PyTorch checkpoint layouts of CSM as data: key templates -> paths in the NNX state + named transforms.

A `Rule` names one PyTorch tensor by a key template (`{layer}` stands for the layer index of a stacked
transformer), the path of the `Csm` parameter it fills (a tuple into `nnx.to_pure_dict(state)`), and the name
of the transform between the two. Templates work both ways: compiled to a regex they match source keys on
import, formatted they give the key names on export.

Transforms go from PyTorch's `nn.Linear` convention (weight (out, in)) to ours (kernels (in, out), attention
split per head) and back. The original (torchtune) layout rotates interleaved pairs (2i, 2i+1) of each q/k
head; our layers rotate halves (i, i + hd/2) like transformers, so original q/k rows are permuted per head,
exactly as transformers' own CSM conversion script does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from csm_jax.core.config import CsmConfig, TransformerConfig
from csm_jax.core.errors import UserError

Path = tuple[str, ...]

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}  # the dtypes we convert to
CODEC_PREFIX = "codec_model."  # transformers checkpoints carry the Mimi codec under this prefix ...
CODEC_DIR = "codec"  # ... which a csm-jax checkpoint keeps in this subdirectory


class LayoutError(UserError):
    """Tensor names that match no known CSM checkpoint layout."""


# ---- transforms ----------------------------------------------------------------------------------------------

def _interleaved_to_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a (heads*hd, in) q/k weight: per head, pairs (2i, 2i+1) -> halves (i, i + hd/2)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _half_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


@dataclasses.dataclass(frozen=True)
class Transform:
    """to_nnx(torch_tensor, stack) -> our array; to_torch(our_array, stack) -> torch tensor; both numpy.

    `torch_shape(our_shape)` gives the shape the source tensor must have (for validation before reading it).
    """

    to_nnx: Callable[[np.ndarray, TransformerConfig | None], np.ndarray]
    to_torch: Callable[[np.ndarray, TransformerConfig | None], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


def _heads_in(interleaved: bool, kv: bool) -> Transform:
    """q/k/v projections: torch (N*hd, D) <-> ours (D, N, hd), N = heads (q) or kv heads (k, v)."""

    def heads(s: TransformerConfig) -> int:
        return s.num_kv_heads if kv else s.num_heads

    def to_nnx(w, s):
        if interleaved:
            w = _interleaved_to_half(w, heads(s))
        return w.T.reshape(w.shape[1], heads(s), s.head_dim)

    def to_torch(x, s):
        w = x.reshape(x.shape[0], -1).T
        return _half_to_interleaved(w, heads(s)) if interleaved else w

    return Transform(to_nnx, to_torch, lambda shape: (shape[1] * shape[2], shape[0]))


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda w, s: w, lambda x, s: x, lambda shape: shape),
    "transpose": Transform(lambda w, s: w.T, lambda x, s: x.T, lambda shape: shape[::-1]),
    "q_heads": _heads_in(interleaved=False, kv=False),
    "kv_heads": _heads_in(interleaved=False, kv=True),
    "q_heads_interleaved": _heads_in(interleaved=True, kv=False),
    "kv_heads_interleaved": _heads_in(interleaved=True, kv=True),
    # o_proj / output_proj: torch (D, H*hd) <-> ours (H, hd, D)
    "out_heads": Transform(lambda w, s: w.T.reshape(s.num_heads, s.head_dim, w.shape[0]),
                           lambda x, s: x.reshape(-1, x.shape[-1]).T,
                           lambda shape: (shape[2], shape[0] * shape[1])),
}


# ---- rules and layouts ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """One PyTorch tensor. `stack` ("backbone"/"decoder") marks a per-layer tensor of that transformer: it fills
    row `layer` of the stacked parameter at `target` and its transform sees that stack's config."""

    template: str
    target: Path
    transform: str
    stack: str | None = None

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.template).replace(re.escape("{layer}"), r"(?P<layer>\d+)") + "$")

    def key(self, layer: int | None = None) -> str:
        return self.template.format(layer=layer)


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    rules: tuple[Rule, ...]
    ignored: tuple[str, ...]  # regexes of tensors that are not CSM parameters (buffers, the codec)
    # Keys that hold a second copy of an already mapped tensor (transformers ties the depth decoder's embedding
    # table to the backbone's audio embeddings): alias -> the rule's template it must equal.
    tied: dict[str, str] = dataclasses.field(default_factory=dict)
    signature: str = ""  # a key prefix only this layout has

    def match(self, key: str) -> tuple[Rule, int | None] | None:
        for rule in self.rules:
            m = rule.pattern.match(key)
            if m:
                return rule, int(m["layer"]) if rule.stack else None
        return None

    def is_ignored(self, key: str) -> bool:
        return any(re.match(p, key) for p in self.ignored)

    def expected_keys(self, config: CsmConfig) -> Iterable[tuple[str, Rule, int | None]]:
        """Every tensor a complete checkpoint of `config` has (tied aliases excluded)."""
        for rule in self.rules:
            if rule.stack is None:
                yield rule.key(), rule, None
            else:
                for layer in range(stack_config(config, rule.stack).num_layers):
                    yield rule.key(layer), rule, layer


def stack_config(config: CsmConfig, stack: str | None) -> TransformerConfig | None:
    return {"backbone": config.backbone, "decoder": config.decoder, None: None}[stack]


def _stack_rules(prefix: str, stack: str, per_layer: dict[str, tuple[str, str]], norm: str) -> list[Rule]:
    """Rules of one transformer stack: `per_layer` maps a key suffix to (path inside a block, transform)."""
    rules = [Rule(f"{prefix}.layers.{{layer}}.{suffix}", (stack, "blocks", *path.split(".")), transform, stack)
             for suffix, (path, transform) in per_layer.items()]
    return [*rules, Rule(f"{prefix}.{norm}", (stack, "norm", "scale"), "identity")]


_ORIGINAL_LAYER = {
    "sa_norm.scale": ("attn_norm.scale", "identity"),
    "attn.q_proj.weight": ("attn.wq", "q_heads_interleaved"),
    "attn.k_proj.weight": ("attn.wk", "kv_heads_interleaved"),
    "attn.v_proj.weight": ("attn.wv", "kv_heads"),
    "attn.output_proj.weight": ("attn.wo", "out_heads"),
    "mlp_norm.scale": ("mlp_norm.scale", "identity"),
    "mlp.w1.weight": ("mlp.w_gate", "transpose"),
    "mlp.w2.weight": ("mlp.w_down", "transpose"),
    "mlp.w3.weight": ("mlp.w_up", "transpose"),
}


_TRANSFORMERS_LAYER = {
    "input_layernorm.weight": ("attn_norm.scale", "identity"),
    "self_attn.q_proj.weight": ("attn.wq", "q_heads"),
    "self_attn.k_proj.weight": ("attn.wk", "kv_heads"),
    "self_attn.v_proj.weight": ("attn.wv", "kv_heads"),
    "self_attn.o_proj.weight": ("attn.wo", "out_heads"),
    "post_attention_layernorm.weight": ("mlp_norm.scale", "identity"),
    "mlp.gate_proj.weight": ("mlp.w_gate", "transpose"),
    "mlp.down_proj.weight": ("mlp.w_down", "transpose"),
    "mlp.up_proj.weight": ("mlp.w_up", "transpose"),
}

ORIGINAL = Layout(
    name="original",
    rules=(
        Rule("text_embeddings.weight", ("text_embeddings",), "identity"),
        Rule("audio_embeddings.weight", ("audio_embeddings",), "identity"),
        *_stack_rules("backbone", "backbone", _ORIGINAL_LAYER, norm="norm.scale"),
        Rule("codebook0_head.weight", ("codebook0_head",), "transpose"),
        Rule("projection.weight", ("projection",), "transpose"),
        *_stack_rules("decoder", "decoder", _ORIGINAL_LAYER, norm="norm.scale"),
        Rule("audio_head", ("audio_head",), "identity"),
    ),
    # setup_caches() registers causal masks and torchtune KV caches; older torchtune saved RoPE caches
    ignored=(r"(backbone|decoder)_causal_mask$", r".*\.kv_cache\.", r".*\.pos_embeddings\.(cache|theta)$"),
    signature="backbone.layers.",
)

TRANSFORMERS = Layout(
    name="transformers",
    rules=(
        Rule("embed_text_tokens.weight", ("text_embeddings",), "identity"),
        Rule("backbone_model.embed_tokens.embed_audio_tokens.weight", ("audio_embeddings",), "identity"),
        *_stack_rules("backbone_model", "backbone", _TRANSFORMERS_LAYER, norm="norm.weight"),
        Rule("lm_head.weight", ("codebook0_head",), "transpose"),
        Rule("depth_decoder.model.inputs_embeds_projector.weight", ("projection",), "transpose"),
        *_stack_rules("depth_decoder.model", "decoder", _TRANSFORMERS_LAYER, norm="norm.weight"),
        Rule("depth_decoder.codebooks_head.weight", ("audio_head",), "identity"),
    ),
    # the Mimi codec is kept apart (see convert.codec); the offsets buffer is arange(n) * vocab
    ignored=(r"codec_model\.", r".*audio_tokens_offsets$"),
    tied={"depth_decoder.model.embed_tokens.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight"},
    signature="backbone_model.",
)

LAYOUTS = {layout.name: layout for layout in (ORIGINAL, TRANSFORMERS)}


def detect_layout(keys: Iterable[str]) -> Layout:
    keys = list(keys)
    for layout in LAYOUTS.values():
        if any(k.startswith(layout.signature) for k in keys):
            return layout
    sample = ", ".join(sorted(keys)[:8]) or "(no tensors at all)"
    raise LayoutError(
        f"these tensors are not a CSM checkpoint in any known layout: expected keys starting with "
        f"'backbone.layers.' (Sesame's original layout) or 'backbone_model.' (transformers' "
        f"CsmForConditionalGeneration); found {sample}{' ...' if len(keys) > 8 else ''}. If the names carry an "
        f"extra prefix (e.g. 'model.' or '_orig_mod.'), strip it from the state dict and save it again.")


def param_at(tree: dict, path: tuple[str, ...]):
    """The leaf of a nested parameter dict at `path` (a rule's target)."""
    for name in path:
        tree = tree[name]
    return tree


def target_shape(targets: dict, rule: Rule) -> tuple[int, ...]:
    """Shape of the parameter one tensor fills (one layer's slice for a stacked parameter)."""
    shape = param_at(targets, rule.target).shape
    return tuple(shape[1:]) if rule.stack else tuple(shape)
