"""Hub ids and csm-jax's cache directory, and turning a checkpoint argument into a csm-jax checkpoint directory.

The one place that decides what looks like a Hugging Face hub id and where the cache lives ($CSM_JAX_CACHE,
default ~/.cache/csm_jax: converted checkpoints and compiled CPU kernels). PyTorch checkpoints are converted once
into the cache by a converter plugin: a callable `(source, out, dtype=...)` registered under the entry-point group
`csm_jax.converters` (the `convert` package of this project registers `convert.convert_to_orbax`), so that the
library never imports its own converter. A cached conversion is keyed by the resolved source path plus the size
and modification time of its files, so moved, relative or replaced weights never reuse a stale conversion.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Callable

from csm_jax.io.checkpoint import CheckpointError

log = logging.getLogger(__name__)

CACHE_ENV = "CSM_JAX_CACHE"
CONVERTER_GROUP = "csm_jax.converters"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# names that are files, never repos (repo names such as Llama-3.2-1B may contain dots)
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".json", ".jsonl", ".model", ".wav", ".flac", ".mp3",
                  ".ogg", ".tar", ".txt", ".csv", ".npz")

Converter = Callable[..., Path]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "csm_jax").expanduser()


def looks_like_hub_id(s: str | os.PathLike) -> bool:
    """`owner/name` that is not an existing local path and does not name a file."""
    s = str(s)
    return bool(_HUB_ID.match(s)) and not s.lower().endswith(_FILE_SUFFIXES) and not Path(s).exists()


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a csm-jax checkpoint directory (params/ and metadata.json)."""
    path = Path(path)
    return (path / "metadata.json").is_file() and (path / "params").is_dir()


def source_fingerprint(source: str | os.PathLike) -> str:
    """A short hash of a checkpoint source: its resolved path and the name, size and modification time of every
    file it consists of (a weights file and the config.json beside it, or a directory's top-level files). A hub id
    is its own fingerprint (the hub client keeps its own cache by revision)."""
    path = Path(source).expanduser()
    if not path.exists():
        return hashlib.sha256(str(source).encode()).hexdigest()[:16]
    path = path.resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path, path.parent / "config.json"]
    digest = hashlib.sha256(str(path).encode())
    for f in files:
        if f.is_file():
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def find_converter() -> Converter | None:
    """The registered converter plugin, if any."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=CONVERTER_GROUP):
        return entry.load()
    return None


def resolve_checkpoint(checkpoint: str | os.PathLike, dtype: str = "float32", cache: str | os.PathLike | None = None,
                       converter: Converter | None = None) -> Path:
    """A csm-jax checkpoint directory for `checkpoint`: itself when it is one; otherwise its conversion to `dtype`
    (a dtype name) in the cache, made once with `converter` (default: the registered plugin)."""
    path = Path(checkpoint).expanduser()
    if is_checkpoint(path):
        return path
    if not path.exists() and not looks_like_hub_id(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; give a csm-jax checkpoint directory, a "
                              f"PyTorch checkpoint (directory, model.safetensors or ckpt.pt) or a hub id such as "
                              f"sesame/csm-1b")
    if path.is_dir() and ((path / "params").exists() or (path / "metadata.json").exists()):
        missing = [name for name, there in (("params/", (path / "params").is_dir()),
                                             ("metadata.json", (path / "metadata.json").is_file())) if not there]
        raise CheckpointError(f"{path} looks like a csm-jax checkpoint but lacks {' and '.join(missing)} (an "
                              f"interrupted copy?); move it away and convert the source again: python -m convert "
                              f"SRC {path}")
    slug = re.sub(r"[^\w.-]+", "-", path.resolve().name if path.exists() else str(checkpoint)).strip("-")
    target = Path(cache or cache_dir()) / f"{slug}-{source_fingerprint(checkpoint)}-{dtype}"
    if is_checkpoint(target):
        log.warning("using the cached conversion of %s at %s", checkpoint, target)
        return target
    converter = converter or find_converter()
    if converter is None:
        raise CheckpointError(f"{checkpoint} is a PyTorch checkpoint and no converter is installed; install csm-jax "
                              f"with its converter (pip install -e .) or convert it first: "
                              f"python -m convert {checkpoint} DIR, then pass DIR")
    log.warning("converting %s into %s (once)", checkpoint, target)
    converter(str(checkpoint), target, dtype=dtype)
    return target
