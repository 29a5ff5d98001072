"""csm-jax Orbax checkpoint -> PyTorch layouts: transformers (`CsmForConditionalGeneration.from_pretrained`) or
Sesame's original (`config.json` with flavors + `model.safetensors` in torchtune names).

The safetensors file is streamed one tensor at a time from the restored parameters. Export inverts import
exactly, so PyTorch -> Orbax -> PyTorch in the same layout and dtype gives back the same tensors, bit for bit,
under the same keys: the tied audio-embedding keys the source had are recorded in metadata.json, and the Mimi
codec kept in `codec/` is written back under `codec_model.*`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from convert.io import ConversionError, SafetensorsReader, TensorSpec, write_safetensors
from convert.layouts import (CODEC_DIR, CODEC_PREFIX, DTYPES, LAYOUTS, TRANSFORMS, Layout, Rule, param_at,
                             stack_config, target_shape)
from csm_jax.io.checkpoint import CheckpointError, abstract_model, load_params, read_config, read_metadata
from csm_jax.io.output_dir import atomic_directory, check_output, mark_export
from csm_jax.core.config import CsmConfig

STORED_DTYPES = {**DTYPES, "float16": np.dtype(np.float16)}


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, layout: str,
                      dtype: str = "keep", *, overwrite: bool = False) -> Path:
    """Writes `out/model.safetensors` and `out/config.json` in `layout` ("transformers" or "original"), and the
    marker that lets a later export replace it.

    dtype: "keep" (the checkpoint's) or a dtype name to cast to. overwrite: replace an earlier csm-jax output at
    `out` (anything else there is never replaced). Nothing is left at `out` if anything fails.
    """
    checkpoint = Path(checkpoint).expanduser()
    check_output(out, overwrite=overwrite, sources=[checkpoint])  # before any reading
    config, metadata = read_config(checkpoint), read_metadata(checkpoint)
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; export to one of {', '.join(LAYOUTS)}.")
    config_json = _config_json(config, LAYOUTS[layout], checkpoint)  # fails early if the layout cannot hold it
    stored = STORED_DTYPES.get(metadata.get("dtype"))
    if stored is None:
        raise CheckpointError(f"{checkpoint / 'metadata.json'} gives the dtype {metadata.get('dtype')!r}, not one of "
                              f"{', '.join(STORED_DTYPES)}; the checkpoint is damaged: convert or save it again.")
    target = stored if dtype == "keep" else DTYPES.get(dtype)
    if target is None:
        raise ConversionError(f"unknown dtype {dtype!r}; use keep, {' or '.join(DTYPES)}.")
    params = nnx.to_pure_dict(load_params(checkpoint, abstract_model(config, dtype=stored, param_dtype=stored)))
    tensors = _layout_tensors(params, config, LAYOUTS[layout], metadata.get("tied_keys") or [], target)
    if layout == "transformers":
        tensors += _codec_tensors(checkpoint)
    needed = sum(math.prod(shape) * np.dtype(kind).itemsize for _, shape, kind, _ in tensors)
    with atomic_directory(out, overwrite=overwrite, sources=[checkpoint], needed_bytes=needed) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors)
        if layout == "transformers":  # Sesame's ModelArgs takes exactly the five original fields
            config_json["dtype"] = target.name
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        mark_export(tmp, layout=layout, dtype=target.name, source=str(checkpoint))
    return Path(out)


def _config_json(config: CsmConfig, layout: Layout, checkpoint: Path) -> dict[str, Any]:
    if layout.name == "original":
        return config.to_original()
    out = config.to_transformers()
    codec_config = checkpoint / CODEC_DIR / "config.json"
    if codec_config.exists():
        out["codec_config"] = json.loads(codec_config.read_text())
    return out


def _torch_tensor(params: dict, rule: Rule, layer: int | None, config: CsmConfig, dtype: np.dtype) -> np.ndarray:
    value = np.asarray(param_at(params, rule.target))
    value = value if layer is None else value[layer]
    return TRANSFORMS[rule.transform].to_torch(value, stack_config(config, rule.stack)).astype(dtype, copy=False)


def _layout_tensors(params: dict, config: CsmConfig, layout: Layout, tied_keys: list[str],
                    dtype: np.dtype) -> list[TensorSpec]:
    """Every tensor of `layout` in order; a tied pair is written under the keys in `tied_keys` (default both)."""
    tensors, makers = [], {}
    for key, rule, layer in layout.expected_keys(config):
        shape = TRANSFORMS[rule.transform].torch_shape(target_shape(params, rule))
        makers[key] = (shape, functools.partial(_torch_tensor, params, rule, layer, config, dtype))
        tensors.append(key)
    for alias, primary in layout.tied.items():
        wanted = [k for k in (primary, alias) if k in tied_keys] or [primary, alias]
        if primary not in wanted:
            tensors.remove(primary)
        if alias in wanted:
            tensors.insert(tensors.index(primary) + 1 if primary in tensors else len(tensors), alias)
            makers[alias] = makers[primary]
    return [(key, makers[key][0], dtype, makers[key][1]) for key in tensors]


def _codec_tensors(checkpoint: Path) -> list[TensorSpec]:
    path = checkpoint / CODEC_DIR / "model.safetensors"
    if not path.exists():
        return []
    reader = SafetensorsReader({path: None})
    return [(CODEC_PREFIX + k, reader.shape(k), reader.dtype(k), functools.partial(reader.read, k))
            for k in reader.keys()]
