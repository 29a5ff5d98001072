"""Reading PyTorch checkpoints one tensor at a time, finding them (local or on the hub), writing safetensors.

Readers memory-map their files and hand out one tensor at a time as numpy (bfloat16 as `ml_dtypes.bfloat16`),
so a converter that copies each tensor into its destination and drops it holds about one copy of the model.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Callable, Iterable, Protocol

import ml_dtypes
import numpy as np

from csm_jax.core.errors import UserError
from csm_jax.io.hub import looks_like_hub_id

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "ckpt.pt")
HUB_PATTERNS = ["config.json", "model.safetensors.index.json", "*.safetensors", "ckpt.pt"]


class ConversionError(UserError):
    """A checkpoint that cannot be converted; the message lists every problem found and how to fix it."""


class TensorReader(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> np.dtype: ...
    def read(self, key: str) -> np.ndarray: ...


# ---- locating the checkpoint -----------------------------------------------------------------------------------

def resolve_source(src: str | os.PathLike) -> Path:
    """A local file or directory as is; otherwise `src` is taken for a hub repo id and downloaded (config and
    weights only) with `huggingface_hub.snapshot_download`, whose local directory is then read like any other."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(src):
        raise ConversionError(f"{src} does not exist. Give a checkpoint directory, a weights file "
                              f"({', '.join(WEIGHT_FILES)}) or a hub repo id such as sesame/csm-1b.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(src), allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean the same thing here
        raise ConversionError(f"could not download {src} from the Hugging Face hub ({type(e).__name__}: {e}). "
                              f"For gated repos such as sesame/csm-1b accept the licence on the hub and log in "
                              f"(`hf auth login`), or download the files yourself and pass the directory.") from e


def find_weights(path: Path) -> Path:
    """The weights file of a checkpoint directory (sharded index, single safetensors, or ckpt.pt)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConversionError(f"{path} is neither a regular file nor a directory; give a checkpoint directory or its "
                              f"weights file ({', '.join(WEIGHT_FILES)}).")
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
        if (path / name).exists():
            raise ConversionError(f"{path / name} is not a regular file; replace it by the weights file itself.")
    if (path / "metadata.json").is_file() and (path / "params").is_dir():
        raise ConversionError(f"{path} is already a csm-jax checkpoint; to write it in a PyTorch layout pass "
                              f"--to transformers or --to original.")
    try:
        found = sorted(p.name for p in path.iterdir())[:10]
    except OSError as e:
        raise ConversionError(f"cannot read the directory {path} ({e.strerror}); give a checkpoint directory you can "
                              f"read.") from e
    raise ConversionError(f"{path} holds no CSM weights: expected one of {', '.join(WEIGHT_FILES)}; found "
                          f"{found or 'an empty directory'}.")


def open_tensors(weights: Path) -> TensorReader:
    name = weights.name
    if name.endswith(".index.json"):
        return SafetensorsReader.sharded(weights)
    if name.endswith(".safetensors"):
        return SafetensorsReader({weights: None})
    if name.endswith((".pt", ".pth", ".bin")):
        return TorchPickleReader(weights)
    raise ConversionError(f"{weights}: unknown weights format; expected .safetensors, "
                          f"model.safetensors.index.json or a torch .pt file.")


# ---- readers -----------------------------------------------------------------------------------------------------

def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as a numpy array sharing its memory (bfloat16 -> ml_dtypes.bfloat16)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _unreadable(path: Path, error: Exception) -> ConversionError:
    if isinstance(error, PermissionError):
        return ConversionError(f"cannot read {path}: permission denied; make it readable or copy it somewhere you "
                               f"can read it.")
    return ConversionError(f"could not read {path}: {type(error).__name__}: {error}. The file is truncated or "
                           f"corrupt (an interrupted download?); download or copy it again.")


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


class SafetensorsReader:
    """One or more safetensors files (a sharded checkpoint is one reader over all its shards)."""

    def __init__(self, files: dict[Path, list[str] | None]):
        from safetensors import safe_open

        self._handles, self._file_of = {}, {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:
                raise _unreadable(path, e) from e
            self._handles[path] = handle
            for key in handle.keys():
                self._file_of[key] = path

    @classmethod
    def sharded(cls, index: Path) -> SafetensorsReader:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise _unreadable(index, e) from e
        shards = sorted({index.parent / name for name in weight_map.values()})
        missing = [p.name for p in shards if not p.exists()]
        if missing:
            raise ConversionError(f"{index} names shards that are not there: {', '.join(missing)}. Download "
                                  f"every shard into {index.parent}.")
        return cls(dict.fromkeys(shards))

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(_SAFETENSORS_DTYPES[self._handles[self._file_of[key]].get_slice(key).get_dtype()])

    def read(self, key: str) -> np.ndarray:
        path = self._file_of[key]
        try:
            return torch_to_numpy(self._handles[path].get_tensor(key))
        except Exception as e:
            raise _unreadable(path, e) from e


class StateDictReader:
    """A TensorReader over a torch state dict in memory, on any device."""

    def __init__(self, state: dict):
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return torch_to_numpy(self._state[key].reshape(-1)[:0].detach().cpu()).dtype

    def read(self, key: str) -> np.ndarray:
        return torch_to_numpy(self._state[key].detach().cpu())


class TorchPickleReader(StateDictReader):
    """A flat state dict saved with `torch.save` (Sesame's first release, `ckpt.pt`), memory-mapped."""

    def __init__(self, path: Path):
        import torch

        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # saved in torch's legacy format, which cannot be memory-mapped
                if "_use_new_zipfile_serialization" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only load failed" not in str(e).lower():
                raise _unreadable(path, e) from e
            reason = next((line for line in str(e).splitlines() if "GLOBAL" in line), "it is not plain tensors")
            raise ConversionError(
                f"{path} was refused as unsafe: besides tensors, its pickle would build other objects or run code "
                f"when loaded ({reason.strip()}). Nothing from it was executed. If you trust its origin, re-save "
                f"its tensors as safetensors (safetensors.torch.save_file(torch.load(path, weights_only=False), "
                f"'model.safetensors')) and convert that file.") from e
        except Exception as e:
            raise _unreadable(path, e) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{path} is not a flat state dict of tensors (got {type(state).__name__}); save "
                                  f"`model.state_dict()` itself with torch.save.")
        super().__init__(state)


# ---- writing safetensors -------------------------------------------------------------------------------------

_SAFETENSORS_CODES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}

TensorSpec = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_safetensors(path: Path, tensors: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file producing one tensor at a time: (key, shape, dtype, make_array) in file order.

    The header needs every shape up front; the data is then streamed, so memory holds one tensor at a time.
    """
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for key, shape, dtype, _ in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _SAFETENSORS_CODES[np.dtype(dtype)], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype, make in tensors:
            array = np.ascontiguousarray(make())
            assert array.shape == tuple(shape) and array.dtype == np.dtype(dtype), (key, array.shape, array.dtype)
            f.write(array.reshape(-1).view(np.uint8).data)
