"""Step mimi: Mimi (random weights) on the device torch computes on: encode, decode and one streamed frame, each a
check of its own."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.gpu_check.record import once, torch_device
from benchmarks.timing import median_time


def step(rec, size: dict, out: Path) -> None:
    import numpy as np
    import torch

    from csm_jax.core.codec import FRAME_SAMPLES, SAMPLE_RATE
    from csm_jax.io import audio

    dev = torch_device()
    rec["device"] = dev
    mimi = once(lambda: audio.random_mimi(0, device=dev))
    t = np.arange(int(size["mimi_seconds"] * SAMPLE_RATE)) / SAMPLE_RATE
    wave = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
            + 0.05 * np.random.default_rng(0).standard_normal(t.shape)).astype(np.float32)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def encode():
        codes = audio.encode(mimi(), wave)
        sync()
        return codes

    codes = once(encode)

    def encoding():
        c = codes()
        ok = bool((c >= 0).all() and (c < 2048).all())
        return {"shape": list(c.shape), "distinct_codes": int(len(np.unique(c))), "codes_in_range": ok,
                "ms": 1e3 * median_time(encode, size["repeats"], warmup=1), "pass": ok}

    def decoding():
        decoded = audio.decode(mimi(), codes()[None])
        ok = bool(np.isfinite(decoded).all()) and decoded.shape[-1] == codes().shape[1] * FRAME_SAMPLES
        return {"samples": int(decoded.shape[-1]), "pass": ok,
                "ms": 1e3 * median_time(lambda: (audio.decode(mimi(), codes()[None]), sync()), size["repeats"],
                                        warmup=1)}

    def one_streamed_frame():
        for _ in range(2):  # the first one warms up
            with audio.streaming_decoder(mimi()):
                start = time.perf_counter()
                chunk = audio.decode(mimi(), codes()[None, :, :1])
                sync()
                seconds = time.perf_counter() - start
        return {"first_frame_ms": 1e3 * seconds, "samples": int(chunk.shape[-1]),
                "pass": chunk.shape[-1] == FRAME_SAMPLES}

    rec.guard("encode", encoding)
    rec.guard("decode", decoding)
    rec.guard("stream", one_streamed_frame)
