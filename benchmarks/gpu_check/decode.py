"""Steps decode_bf16, decode_int8, decode_int4 and decode_batches: full-size CSM-1B at random weights (those of transformers'
model with the same seed, so that transformers' figures are on the same weights): ms/frame at batch 1 and time to
first audio first, then the larger batches. Per-frame time = (time for 2N frames - time for N frames) / N."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.gpu_check.record import free_device_memory, guard_attention, once, read_figures, torch_device


def full_size_transformers(config, dtype: str, seed: int = 0):
    """transformers' CSM with random weights (codebook embeddings tied), initialised on the device: the same
    weights for the same seed."""
    import torch

    from tests.references import tied_transformers, transformers_config

    torch.manual_seed(seed)
    with torch.device(torch_device()):
        hf = tied_transformers(transformers_config(config))
    return hf.eval().to(getattr(torch, dtype))


def full_size_ours(config, weights_dtype: str):
    """Our decode layout with the weights of `full_size_transformers(config, "bfloat16")`, bf16 compute; int8 and
    int4 quantize them."""
    from benchmarks.bench_generate import build_ours, ours_from_transformers
    from csm_jax.inference.loop import FrameGenerator
    from csm_jax.inference.quantize import QUANTIZED

    params = ours_from_transformers(full_size_transformers(config, "bfloat16"), config, "bfloat16")
    free_device_memory()  # the transformers model is gone: free its memory before ours is placed
    model = build_ours(params, config, "bfloat16")
    del params
    return FrameGenerator(model, weights_dtype=weights_dtype if weights_dtype in QUANTIZED else None)


def bandwidth_floor(config, weights_dtype: str, out: Path) -> tuple[int, float | None]:
    """(weight bytes one frame reads, seconds they take at the read bandwidth env measured, None without it)."""
    from benchmarks.bench_generate import frame_bytes

    nbytes = frame_bytes(config, weights_dtype)
    bandwidth = (read_figures(out).get("env", {}).get("read_bandwidth") or {}).get("bytes_per_s")
    return nbytes, nbytes / bandwidth if bandwidth else None


def batch_figures(gen, config, batch: int, frames: int, floor_s: float | None) -> dict:
    """ms/frame, frames/s and prefill of `batch` rows sampling with the reference settings."""
    from benchmarks.bench_generate import per_frame, prompt
    from csm_jax.inference.sampling import FrameSampling

    prompts = [prompt(config, seed) for seed in range(batch)]
    sampling = FrameSampling()

    def run(n):
        return min(c.shape[1] for c in gen.generate(prompts, n, sampling, list(range(batch))))

    t0 = time.perf_counter()
    run(frames)
    compile_s = time.perf_counter() - t0
    run(2 * frames)
    step, prefill = per_frame(run, frames)
    out = {"ms_per_frame": 1e3 * step, "frames_per_s": batch / step, "prefill_s": prefill, "first_call_s": compile_s}
    if floor_s and batch == 1:
        out["share_of_bandwidth_floor"] = floor_s / step
    return out


def time_to_first_audio(gen, config, frames: int) -> dict:
    """Request -> first frame's codes, and -> its audio through Mimi's streaming decoder on the same device."""
    import torch

    from benchmarks.bench_generate import prompt
    from csm_jax.inference.sampling import FrameSampling
    from csm_jax.io import audio

    p = prompt(config, 0)

    def first_codes():
        t0 = time.perf_counter()
        codes = next(gen.stream(p, 4 * frames, FrameSampling(), seed=0, first_chunk=1))
        return time.perf_counter() - t0, codes

    first_codes()  # compile
    codes_s, codes = first_codes()
    mimi = audio.random_mimi(0, device=torch_device())
    for _ in range(2):  # the first decode warms Mimi up
        with audio.streaming_decoder(mimi):
            t0 = time.perf_counter()
            audio.decode(mimi, codes[None])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            mimi_s = time.perf_counter() - t0
    return {"codes_ms": 1e3 * codes_s, "mimi_first_frame_ms": 1e3 * mimi_s, "audio_ms": 1e3 * (codes_s + mimi_s)}


def generator(rec, config, weights_dtype: str):
    """The full-size generator, built once on first use (its build time recorded); see `once`."""
    import jax

    def build():
        start = time.perf_counter()
        gen = full_size_ours(config, weights_dtype)
        jax.block_until_ready(gen.params)
        rec[f"{weights_dtype}_build_s"] = time.perf_counter() - start
        return gen

    return once(build)


def first_figures(rec, size: dict, out: Path, weights_dtype: str, audio: bool) -> None:
    """Batch 1, and with `audio` time to first audio right after it: the figures that matter most."""
    from csm_jax.core.config import preset

    config = preset(size["full"])
    nbytes, floor_s = bandwidth_floor(config, weights_dtype, out)
    rec["weight_bytes_per_frame"] = nbytes
    rec["floor_ms_per_frame"] = None if floor_s is None else 1e3 * floor_s
    gen = generator(rec, config, weights_dtype)
    batch = size["first_batch"]
    guard_attention(rec, f"batch_{batch}", lambda: batch_figures(gen(), config, batch, size["frames"], floor_s))
    if audio:
        rec.guard("time_to_first_audio", lambda: time_to_first_audio(gen(), config, size["frames"]))


def step_bf16(rec, size: dict, out: Path) -> None:
    first_figures(rec, size, out, "bfloat16", audio=True)


def step_int8(rec, size: dict, out: Path) -> None:
    first_figures(rec, size, out, "int8", audio=False)


def step_int4(rec, size: dict, out: Path) -> None:
    first_figures(rec, size, out, "int4", audio=False)


def step_batches(rec, size: dict, out: Path) -> None:
    """The larger batches, bf16 then int8 weights (one model on the card at a time)."""
    from csm_jax.core.config import preset

    config = preset(size["full"])
    for weights_dtype in ("bfloat16", "int8"):
        gen = generator(rec, config, weights_dtype)
        for batch in size["more_batches"]:
            guard_attention(rec, f"{weights_dtype}_batch_{batch}",
                            lambda: batch_figures(gen(), config, batch, size["frames"], None))
        gen = None  # the model's memory is freed before the next one is built
        free_device_memory()
