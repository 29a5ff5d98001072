"""LoRA adapter files, in PEFT's format for transformers' `CsmForConditionalGeneration`, and merging them into a
model's parameters.

An adapter directory holds `adapter_config.json` (PEFT's LoraConfig) and `adapter_model.safetensors` with PEFT's
key names, e.g. `base_model.model.backbone_model.layers.3.self_attn.q_proj.lora_A.weight` (A: (r, in),
B: (out, r), torch's nn.Linear convention), so `PeftModel.from_pretrained(hf_csm, path)` loads what csm-jax
trains, and csm-jax loads adapters trained with PEFT. Adapters written here also carry, in the safetensors
header, the CsmConfig they were trained for and the base they started from; PEFT ignores both.

In memory an adapter is stacked like the weights it adapts (see `csm_jax.core.lora`); only the q/k/v/o and
gate/up/down projections of the backbone and the depth decoder can be adapted. LoRA on Mimi's layers (PEFT wraps
them too when `target_modules` is a plain list of names) is skipped with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from csm_jax.core.config import CsmConfig
from csm_jax.core.errors import UserError
from csm_jax.core.json_files import read_json_object
from csm_jax.core.lora import STACKS, TARGETS, LoraSpec, get_path, merge, set_path, split_shape, weight_path
from csm_jax.io.checkpoint import abstract_model, atomic_directory
from csm_jax.io.output_dir import mark_export

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_STACKS = {"backbone": "backbone_model", "decoder": "depth_decoder.model"}  # transformers' module prefixes
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_KEY = re.compile(r"base_model\.model\.(?P<prefix>backbone_model|depth_decoder\.model)\.layers\.(?P<layer>\d+)\."
                  r"(?P<module>self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.lora_(?P<ab>[AB])\.weight")
_CODEC = re.compile(r"base_model\.model\.codec_model\.")


class AdapterError(UserError):
    """An adapter file that is not a LoRA adapter of CSM, or does not fit the base model."""


@dataclasses.dataclass
class Adapter:
    spec: LoraSpec
    weights: dict  # {stack: {target: {"a": (L, *in, r), "b": (L, r, *out)}}}, float32 numpy
    config: CsmConfig | None = None  # the model it was trained for (None: written by PEFT, unknown)
    metadata: dict = dataclasses.field(default_factory=dict)


def weight_shapes(config: CsmConfig) -> dict:
    """The model's pure dict of parameter shapes (ShapeDtypeStructs), without allocating it."""
    return nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))


def target_regex(spec: LoraSpec) -> str:
    """PEFT `target_modules` naming exactly the adapted projections of the chosen stacks (never the codec)."""
    prefixes = "|".join(re.escape(PEFT_STACKS[s]) for s in spec.stacks)
    modules = "|".join(re.escape(PEFT_MODULES[t]) for t in spec.targets)
    return rf"({prefixes})\.layers\.\d+\.({modules})"


def peft_config(spec: LoraSpec, base: str | None = None) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": target_regex(spec),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": spec.rslora, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
            "alpha_pattern": {}, "inference_mode": True}


def save_adapter(path: str | os.PathLike, weights: dict, spec: LoraSpec, config: CsmConfig,
                 metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes `weights` ({stack: {target: {"a", "b"}}}, stacked) as a PEFT adapter directory, atomically; an earlier
    adapter of ours at `path` is replaced only with `overwrite`."""
    from safetensors.numpy import save_file

    tensors = {}
    for stack, target in spec.pairs():
        a = np.asarray(jax.device_get(weights[stack][target]["a"]), np.float32)
        b = np.asarray(jax.device_get(weights[stack][target]["b"]), np.float32)
        for layer in range(a.shape[0]):
            stem = f"base_model.model.{PEFT_STACKS[stack]}.layers.{layer}.{PEFT_MODULES[target]}"
            tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[layer].reshape(-1, spec.rank).T)
            tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[layer].reshape(spec.rank, -1).T)
    header = {"format": "csm-jax-lora", "csm_config": json.dumps(config.to_dict()),
              **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=header)
        mark_export(tmp, kind="adapter")
        base = (metadata or {}).get("base", {}).get("path")
        base = base if base and Path(base).is_dir() else None
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(spec, base), indent=2) + "\n")
    return Path(path)


def _read_peft_config(path: Path) -> dict:
    if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise AdapterError(f"{path} is not a LoRA adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                           f"(what training writes to WORKDIR/adapter, or PEFT's save_pretrained)")
    cfg = read_json_object(path / CONFIG_FILE, AdapterError, "export or download the adapter again")
    unsupported = [name for name, bad in [
        (f"peft_type {cfg.get('peft_type')!r}", cfg.get("peft_type") != "LORA"),
        ("use_dora", cfg.get("use_dora")), (f"bias {cfg.get('bias')!r}", cfg.get("bias", "none") != "none"),
        ("fan_in_fan_out", cfg.get("fan_in_fan_out")), ("rank_pattern", cfg.get("rank_pattern")),
        ("alpha_pattern", cfg.get("alpha_pattern")), ("modules_to_save", cfg.get("modules_to_save"))] if bad]
    if unsupported:
        raise AdapterError(f"{path}: this adapter uses {', '.join(unsupported)}, which csm-jax does not load; only "
                           f"plain LoRA (one rank and alpha, no bias, no extra trained modules) is supported")
    return cfg


def load_adapter(path: str | os.PathLike, config: CsmConfig) -> Adapter:
    """Reads an adapter directory (ours or PEFT's) for a base model of `config`; checks that it fits."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = _read_peft_config(path)
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="flax") as f:
            header = f.metadata() or {}
            tensors = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"cannot read {path / WEIGHTS_FILE} ({e}); it is damaged or incomplete: export or "
                           f"download the adapter again") from None
    trained_for = CsmConfig.from_dict(json.loads(header["csm_config"])) if "csm_config" in header else None
    diff = trained_for.differences(config) if trained_for is not None else []
    if diff:
        raise AdapterError(f"adapter {path} was trained for another model than the base checkpoint (adapter != "
                           f"base: {'; '.join(diff)}); load it on the base it was trained from")
    codec = sorted(k for k in tensors if _CODEC.match(k))
    if codec:
        log.warning("adapter %s: skipped %d LoRA tensors of the Mimi codec (codec_model.*); csm-jax adapts only "
                    "the backbone and the depth decoder", path, len(codec))
    unknown = sorted(k for k in tensors if not _KEY.fullmatch(k) and not _CODEC.match(k))
    if unknown:
        raise AdapterError(f"adapter {path} has tensors csm-jax cannot place: {', '.join(unknown[:4])}"
                           f"{' ...' if len(unknown) > 4 else ''}; only LoRA on the backbone's and depth decoder's "
                           f"q/k/v/o_proj and gate/up/down_proj is supported")
    found: dict[tuple[str, str], dict[tuple[int, str], np.ndarray]] = {}
    stack_of = {v: k for k, v in PEFT_STACKS.items()}
    target_of = {v: k for k, v in PEFT_MODULES.items()}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        if m:
            found.setdefault((stack_of[m["prefix"]], target_of[m["module"]]), {})[(int(m["layer"]), m["ab"])] = value
    if not found:
        raise AdapterError(f"adapter {path} has no LoRA tensors for the backbone or the depth decoder")
    rank = int(cfg["r"])
    spec = LoraSpec(rank=rank, alpha=float(cfg.get("lora_alpha", rank)), dropout=float(cfg.get("lora_dropout", 0.0)),
                    targets=tuple(t for t in TARGETS if any(t == tt for _, tt in found)),
                    stacks=tuple(s for s in STACKS if any(s == ss for ss, _ in found)),
                    rslora=bool(cfg.get("use_rslora", False)))
    shapes = weight_shapes(config)
    weights: dict = {}
    for stack, target in spec.pairs():
        layers, ins, outs = split_shape(get_path(shapes, weight_path(stack, target)).shape, target)
        # zeros where the adapter leaves a layer or a projection out: a zero B adds nothing
        a = np.zeros((*layers, *ins, rank), np.float32)
        b = np.zeros((*layers, rank, *outs), np.float32)
        for (layer, ab), value in found.get((stack, target), {}).items():
            stem = f"{PEFT_STACKS[stack]}.layers.{layer}.{PEFT_MODULES[target]}.lora_{ab}"
            want = (rank, math.prod(ins)) if ab == "A" else (math.prod(outs), rank)
            if layer >= layers[0] or value.shape != want:
                where = (f"layer {layer} of {layers[0]}" if layer >= layers[0] else f"shape {value.shape}")
                raise AdapterError(f"adapter {path} does not fit the base model: {stem} has {where}, but the base "
                                   f"needs {want} in layers 0..{layers[0] - 1} (rank {rank}); use the base "
                                   f"checkpoint the adapter was trained on")
            if ab == "A":
                a[layer] = value.T.reshape(*ins, rank)
            else:
                b[layer] = value.T.reshape(rank, *outs)
        weights.setdefault(stack, {})[target] = {"a": a, "b": b}
    metadata = {k: json.loads(v) for k, v in header.items() if k not in ("format", "csm_config")}
    return Adapter(spec, weights, trained_for, metadata)


def merged_params(params: dict, adapter: Adapter) -> dict:
    """A model's pure parameter dict with `adapter` merged in, every weight keeping its dtype."""
    merged = merge(params, adapter.weights, adapter.spec)
    for stack, target in adapter.spec.pairs():
        p = weight_path(stack, target)
        merged = set_path(merged, p, get_path(merged, p).astype(get_path(params, p).dtype))
    return merged
