"""The original generator's audible-quality watermark (silentcipher, 44.1 kHz model, Sesame's public key).

Optional: install the `watermark` extra (`pip install silentcipher`). Without it generation runs unmarked and
says so once.
"""

from __future__ import annotations

import sys

import numpy as np

from csm_jax.core.codec import SAMPLE_RATE
from csm_jax.io.audio import resample

CSM_1B_KEY = [212, 211, 146, 56, 201]  # the key Sesame's generator marks all CSM-1B output with
WATERMARK_RATE = 44_100


def load_watermarker(device: str = "cpu"):
    """silentcipher's 44.1 kHz model, or None (with a printed notice) when the package is not installed."""
    try:
        import silentcipher
    except ImportError:
        print("notice: silentcipher is not installed, so the output is NOT watermarked "
              "(pip install silentcipher to mark it as the original generator does)", file=sys.stderr)
        return None
    return silentcipher.get_model(model_type="44.1k", device=device)


def apply_watermark(watermarker, audio: np.ndarray, key: list[int] = CSM_1B_KEY) -> np.ndarray:
    """24 kHz mono audio -> the same audio carrying `key`, as the original: 44.1 kHz round trip, message SDR 36."""
    import torch

    hi = torch.from_numpy(resample(audio, SAMPLE_RATE, WATERMARK_RATE))
    with torch.inference_mode():
        marked, _ = watermarker.encode_wav(hi, WATERMARK_RATE, key, calc_sdr=False, message_sdr=36)
    return resample(np.asarray(marked, np.float32), WATERMARK_RATE, SAMPLE_RATE)[: len(audio)]
