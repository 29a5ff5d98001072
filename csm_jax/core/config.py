"""Model configurations: presets and readers/writers for both checkpoint families' `config.json`.

Two families describe the same architecture differently:
* the original Sesame layout names torchtune "flavors" (`backbone_flavor: "llama-1B"`); torchtune always uses
  `head_dim = dim // num_heads` and Llama-3 RoPE scaling (32, 1, 4, 8192);
* transformers' `CsmConfig` spells every number out, with a nested `depth_decoder_config` and the RoPE scaling
  under `rope_parameters` (5.x) or `rope_scaling` + `rope_theta` (4.x).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from csm_jax.core.errors import UserError
from csm_jax.core.json_files import read_json_object


class ConfigError(UserError):
    """A config.json that cannot be read as a CSM configuration."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling. `(32, 1, 4, 8192)` and transformers' `(32, 0.125, 0.5, 1024)` are the same map."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def as_map(self) -> dict[str, float]:
        """What the frequencies depend on: the factor and the wavelengths where scaling begins and is complete."""
        return {"factor": self.factor, "unscaled_below": self.original_max_position / self.high_freq_factor,
                "scaled_above": self.original_max_position / self.low_freq_factor}


CACHE_LENGTHS = ("max_seq_len",)  # TransformerConfig fields that bound the cache, not the weights or the math
SHAPE_FIELDS = ("num_layers", "dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")  # ... that shape weights


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: RopeScaling | None = RopeScaling()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def num_params(self) -> int:
        d, hd = self.dim, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        return self.num_layers * (attn + 3 * d * self.mlp_dim + 2 * d) + d


@dataclasses.dataclass(frozen=True)
class CsmConfig:
    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    num_codebooks: int = 32

    @property
    def num_params(self) -> int:
        b, d, n, v = self.backbone.dim, self.decoder.dim, self.num_codebooks, self.audio_vocab_size
        heads = b * v + b * d + (n - 1) * d * v
        return (self.text_vocab_size + n * v) * b + heads + self.backbone.num_params + self.decoder.num_params

    # ---- our own serialisation -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, other: CsmConfig, *, shapes_only: bool = False) -> list[str]:
        """What makes `self` and `other` different models ("decoder.dim: 32 != 64"): every field that sets a
        weight's shape and, unless `shapes_only`, the model's numbers (norm eps, RoPE, with Llama-3 scalings
        compared as the map they make). Cache lengths (`max_seq_len`) are left out: they only bound how long a
        prompt may grow, and checkpoints disagree on them (transformers says 33 for the depth decoder)."""
        def fields(config: CsmConfig) -> dict[str, Any]:
            flat = {}
            for field in dataclasses.fields(config):
                value = getattr(config, field.name)
                if not isinstance(value, TransformerConfig):
                    flat[field.name] = value
                    continue
                for name in (f.name for f in dataclasses.fields(value)):
                    if name in CACHE_LENGTHS or (shapes_only and name not in SHAPE_FIELDS):
                        continue
                    number = getattr(value, name)
                    flat[f"{field.name}.{name}"] = number.as_map() if isinstance(number, RopeScaling) else number
            return flat

        mine, theirs = fields(self), fields(other)
        return [f"{k}: {mine[k]} != {theirs[k]}" for k in mine if mine[k] != theirs[k]]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CsmConfig:
        def stack(s: dict) -> TransformerConfig:
            s = dict(s)
            if s.get("rope_scaling") is not None:
                s["rope_scaling"] = RopeScaling(**s["rope_scaling"])
            return TransformerConfig(**s)

        return cls(backbone=stack(d["backbone"]), decoder=stack(d["decoder"]),
                   **{k: v for k, v in d.items() if k not in ("backbone", "decoder")})

    # ---- transformers' CsmConfig -----------------------------------------------------------------------------

    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> CsmConfig:
        dd = d.get("depth_decoder_config") or {}
        try:
            return cls(backbone=_stack_from_transformers(d, default_max_len=2048),
                       decoder=_stack_from_transformers(dd, default_max_len=33),
                       text_vocab_size=d.get("text_vocab_size", 128_256),
                       audio_vocab_size=d.get("vocab_size", 2051),
                       num_codebooks=d.get("num_codebooks", 32))
        except KeyError as e:
            raise ConfigError(f"transformers CSM config.json lacks the field {e}") from None

    def to_transformers(self) -> dict[str, Any]:
        """A `config.json` that transformers' `CsmConfig` reads (the codec sub-config is left to its default)."""
        b, d = self.backbone, self.decoder
        out = {
            "architectures": ["CsmForConditionalGeneration"], "model_type": "csm",
            **_stack_to_transformers(b),
            "text_vocab_size": self.text_vocab_size, "vocab_size": self.audio_vocab_size,
            "num_codebooks": self.num_codebooks, "tie_codebooks_embeddings": True,
            "depth_decoder_config": {
                "model_type": "csm_depth_decoder_model", **_stack_to_transformers(d),
                "backbone_hidden_size": b.dim, "vocab_size": self.audio_vocab_size,
                "num_codebooks": self.num_codebooks,
            },
        }
        return out

    # ---- the original Sesame config.json -----------------------------------------------------------------------

    @classmethod
    def from_original(cls, d: dict[str, Any]) -> CsmConfig:
        """Reads `{backbone_flavor, decoder_flavor, text_vocab_size, audio_vocab_size, audio_num_codebooks}`.

        A flavor is a name from `ORIGINAL_FLAVORS` or, for fine-tunes with other sizes, a dict of torchtune's
        `llama3_2` arguments (num_layers, num_heads, num_kv_heads, embed_dim, intermediate_dim, max_seq_len, ...).
        """
        try:
            return cls(backbone=_flavor(d["backbone_flavor"]), decoder=_flavor(d["decoder_flavor"]),
                       text_vocab_size=d.get("text_vocab_size", 128_256),
                       audio_vocab_size=d.get("audio_vocab_size", 2051),
                       num_codebooks=d.get("audio_num_codebooks", 32))
        except KeyError as e:
            raise ConfigError(f"original CSM config.json lacks the field {e}") from None

    def to_original(self) -> dict[str, Any]:
        return {"backbone_flavor": _flavor_name_or_dict(self.backbone),
                "decoder_flavor": _flavor_name_or_dict(self.decoder),
                "text_vocab_size": self.text_vocab_size, "audio_vocab_size": self.audio_vocab_size,
                "audio_num_codebooks": self.num_codebooks}

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> CsmConfig:
        """Reads any of the three config.json families (ours, transformers', original), telling them apart."""
        d = read_json_object(path, ConfigError, "give a CSM config.json or a preset name such as csm_1b")
        if "backbone" in d and "decoder" in d:
            return cls.from_dict(d)
        if "backbone_flavor" in d:
            return cls.from_original(d)
        if d.get("model_type") == "csm" or "depth_decoder_config" in d:
            return cls.from_transformers(d)
        raise ConfigError(f"{path} is neither a transformers CSM config (model_type 'csm'), an original Sesame "
                          f"config (backbone_flavor/decoder_flavor) nor a csm-jax config (backbone/decoder)")


def _rope_from_transformers(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    base = params.get("rope_theta", d.get("rope_theta", 500_000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(base), None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope_type {kind!r}: CSM uses 'llama3' (or no scaling)")
    return float(base), RopeScaling(
        factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position=int(params["original_max_position_embeddings"]))


def _stack_from_transformers(d: dict[str, Any], default_max_len: int) -> TransformerConfig:
    base, scaling = _rope_from_transformers(d)
    heads = d["num_attention_heads"]
    return TransformerConfig(
        num_layers=d["num_hidden_layers"], dim=d["hidden_size"], num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, mlp_dim=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", default_max_len), norm_eps=d.get("rms_norm_eps", 1e-5),
        rope_base=base, rope_scaling=scaling)


def _stack_to_transformers(s: TransformerConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": s.rope_base}
    if s.rope_scaling is not None:
        r = s.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": s.rope_base, "factor": r.factor,
                "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position}
    return {"num_hidden_layers": s.num_layers, "hidden_size": s.dim, "num_attention_heads": s.num_heads,
            "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim, "intermediate_size": s.mlp_dim,
            "max_position_embeddings": s.max_seq_len, "rms_norm_eps": s.norm_eps, "hidden_act": "silu",
            "rope_parameters": rope}


def _torchtune_llama3_2(num_layers, num_heads, num_kv_heads, embed_dim, intermediate_dim, max_seq_len=2048,
                        norm_eps=1e-5, rope_base=500_000.0, scale_factor=32, **_ignored) -> TransformerConfig:
    """Mirrors `torchtune.models.llama3_2.llama3_2`: head_dim = embed_dim // num_heads, Llama-3 scaling (f, 1, 4, 8192)."""
    return TransformerConfig(num_layers=num_layers, dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             head_dim=embed_dim // num_heads, mlp_dim=intermediate_dim, max_seq_len=max_seq_len,
                             norm_eps=norm_eps, rope_base=float(rope_base),
                             rope_scaling=RopeScaling(factor=float(scale_factor)))


ORIGINAL_FLAVORS: dict[str, TransformerConfig] = {
    "llama-1B": _torchtune_llama3_2(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048,
                                    intermediate_dim=8192),
    "llama-100M": _torchtune_llama3_2(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=1024,
                                      intermediate_dim=8192),
}


def _flavor(spec: str | dict[str, Any]) -> TransformerConfig:
    if isinstance(spec, dict):
        return _torchtune_llama3_2(**spec)
    if spec not in ORIGINAL_FLAVORS:
        raise ConfigError(f"unknown flavor {spec!r}; known: {sorted(ORIGINAL_FLAVORS)} (or give a dict of torchtune "
                          f"llama3_2 arguments)")
    return ORIGINAL_FLAVORS[spec]


def _flavor_name_or_dict(s: TransformerConfig) -> str | dict[str, Any]:
    for name, flavor in ORIGINAL_FLAVORS.items():
        if flavor == s:
            return name
    r = s.rope_scaling
    if s.head_dim * s.num_heads != s.dim or r is None or (r.low_freq_factor, r.high_freq_factor,
                                                          r.original_max_position) != (1.0, 4.0, 8192):
        raise ConfigError("this model cannot be written in the original layout: torchtune's llama3_2 needs "
                          "head_dim == dim // num_heads and Llama-3 rope scaling (factor, 1, 4, 8192); "
                          "export it in the transformers layout instead")
    return {"num_layers": s.num_layers, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
            "embed_dim": s.dim, "intermediate_dim": s.mlp_dim, "max_seq_len": s.max_seq_len,
            "norm_eps": s.norm_eps, "rope_base": s.rope_base, "scale_factor": r.factor}


# ---- presets: the one registry (names for the command line, `train`'s `model=` and `--config`) ------------------

PRESETS: dict[str, Callable[[], CsmConfig]] = {}


def _preset(fn: Callable[[], CsmConfig]) -> Callable[[], CsmConfig]:
    PRESETS[fn.__name__] = fn
    return fn


def preset(name: str) -> CsmConfig:
    """The preset config called `name` (one of `PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


@_preset
def csm_1b() -> CsmConfig:
    """Sesame's CSM-1B: Llama-3.2-1B backbone, 100 M depth decoder."""
    return CsmConfig(backbone=ORIGINAL_FLAVORS["llama-1B"], decoder=ORIGINAL_FLAVORS["llama-100M"])


@_preset
def small() -> CsmConfig:
    """Backbone 4 x 256, decoder 2 x 128 with CSM's vocabularies (62.6 M parameters, 32.8 M of them the text
    embedding): the dispatch-bound benchmark config."""
    return CsmConfig(
        backbone=TransformerConfig(num_layers=4, dim=256, num_heads=8, num_kv_heads=2, head_dim=32, mlp_dim=1024,
                                   max_seq_len=2048),
        decoder=TransformerConfig(num_layers=2, dim=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=512,
                                  max_seq_len=32))


@_preset
def tiny() -> CsmConfig:
    """A few-layer model with GQA and real Llama-3 rope scaling, for tests."""
    return CsmConfig(
        backbone=TransformerConfig(num_layers=3, dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                                   max_seq_len=256),
        decoder=TransformerConfig(num_layers=2, dim=32, num_heads=4, num_kv_heads=1, head_dim=8, mlp_dim=96,
                                  max_seq_len=32),
        text_vocab_size=300, audio_vocab_size=67, num_codebooks=32)


@_preset
def tiny_full_vocab() -> CsmConfig:
    """`tiny` with CSM's real vocabularies (Llama-3 text ids, 2051 audio ids): fits real tokenizers and Mimi."""
    return dataclasses.replace(tiny(), text_vocab_size=128_256, audio_vocab_size=2051)


@_preset
def tiny_odd() -> CsmConfig:
    """Unlike `tiny` in every dimension: head_dim != dim/heads, MHA in one stack, other vocab and codebooks."""
    return CsmConfig(
        backbone=TransformerConfig(num_layers=2, dim=48, num_heads=3, num_kv_heads=3, head_dim=24, mlp_dim=80,
                                   max_seq_len=128, norm_eps=1e-6, rope_base=10_000.0),
        decoder=TransformerConfig(num_layers=3, dim=40, num_heads=6, num_kv_heads=2, head_dim=4, mlp_dim=64,
                                  max_seq_len=16, rope_scaling=None),
        text_vocab_size=150, audio_vocab_size=35, num_codebooks=8)
