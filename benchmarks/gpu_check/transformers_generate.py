"""Steps transformers_eager and transformers_compiled: transformers' `generate` on the weights of decode_bf16 (same
seed), sampling with the reference settings. Eager at batch 1 runs early, beside our batch-1 figure; its fastest
documented mode (static caches for both stacks, with which generate compiles the forward with torch.compile on
CUDA; on CPU it stays eager) runs last, as it compiles for a long time."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.gpu_check.decode import full_size_transformers
from benchmarks.gpu_check.record import once, read_figures, torch_device


def figures(hf, config, batch: int, frames: int, static: bool) -> dict:
    import torch

    from benchmarks.bench_generate import per_frame, prompt
    from tests.references import transformers_embeds

    dev = torch_device()
    hf.depth_decoder.generation_config.cache_implementation = "static" if static else None
    with torch.no_grad():
        embeds = torch.cat([transformers_embeds(hf, p.tokens[None], p.mask[None]).float()
                            for p in (prompt(config, seed) for seed in range(batch))]).to(dev, torch.bfloat16)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)
    extra = {"cache_implementation": "static"} if static else {"disable_compile": True}

    def run(n):
        with torch.inference_mode():
            out = hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, do_sample=True,
                              temperature=0.9, top_k=50, depth_decoder_do_sample=True, depth_decoder_temperature=0.9,
                              depth_decoder_top_k=50, **extra)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out.shape[1]

    t0 = time.perf_counter()
    run(frames), run(2 * frames)  # warm up (and compile) both lengths
    warm_s = time.perf_counter() - t0
    step, prefill = per_frame(run, frames)
    return {"ms_per_frame": 1e3 * step, "frames_per_s": batch / step, "prefill_s": prefill, "warm_up_s": warm_s}


def against_ours(result: dict, out: Path, batch: int) -> dict:
    """`result` with how many times faster our bf16 decoding was at the same batch (when both were measured)."""
    decode = read_figures(out)
    ours = decode.get("decode_bf16", {}).get(f"batch_{batch}") or decode.get("decode_batches", {}).get(
        f"bfloat16_batch_{batch}") or {}
    if "ms_per_frame" in result and ours.get("ms_per_frame"):
        return {**result, "ours_speedup": result["ms_per_frame"] / ours["ms_per_frame"]}
    return result


def measure(rec, size: dict, out: Path, runs) -> None:
    from csm_jax.core.config import preset

    config = preset(size["full"])
    model = once(lambda: full_size_transformers(config, "bfloat16"))
    for key, batch, static in runs:
        result = rec.guard(key, lambda: figures(model(), config, batch, size["transformers_frames"], static))
        rec[key] = against_ours(result, out, batch)


def step_eager(rec, size: dict, out: Path) -> None:
    measure(rec, size, out, [(f"eager_batch_{size['first_batch']}", size["first_batch"], False)])


def step_compiled(rec, size: dict, out: Path) -> None:
    mode = "static cache + torch.compile" if torch_device() == "cuda" else "static cache, eager (no compile on CPU)"
    rec["mode"] = mode
    batches = (size["first_batch"], size["more_batches"][0])
    measure(rec, size, out, [(f"static_batch_{b}", b, True) for b in batches]
            + [(f"eager_batch_{batches[1]}", batches[1], False)])
