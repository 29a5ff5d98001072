"""The record format of prepared shards (`python -m train.prepare`): one utterance's key, text, Emilia metadata and
Mimi codes (num_codebooks, T) as int16, in an npz, one record each in ArrayRecord files."""

from __future__ import annotations

import io
import json

import numpy as np

SUFFIX = ".array_record"


def serialize(key: str, text: str, meta: dict, codes: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), text=np.array(text), meta=np.array(json.dumps(meta)),
             codes=codes.astype(np.int16))
    return buffer.getvalue()


def deserialize(record: bytes) -> dict:
    """A prepared record -> the tar pipeline's encoded example {"key", "text", "codes", "meta"}."""
    with np.load(io.BytesIO(record)) as z:
        return {"key": str(z["key"]), "text": str(z["text"]), "meta": json.loads(str(z["meta"])),
                "codes": z["codes"].astype(np.int32)}


def key_of(record: bytes) -> str:
    """A prepared record's key alone (the codes are not read)."""
    with np.load(io.BytesIO(record)) as z:
        return str(z["key"])
