"""PyTorch checkpoint (original or transformers layout) -> csm-jax Orbax checkpoint, streaming.

Every parameter of the `Csm` skeleton gets one preallocated numpy buffer in the target dtype (stacked layers
included); tensors are read one at a time, transformed and copied into their slice, so the converter holds one
copy of the model plus one tensor. Orbax then makes its own transient copy while writing (measured on CSM-1B
float32: 12.7 GB peak anonymous memory for 6.2 GB of parameters; benchmarks/bench_convert.py). Everything is validated before the first tensor is read, and all problems are reported
together. The Mimi codec that transformers checkpoints carry under `codec_model.*` is not part of CSM: it is
copied unchanged into `codec/` (model.safetensors + config.json, loadable with `MimiModel.from_pretrained`) so
that an export back to the transformers layout is complete.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from convert.io import (ConversionError, TensorReader, find_weights, open_tensors, resolve_source,
                        write_safetensors)
from convert.layouts import (CODEC_DIR, CODEC_PREFIX, DTYPES, TRANSFORMS, Layout, Rule, detect_layout, param_at,
                             stack_config, target_shape)
from csm_jax.io.checkpoint import abstract_model, write_config_and_metadata, write_params
from csm_jax.io.output_dir import atomic_directory, check_output
from csm_jax.core.config import PRESETS, CsmConfig, preset



def read_source_config(source_dir: Path, config: str | os.PathLike | None) -> CsmConfig:
    """`config` (a config.json of any family, or a preset name such as csm_1b) or the config.json beside the
    weights."""
    if config is not None and str(config) in PRESETS and not Path(config).exists():
        return preset(str(config))
    path = Path(config) if config is not None else source_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json at {path}. Pass --config with a config.json of either family or a "
                              f"preset name (csm_1b for Sesame's first release, whose ckpt.pt came without one).")
    return CsmConfig.from_json_file(path)


def plan(reader: TensorReader, layout: Layout, config: CsmConfig) -> list[tuple[str, Rule, int | None]]:
    """The (source key, rule, layer) to copy, after checking every key and shape; raises one report otherwise."""
    targets = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    keys = set(reader.keys())
    aliases = {alias: primary for alias, primary in layout.tied.items() if alias in keys}
    steps, missing, misshaped = [], [], []
    for key, rule, layer in layout.expected_keys(config):
        source = key if key in keys else next((a for a, p in aliases.items() if p == key), None)
        if source is None:
            missing.append(key)
            continue
        want = TRANSFORMS[rule.transform].torch_shape(target_shape(targets, rule))
        got = reader.shape(source)
        if got != want:
            misshaped.append(f"{source}: shape {got}, expected {want}")
        steps.append((source, rule, layer))
    used = {s for s, _, _ in steps} | set(aliases)
    unexpected = [_explain_unexpected(k, layout, config) for k in sorted(keys - used) if not layout.is_ignored(k)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
    if misshaped:
        problems.append(f"{len(misshaped)} tensor(s) with the wrong shape: {_listing(misshaped)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
    if problems:
        raise ConversionError(
            f"the checkpoint does not match its config ({layout.name} layout, backbone {config.backbone.num_layers}"
            f" layers x {config.backbone.dim}, decoder {config.decoder.num_layers} x {config.decoder.dim}, "
            f"{config.num_codebooks} codebooks):\n  - " + "\n  - ".join(problems) +
            "\nCheck that config.json belongs to these weights (or pass the right one with --config) and that no "
            "file is missing.")
    return steps


def _explain_unexpected(key: str, layout: Layout, config: CsmConfig) -> str:
    """A known per-layer name beyond the config's depth says the config is wrong, not the file."""
    match = layout.match(key)
    if match is None or match[0].stack is None:
        return key
    layers = stack_config(config, match[0].stack).num_layers
    return f"{key} (the config's {match[0].stack} has {layers} layers)"


def choose_dtype(reader: TensorReader, steps: list[tuple[str, Rule, int | None]], dtype: str) -> np.dtype:
    if dtype != "keep":
        if dtype not in DTYPES:
            raise ConversionError(f"unknown dtype {dtype!r}; use keep, {' or '.join(DTYPES)}.")
        return DTYPES[dtype]
    found = {reader.dtype(key) for key, _, _ in steps}
    if len(found) != 1 or not found <= {*DTYPES.values(), np.dtype(np.float16)}:
        raise ConversionError(f"the checkpoint's tensors have dtypes {sorted(d.name for d in found)}, so 'keep' is "
                              f"ambiguous; pass --dtype float32 or --dtype bfloat16.")
    return found.pop()


def check_tied(reader: TensorReader, layout: Layout) -> list[str]:
    """The tied keys the source has (an alias and its primary must hold equal values when both are there)."""
    keys = set(reader.keys())
    present = []
    for alias, primary in layout.tied.items():
        if alias in keys and primary in keys and not np.array_equal(reader.read(alias), reader.read(primary)):
            raise ConversionError(f"{alias} and {primary} should be one tied tensor but differ; this checkpoint "
                                  f"was not saved by CsmForConditionalGeneration. Keep one of them and save again.")
        present += [k for k in (primary, alias) if k in keys]
    return present


def fill_params(reader: TensorReader, steps: list[tuple[str, Rule, int | None]], config: CsmConfig,
                dtype: np.dtype) -> dict[str, Any]:
    """The pure dict of `Csm` parameters as numpy arrays of `dtype`, filled one source tensor at a time."""
    targets = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    params = jax.tree.map(lambda x: np.empty(x.shape, dtype), targets)
    for key, rule, layer in steps:
        value = TRANSFORMS[rule.transform].to_nnx(reader.read(key), stack_config(config, rule.stack))
        param_at(params, rule.target)[... if layer is None else layer] = value
    return params


def to_jax_one_by_one(tree: dict) -> dict:
    """Replaces each numpy leaf by a jax array, dropping the numpy buffer before the next one: Orbax writes jax
    arrays with far less extra memory than numpy ones (about 0.25 vs 1.7 times their size, measured)."""
    for name, value in tree.items():
        tree[name] = to_jax_one_by_one(value) if isinstance(value, dict) else jax.device_put(value)
    return tree


def copy_codec(reader: TensorReader, keys: list[str], source_config: Path, directory: Path) -> bool:
    """Copies the `codec_model.*` tensors `keys` (if any) to directory/codec as a standalone Mimi checkpoint.
    Returns whether there were any."""
    if not keys:
        return False
    codec = directory / CODEC_DIR
    codec.mkdir()
    write_safetensors(codec / "model.safetensors",
                      [(k[len(CODEC_PREFIX):], reader.shape(k), reader.dtype(k), functools.partial(reader.read, k))
                       for k in keys])
    codec_config = json.loads(source_config.read_text()).get("codec_config") if source_config.exists() else None
    if codec_config:
        (codec / "config.json").write_text(json.dumps(codec_config, indent=2) + "\n")
    return True


def convert_to_orbax(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "keep",
                     config: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
    """Converts a PyTorch CSM checkpoint (directory, weights file or hub repo id) into a csm-jax checkpoint.

    dtype: "keep" (the source's), "float32" or "bfloat16". config: a config.json or preset name overriding the
    one beside the weights. overwrite: replace an earlier csm-jax output at `out` (anything else there is never
    replaced). Nothing is left at `out` if anything fails.
    """
    given = [Path(p).expanduser() for p in (src, config) if p is not None and Path(p).expanduser().exists()]
    check_output(out, overwrite=overwrite, sources=given)  # before a download or any reading
    weights = find_weights(resolve_source(src))
    model_config = read_source_config(weights.parent, config)
    reader = open_tensors(weights)
    layout = detect_layout(reader.keys())
    steps = plan(reader, layout, model_config)
    target = choose_dtype(reader, steps, dtype)
    tied = check_tied(reader, layout)
    sources = [*given, weights.parent, weights]
    codec_keys = [k for k in reader.keys() if k.startswith(CODEC_PREFIX)]
    needed = (sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_model(model_config), nnx.Param)))
              * target.itemsize + sum(math.prod(reader.shape(k)) * reader.dtype(k).itemsize for k in codec_keys))
    check_output(out, overwrite=overwrite, sources=sources, needed_bytes=needed)
    params = fill_params(reader, steps, model_config, target)
    metadata = {"source": str(src), "layout": layout.name, "dtype": target.name,
                "source_dtype": "/".join(sorted({reader.dtype(k).name for k, _, _ in steps})), "tied_keys": tied}
    with atomic_directory(out, overwrite=overwrite, sources=sources, needed_bytes=needed) as tmp:
        state = nnx.state(abstract_model(model_config, dtype=target, param_dtype=target), nnx.Param)
        largest = max(x.nbytes for x in jax.tree.leaves(params))
        nnx.replace_by_pure_dict(state, to_jax_one_by_one(params))
        write_params(tmp, state, concurrent_gb=math.ceil(largest / 1e9))  # Orbax needs room for the largest
        metadata["codec"] = CODEC_DIR if copy_codec(reader, codec_keys, weights.parent / "config.json", tmp) else None
        write_config_and_metadata(tmp, model_config, metadata)
    return Path(out)


def _listing(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
