"""Step lora: one LoRA step (rank 32, alpha 32, q/k/v/o/gate/up/down of both stacks), ours against transformers +
PEFT on the same config, weights and batch (benchmarks/bench_lora.py), on the card: each config and batch of
size["lora"] in turn, float32 or bf16 compute over float32 weights, each side a check of its own."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu_check.decode import full_size_transformers
from benchmarks.gpu_check.plan import LORA
from benchmarks.gpu_check.record import free_device_memory, not_installed, once
from benchmarks.timing import median_time


def step(rec, size: dict, out: Path) -> None:
    import torch

    from benchmarks.bench_train import bench_batch
    from csm_jax.core.config import preset

    # float32 products in TF32 on both sides: JAX's default on the GPU, and torch's with "high"
    torch.set_float32_matmul_precision("high")
    rec["float32_matmuls"] = "TF32 on both sides on a GPU (JAX's default; torch set_float32_matmul_precision('high'))"
    for name, batch, frames, dtype in size["lora"]:
        config = preset(name)
        tokens, mask, depth_mask = bench_batch(config, batch, frames, LORA["depth_fraction"])
        key = f"{name}_{dtype}"
        rec[f"{key}_shape"] = {"batch": batch, "frames": frames, "compute": dtype, "weights": "float32"}
        hf = once(lambda: full_size_transformers(config, "float32"))
        ours = rec.guard(f"{key}_ours", lambda: {
            "ms": lora_ours_ms(hf(), config, tokens, mask, dtype, size["repeats"])})
        free_device_memory()
        theirs = rec.guard(f"{key}_transformers_peft", lambda: {
            "ms": lora_peft_ms(hf(), config, tokens, mask, depth_mask, dtype, size["repeats"])})
        free_device_memory()
        if "ms" in ours and "ms" in theirs:
            rec[f"{key}_transformers_over_ours"] = theirs["ms"] / ours["ms"]


def lora_ours_ms(hf, config, tokens, mask, dtype: str, repeats: int) -> float:
    """Median ms of our LoRA step on `hf`'s weights."""
    import jax.numpy as jnp

    from benchmarks.bench_generate import ours_from_transformers
    from benchmarks.bench_train import our_step
    from train.lora import LoraConfig

    step = our_step(config, tokens, mask, LORA["depth_fraction"], LORA["lr"], jnp.dtype(dtype),
                    LoraConfig(rank=LORA["rank"], alpha=LORA["alpha"]), ours_from_transformers(hf, config, "float32"))
    return 1e3 * median_time(step, repeats)


def lora_peft_ms(hf, config, tokens, mask, depth_mask, dtype: str, repeats: int) -> float:
    """Median ms of transformers' step with PEFT's LoRA wrapped around `hf` (in place)."""
    import torch

    if missing := not_installed("peft"):
        raise ModuleNotFoundError(f"{missing} not installed")
    from benchmarks.bench_lora import peft_model
    from benchmarks.bench_train import transformers_step

    step = transformers_step(config, tokens, mask, depth_mask, LORA["lr"], peft_model(hf, LORA["rank"], LORA["alpha"]),
                             None if dtype == "float32" else getattr(torch, dtype))
    return 1e3 * median_time(step, repeats)
