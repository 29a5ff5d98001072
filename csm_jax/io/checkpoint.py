"""Inference checkpoints: an Orbax PyTree of the model parameters beside `config.json` and `metadata.json`.

Layout of a checkpoint directory:
    params/         Orbax StandardCheckpointer output (the nnx.Param state of `Csm`)
    config.json     `CsmConfig.to_dict()`
    metadata.json   {"format": "csm-jax", "dtype": ..., plus whatever the writer adds (source, layout, ...)}
    codec/          optional: the Mimi codec a transformers checkpoint carried (metadata "codec" names it)
A checkpoint is written into a temporary sibling directory and renamed into place, so an interrupted write
never leaves a directory that `load_model` would accept; an existing directory is replaced only under the rule of
`csm_jax.io.output_dir` (an earlier output of ours, and only when asked to overwrite).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from csm_jax.core.config import CsmConfig
from csm_jax.core.errors import CheckpointError
from csm_jax.core.json_files import read_json_object
from csm_jax.core.model import Csm
from csm_jax.io.output_dir import FORMAT, atomic_directory, signals_deferred

# metadata of a converted checkpoint that the models trained from it keep: the directory of the Mimi codec that a
# transformers checkpoint carried (copied along, so an export back to transformers has the real codec) and the tied
# embedding keys the source had (so that export writes the same keys)
CARRIED = ("codec", "tied_keys")


def abstract_model(config: CsmConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Csm:
    """A `Csm` whose parameters are `jax.ShapeDtypeStruct`s: a skeleton to restore or convert into."""
    return nnx.eval_shape(lambda: Csm(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def write_params(directory: Path, params: nnx.State, concurrent_gb: int = 96) -> None:
    """Writes an nnx.Param state (arrays, jax or numpy) as an Orbax PyTree under `directory / "params"`.

    concurrent_gb: how many GB Orbax may write at once (its default is 96; it must fit the largest array).
    Orbax copies what it writes, so a small value lowers the peak (the converter passes its largest array's size).
    The calling process writes alone, also in a multi-process run (there the caller gathers the arrays first).
    """
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                active_processes={jax.process_index()})
    with signals_deferred(), ocp.StandardCheckpointer(save_concurrent_gb=concurrent_gb, multiprocessing_options=alone) as ckptr:
        ckptr.save(directory / "params", nnx.to_pure_dict(params))


def save_model(model: Csm, path: str | os.PathLike, metadata: dict[str, Any] | None = None, *,
               overwrite: bool = False, base: str | os.PathLike | None = None) -> Path:
    """Writes `model`'s parameters, config and metadata to `path` atomically. Returns the path.

    overwrite: replace an earlier csm-jax checkpoint or export at `path` (anything else there is never replaced).
    base: the checkpoint `model` was trained from, whose `CARRIED` metadata (and codec directory) the new one keeps.
    """
    params = nnx.state(model, nnx.Param)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
    carried = {k: v for k, v in read_metadata(base).items() if k in CARRIED} if base is not None else {}
    codec = Path(base) / carried["codec"] if carried.get("codec") else None
    needed = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
    needed += sum(f.stat().st_size for f in codec.rglob("*") if f.is_file()) if codec else 0
    with atomic_directory(path, overwrite=overwrite, needed_bytes=needed) as tmp:
        write_params(tmp, params)
        if codec:
            shutil.copytree(codec, tmp / carried["codec"])
        write_config_and_metadata(tmp, model.config, {"dtype": "/".join(sorted(dtypes)), **carried,
                                                      **(metadata or {})})
    return Path(path)


def write_config_and_metadata(directory: Path, config: CsmConfig, metadata: dict[str, Any]) -> None:
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (directory / "metadata.json").write_text(json.dumps({"format": FORMAT, **metadata}, indent=2) + "\n")


def read_config(path: str | os.PathLike) -> CsmConfig:
    path = Path(path)
    missing = [name for name in ("config.json", "metadata.json", "params") if not (path / name).exists()]
    if missing and (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is a LoRA adapter, not a model checkpoint; it is already in PEFT's format. "
                              f"Use it with its base checkpoint (python -m csm_jax.generate --checkpoint BASE "
                              f"--adapter {path}, or PEFT over CsmForConditionalGeneration); convert BASE instead")
    if missing:
        target = path if not path.exists() or (path.is_dir() and not any(path.iterdir())) else "NEW_DIR"
        raise CheckpointError(f"{path} is not a csm-jax checkpoint: it lacks {', '.join(missing)}. Convert a "
                              f"PyTorch checkpoint first: python -m convert SRC {target}")
    config = _read_json(path / "config.json")
    try:
        return CsmConfig.from_dict(config)
    except (TypeError, KeyError, ValueError) as e:  # fields missing, unknown or out of range
        raise CheckpointError(f"{path / 'config.json'} is not a csm-jax model config ({type(e).__name__}: {e}); the "
                              f"checkpoint is damaged: convert or save it again.") from None


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    return _read_json(Path(path) / "metadata.json")


def _read_json(file: Path) -> dict[str, Any]:
    return read_json_object(file, CheckpointError, "the checkpoint is damaged: convert or save it again.")


def _restored(path: str | os.PathLike, restore) -> Any:
    """restore(params_dir)'s result, with a damaged checkpoint reported as a CheckpointError."""
    params = Path(path).absolute() / "params"
    try:
        return restore(params)
    except (OSError, ValueError, KeyError) as e:  # missing or truncated files, or shapes config.json does not give
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot restore the parameters in {params} ({type(e).__name__}: {reason}); the "
                              f"checkpoint is damaged or its config.json does not belong to it: convert or save it "
                              f"again.") from e


def load_params(path: str | os.PathLike, abstract: Csm) -> nnx.State:
    """Restores the parameter state into the shapes, dtypes (cast on restore) and shardings of `abstract`."""
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          target)

    def restore(params: Path):
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(params, target)

    state = nnx.state(abstract, nnx.Param)
    nnx.replace_by_pure_dict(state, _restored(path, restore))
    return state


def check_stored_shapes(path: str | os.PathLike, target: dict) -> None:
    """Raises a CheckpointError that lists every leaf of `target` (a pure parameter dict of arrays or
    `jax.ShapeDtypeStruct`s) that the checkpoint's parameters lack or hold in another shape (read from Orbax's
    metadata, before any array is read)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = _restored(path, lambda params: ckptr.metadata(params))
    stored = {jax.tree_util.keystr(k): tuple(x.shape)
              for k, x in jax.tree_util.tree_leaves_with_path(getattr(metadata, "item_metadata", None) or {})}
    wanted = {jax.tree_util.keystr(k): tuple(x.shape) for k, x in jax.tree_util.tree_leaves_with_path(target)}
    wrong = [f"{k}: missing" if k not in stored else f"{k}: {stored[k]} stored, {shape} expected"
             for k, shape in wanted.items() if stored.get(k) != shape]
    if wrong:
        raise CheckpointError(f"the parameters in {Path(path) / 'params'} do not match its config.json ({len(wrong)} "
                              f"wrong: {'; '.join(wrong)}); the checkpoint is damaged: convert or save it again.")


def restore_part(path: str | os.PathLike, target: dict) -> dict:
    """Some of a checkpoint's parameters, as host (numpy) arrays: `target` is a subtree of its pure parameter dict
    with `jax.ShapeDtypeStruct` leaves (dtypes cast on restore; shapes as stored: `check_stored_shapes` first), so
    that a large checkpoint can be read a part at a time."""
    def restore(params: Path):
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(params, args=args)

    return _restored(path, restore)


def load_model(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any | None = None) -> Csm:
    """Loads a checkpoint written by the converter (or `save_model`, or training's export).

    dtype: the compute dtype (float32 or bfloat16); param_dtype: the stored dtype of the parameters in memory
    (default: the same as `dtype`). Norms, softmax and logits stay float32 whatever the dtypes.
    """
    config = read_config(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, load_params(path, abstract))
