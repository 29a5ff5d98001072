"""Step train: one CSM-1B training step (bf16 compute over float32 master weights): step time, frames/s and MFU
against 790 TFLOP/s and against env's measured matmul rate; every block rematerialised if the plain step fails."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.gpu_check.plan import PEAK_BF16_FLOPS
from benchmarks.gpu_check.record import guard_attention, read_figures
from benchmarks.timing import median_time


def train_step_flops(config, batch: int, frames: int, depth_frames: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward): 2 per multiply-add of every weight
    product (backbone, codebook-0 head; the projection, depth decoder and audio heads over the depth frames' 32
    positions), plus attention's two products over the full (unmasked) square; embeddings are lookups."""
    b, d, v, n = config.backbone, config.decoder, config.audio_vocab_size, config.num_codebooks

    def weights(stack):  # matmul parameters of a stack (its norms excluded)
        return stack.num_params - stack.num_layers * 2 * stack.dim - stack.dim

    def attention(stack, length):
        return stack.num_layers * 2 * 2 * length * length * stack.num_heads * stack.head_dim

    backbone = 2 * batch * frames * (weights(b) + b.dim * v) + batch * attention(b, frames)
    depth = depth_frames * (2 * n * (weights(d) + b.dim * d.dim) + 2 * (n - 1) * d.dim * v + attention(d, n))
    return 3.0 * (backbone + depth)


def step(rec, size: dict, out: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from csm_jax.core.config import preset
    from csm_jax.core.sharding import make_mesh
    from tests.helpers import utterance_batch
    from train.loss import depth_frame_count
    from train.trainer import OptimConfig, Trainer

    config = preset(size["full"])
    batch, frames = size["train_batch"], size["train_frames"]
    optim = OptimConfig(learning_rate=1e-5, warmup_steps=0)
    tokens, mask = utterance_batch(np.random.default_rng(0), config, batch, frames // 8, frames - frames // 8)
    flops = train_step_flops(config, batch, frames, depth_frame_count(batch, frames, optim.depth_fraction))
    measured = (read_figures(out).get("env", {}).get("matmul_bf16") or {}).get("flops_per_s")

    def measure(remat: str) -> dict:
        trainer = Trainer(config, optim, make_mesh(-1, 1, 1), compute_dtype=jnp.bfloat16, remat=remat)
        state = trainer.init_state(0)
        data = trainer.put_batch({"tokens": tokens[None].astype(np.int32), "mask": mask[None],
                                  "segment_ids": np.ones((1, batch, frames), np.int32)})

        def step():
            nonlocal state
            state, metrics = trainer._step(state, data)
            jax.block_until_ready(metrics)
            return metrics

        t0 = time.perf_counter()
        loss = float(step()["loss"])
        first = {"remat": remat, "first_step_s": time.perf_counter() - t0, "loss": loss,
                 "pass": bool(np.isfinite(loss))}
        rec["first_step"] = first  # kept if the timed steps overrun the budget
        seconds = median_time(step, size["repeats"], warmup=1)
        figures = {**first, "step_s": seconds, "frames_per_s": batch * frames / seconds, "flops_per_step": flops,
                   "mfu_vs_790": flops / seconds / PEAK_BF16_FLOPS}
        if measured:
            figures["mfu_vs_measured_matmul"] = flops / seconds / measured
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            figures["peak_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
        return figures

    rec["shape"] = {"batch": batch, "frames": frames, "compute": "bfloat16", "master": "float32"}
    result = guard_attention(rec, "step", measure, "none")
    if "error" in result:  # out of memory, say: the same step with every block rematerialised
        rec["remat_none_error"] = result["error"]
        guard_attention(rec, "step", measure, "full")


