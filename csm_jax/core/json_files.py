"""Reading the small JSON files a checkpoint, config or adapter carries, with one error that names the file."""

from __future__ import annotations

import json
import os
from typing import Any

from csm_jax.core.errors import UserError


def read_json_object(path: str | os.PathLike, error: type[UserError], advice: str) -> dict[str, Any]:
    """The JSON object in `path`; a missing, unreadable or non-object file raises `error` ending in `advice`."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not text
        raise error(f"cannot read {path} ({type(e).__name__}: {e}); {advice}") from e
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object; {advice}")
    return value
