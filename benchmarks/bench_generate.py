"""Our on-device sampler against transformers' `generate`, on the same random weights, in one run.

    python -m benchmarks.bench_generate --config csm_1b --dtype float32 --frames 8
    python -m benchmarks.bench_generate --config csm_1b --dtype bfloat16 --frames 8 \
        --ours-dtype bfloat16-weights
    python -m benchmarks.bench_generate --config small --batch 1 8 --frames 64
    python -m benchmarks.bench_generate --config small --ours-dtype float32 int8 int4 --frames 64

Both sample with the reference settings (temperature 0.9, top-k 50, every codebook) from the same prompt (text
and audio frames). Per-frame time = (time for 2N frames - time for N frames) / N, so the prompt's prefill (shown
apart) does not blur it; compilation (ours) and a warm-up call (both) are excluded. frames/s = batch / that.
Effective weight bandwidth = weight bytes one frame reads (backbone + codebook-0 head + 31 x (depth decoder +
projection + one codebook head)) x frames/s, also shown as a share of the machine's read bandwidth (measured
first: a jitted sum over 1 GiB), which bounds batch-1 decoding from below: bytes per frame / read bandwidth.
Full-size float32 needs about 13 GB: transformers is timed first, its weights are copied into ours, then it is
freed.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx

from convert.from_torch import fill_params, plan
from convert.io import StateDictReader
from convert.layouts import detect_layout
from csm_jax.io.checkpoint import abstract_model
from csm_jax.core.config import CsmConfig, preset
from csm_jax.core.quant import INT4_GROUP
from csm_jax.inference.decode_model import KERNELS_ENV
from csm_jax.inference.loop import FrameGenerator
from csm_jax.inference.sampling import FrameSampling
from tests.helpers import random_prompt
from tests.references import transformers_embeds, transformers_model

FRAME_SECONDS = 0.08
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def weight_bytes_per_frame(config: CsmConfig, itemsize: float, head_itemsize: float | None = None) -> float:
    """Bytes of weights one frame reads, at `itemsize` bytes per weight (the codebook heads at `head_itemsize`)."""
    b, d, v, n = config.backbone.dim, config.decoder.dim, config.audio_vocab_size, config.num_codebooks
    heads = b * v + (n - 1) * d * v
    head_itemsize = itemsize if head_itemsize is None else head_itemsize
    body = config.backbone.num_params + (n - 1) * (config.decoder.num_params + b * d)
    return itemsize * body + head_itemsize * heads


REPEATS = 3


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = REPEATS) -> float:
    """Bytes per second a jitted float32 sum over `nbytes` reads (the best of `repeats`), i.e. what streaming
    weights from memory can reach on this machine: the bandwidth floor of batch-1 decoding."""
    data = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(data).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def per_frame(run, frames: int) -> tuple[float, float]:
    """(seconds per frame, prefill seconds) from timing `frames` and `2 * frames` frames: the difference is
    pure decoding, so prompt length does not blur the per-frame figure. Each is the best of REPEATS runs, which
    filters out other processes' interference on a shared machine. `run(n)` returns the frames it made."""
    best = {}
    for _ in range(REPEATS):
        for n in (frames, 2 * frames):
            start = time.perf_counter()
            made = run(n)
            best[n] = min(best.get(n, float("inf")), time.perf_counter() - start)
            assert made == n, f"a row stopped early ({made} of {n} frames); use another seed"
    step = (best[2 * frames] - best[frames]) / frames
    return step, best[frames] - frames * step


def prompt(config: CsmConfig, seed: int):
    return random_prompt(config, seed, context_text=12, context_audio=40, target_text=10)


def time_transformers(hf, prompts, frames: int, dtype) -> tuple[float, float]:
    with torch.no_grad():
        embeds = torch.cat([transformers_embeds(hf, p.tokens[None], p.mask[None]) for p in prompts])
    embeds = embeds.to(TORCH_DTYPES[dtype])
    kwargs = dict(do_sample=True, temperature=0.9, top_k=50, depth_decoder_do_sample=True,
                  depth_decoder_temperature=0.9, depth_decoder_top_k=50)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)

    def run(n):
        with torch.inference_mode():
            return hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, **kwargs).shape[1]

    run(2)  # warm-up
    return per_frame(run, frames)


QUANTIZED = ("int8", "int4")


def weight_dtype(dtype: str) -> str:
    """The dtype our weights are filled in: int8 and int4 are quantized from float32 when the decode layout is
    built."""
    return "bfloat16" if dtype == "bfloat16-weights" else "float32" if dtype in QUANTIZED else dtype


def frame_bytes(config: CsmConfig, dtype: str) -> float:
    """Weight bytes per frame of our dtype (int4: half a byte and a float16 scale and bias per group of INT4_GROUP
    weights, the codebook heads int8)."""
    if dtype == "int4":
        return weight_bytes_per_frame(config, 0.5 + 4 / INT4_GROUP, 1)
    return weight_bytes_per_frame(config, 1 if dtype == "int8" else NP_DTYPES[weight_dtype(dtype)].itemsize)


def ours_from_transformers(hf, config: CsmConfig, dtype: str):
    reader = StateDictReader(hf.state_dict())
    return fill_params(reader, plan(reader, detect_layout(reader.keys()), config), config,
                       NP_DTYPES[weight_dtype(dtype)])


def build_ours(params, config, dtype: str):
    compute = jnp.float32 if dtype in ("bfloat16-weights", *QUANTIZED) else jnp.dtype(dtype)
    abstract = abstract_model(config, dtype=compute, param_dtype=jnp.dtype(weight_dtype(dtype)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def time_ours(gen: FrameGenerator, prompts, frames: int) -> tuple[float, float]:
    sampling = FrameSampling()
    seeds = list(range(len(prompts)))

    def run(n):
        return min(c.shape[1] for c in gen.generate(prompts, n, sampling, seeds))

    run(frames), run(2 * frames)  # compile (frame caps round up to buckets of 64) + warm-up
    return per_frame(run, frames)


def report(name, step, prefill, batch, bytes_per_frame, bandwidth):
    rate = bytes_per_frame / step
    print(f"{name:28s} batch {batch:2d}: {batch / step:8.2f} frames/s  {step * 1e3:9.1f} ms/frame  "
          f"RTF {step / FRAME_SECONDS:6.3f}  weights {rate / 1e9:6.1f} GB/s = {rate / bandwidth:4.0%} of memory  "
          f"(prefill {prefill:.2f} s; load average {os.getloadavg()[0]:.1f})", flush=True)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=["small", "csm_1b", "tiny"])
    p.add_argument("--dtype", default="float32", choices=list(NP_DTYPES), help="both models' dtype")
    p.add_argument("--ours-dtype", default=None, nargs="+", choices=[*NP_DTYPES, "bfloat16-weights", *QUANTIZED],
                   help="ours only, one or several, timed one after the other (default: --dtype); bfloat16-weights = "
                        "bfloat16 weights, float32 compute; int8 = int8 weights (per-channel scales, from float32), "
                        "int4 = 4-bit weights (groups of 32), both with float32 compute")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--skip-transformers", action="store_true")
    args = p.parse_args()
    config = preset(args.config)
    ours_dtypes = args.ours_dtype or [args.dtype]
    print(f"{args.config}: {config.num_params / 1e6:.1f} M parameters; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"{os.cpu_count()} cores", flush=True)
    bandwidth = read_bandwidth()
    for name in dict.fromkeys([args.dtype, *ours_dtypes]):
        floor = frame_bytes(config, name) / bandwidth
        print(f"memory reads {bandwidth / 1e9:.1f} GB/s: one frame's {name} weights take at least {floor * 1e3:.1f} ms "
              f"at batch 1 (unless caches hold them)", flush=True)

    hf = transformers_model(config).to(TORCH_DTYPES[args.dtype])
    theirs = {}
    if not args.skip_transformers:
        for batch in args.batch:
            prompts = [prompt(config, seed) for seed in range(batch)]
            step, prefill = time_transformers(hf, prompts, args.frames, args.dtype)
            theirs[batch] = report(f"transformers {args.dtype}", step, prefill, batch,
                                   weight_bytes_per_frame(config, NP_DTYPES[args.dtype].itemsize), bandwidth)
    for ours_dtype in ours_dtypes:
        params = ours_from_transformers(hf, config, ours_dtype)
        if ours_dtype == ours_dtypes[-1]:
            del hf
        gc.collect()
        generator = FrameGenerator(build_ours(params, config, ours_dtype),  # keeps only its per-layer copy
                                   weights_dtype=ours_dtype if ours_dtype in QUANTIZED else None)
        del params
        gc.collect()
        print(f"csm-jax {ours_dtype}: {products_path(generator.model, ours_dtype)}", flush=True)
        for batch in args.batch:
            prompts = [prompt(config, seed) for seed in range(batch)]
            step, prefill = time_ours(generator, prompts, args.frames)
            ours = report(f"csm-jax {ours_dtype}", step, prefill, batch,
                          frame_bytes(config, ours_dtype), bandwidth)
            if batch in theirs:
                print(f"{'':28s} batch {batch:2d}: csm-jax is {theirs[batch] / ours:.2f}x faster than transformers",
                      flush=True)
        del generator
        gc.collect()


def products_path(model, dtype: str) -> str:
    """Which path the decode step's matrix products took (the CPU kernel or XLA), and why."""
    kind = weight_dtype(dtype) if dtype not in QUANTIZED else dtype
    if not model.cpu_kernels:
        return "matrix products through XLA (CPU kernels off)"
    how = "forced by $CSM_JAX_CPU_KERNELS" if os.environ.get(KERNELS_ENV) else "measured faster on this CPU"
    path = "the CPU kernel" if kind in model.kernel_kinds else "XLA"
    return f"{kind} matrix products through {path} ({how})"

if __name__ == "__main__":
    main()
