"""One training step, ours against transformers' CSM, on the same config and batch: forward with the training
loss (codebook 0 on every audio frame, depth decoder on a fixed fraction of frames), backward, AdamW update.

    python -m benchmarks.bench_train --config small --batch 4 --frames 128

Prints both medians (over rounds that run one step of each side in turn), the ratio (transformers / ours; > 1
means ours is faster), frames/s and, when a GPU is present, model FLOPs utilisation against --peak-tflops.

On the CPU, glibc maps allocations over 32 MB anew by default, so each step's temporaries page-fault afresh on both
sides. Like `python -m train`, the benchmark first sets glibc to keep freed memory for reuse
(`csm_jax.core.host_memory`), for the whole process and so for both sides; --system-malloc leaves the defaults.
The run prints which it had.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.timing import median_times
from csm_jax.core.config import CsmConfig, preset
from csm_jax.core.host_memory import keep_freed_memory
from csm_jax.core.sharding import make_mesh
from tests.helpers import utterance_batch
from tests.references import transformers_loss, transformers_model
from train.lora import LoraConfig, make_trainer
from train.trainer import OptimConfig


def host_malloc(args: argparse.Namespace) -> str:
    """Sets up the process's malloc as `--system-malloc` asks (see the module docstring), before JAX's backend starts;
    returns what it is."""
    return "system defaults" if args.system_malloc else keep_freed_memory()


def transformers_step(config, tokens, mask, depth_mask, lr, hf=None, autocast=None):
    """`hf`: the model to train (default: a random one, on the CPU), on its device; only its parameters that require
    grad are trained. `autocast`: a torch dtype the forward computes in (torch.autocast; weights stay as they are)."""
    hf = (transformers_model(config) if hf is None else hf).train()
    optimizer = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                  weight_decay=1e-3)

    def step():
        with torch.autocast(hf.device.type, dtype=autocast, enabled=autocast is not None):
            loss = transformers_loss(hf, tokens, mask, depth_mask).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        if loss.is_cuda:  # CUDA runs asynchronously: the step is done when the card is
            torch.cuda.synchronize()

    return step


def our_step(config, tokens, mask, depth_fraction, lr, dtype, lora=LoraConfig(), params=None):
    """`lora`: LoRA settings (rank 0 = full fine-tuning); `params`: the weights (default: a random init)."""
    trainer = make_trainer(config, OptimConfig(learning_rate=lr, warmup_steps=0, depth_fraction=depth_fraction),
                           make_mesh(-1, 1, 1), lora, compute_dtype=dtype)
    state = trainer.init_state(0, params)
    batch = trainer.put_batch({"tokens": tokens[None].astype(np.int32), "mask": mask[None],
                               "segment_ids": np.ones((1, *tokens.shape[:2]), np.int32)})
    step_fn = trainer._step

    def step():
        nonlocal state
        state, metrics = step_fn(state, batch, trainer.frozen)
        jax.block_until_ready(metrics)

    return step


def bench_batch(config: CsmConfig, batch: int, frames: int, depth_fraction: float):
    """Utterance rows (text then audio frames) and the frames transformers' depth decoder trains on."""
    rng = np.random.default_rng(0)
    text_len = frames // 8
    tokens, mask = utterance_batch(rng, config, batch, text_len, frames - text_len)
    audio = np.argwhere(mask[..., 0])
    depth_mask = np.zeros(tokens.shape[:2], bool)
    depth_mask[tuple(audio[rng.choice(len(audio), int(batch * frames * depth_fraction), replace=False)].T)] = True
    return tokens, mask, depth_mask


def train_flops(config: CsmConfig, frames: int, depth_frames: int) -> float:
    """6 x matmul parameters x tokens: the backbone (and codebook-0 head) over every frame, the depth decoder (and
    its heads) over the chosen frames' codebooks; attention scores left out."""
    b, d, v = config.backbone, config.decoder, config.audio_vocab_size
    return 6 * (frames * (b.num_params() + b.dim * v)
                + depth_frames * (config.num_codebooks - 1) * (d.num_params() + d.dim * v))


def step_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every step benchmark shares: model, batch shape, depth-decoder fraction, repeats."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=128)
    p.add_argument("--depth-fraction", type=float, default=1 / 16)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds, each one step of every side in turn")
    p.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc at its defaults")
    return p


def main():
    p = step_arguments(__doc__)
    p.add_argument("--dtype", default="float32", help="our compute dtype (transformers runs float32)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak for MFU (H100 SXM bf16 dense)")
    args = p.parse_args()
    malloc = host_malloc(args)

    config = preset(args.config)
    tokens, mask, depth_mask = bench_batch(config, args.batch, args.frames, args.depth_fraction)
    depth_frames = int(depth_mask.sum())

    times = median_times({"ours": our_step(config, tokens, mask, args.depth_fraction, 1e-4, jnp.dtype(args.dtype)),
                          "theirs": transformers_step(config, tokens, mask, depth_mask, 1e-4)}, args.repeats)
    ours, theirs = times["ours"], times["theirs"]
    frames = args.batch * args.frames
    print(f"{args.config}: batch {args.batch} x {args.frames} frames, depth on {depth_frames} frames, "
          f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}, malloc: {malloc}")
    print(f"ours ({args.dtype}):         {ours * 1e3:8.1f} ms/step  {frames / ours:8.0f} frames/s")
    print(f"transformers (float32): {theirs * 1e3:8.1f} ms/step  {frames / theirs:8.0f} frames/s")
    print(f"ratio transformers/ours: {theirs / ours:.2f}")
    if jax.devices()[0].platform == "gpu":
        print(f"MFU: {train_flops(config, frames, depth_frames) / ours / (args.peak_tflops * 1e12):.1%}")


if __name__ == "__main__":
    main()
