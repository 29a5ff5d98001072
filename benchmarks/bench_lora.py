"""LoRA fine-tuning: (1) one LoRA step, ours against transformers + PEFT, on the same config, weights and batch;
(2) optimizer state and peak memory of LoRA / QLoRA against full fine-tuning at CSM-1B size, from the compiled
step's memory analysis (abstract inputs: nothing of 1B size is allocated).

    python -m benchmarks.bench_lora --config small --batch 4 --frames 128

Step times are medians over rounds that run one step of each side in turn; the ratio is transformers / ours (> 1
means ours is faster). See benchmarks/bench_train.py on the process's malloc setting (--system-malloc).
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks.bench_train import bench_batch, host_malloc, our_step, step_arguments, transformers_step
from benchmarks.timing import median_times
from csm_jax.core.config import preset
from csm_jax.core.lora import BASE_DTYPES
from csm_jax.core.sharding import make_mesh
from tests.references import csm_from_transformers, transformers_model
from train.lora import LoraConfig, make_trainer
from train.trainer import OptimConfig

PEFT_TARGETS = r"(backbone_model|depth_decoder\.model)\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def peft_model(hf, rank: int, alpha: float):
    """transformers' CSM with PEFT LoRA on the same projections as ours."""
    import peft

    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS))
    return wrapped.get_base_model()


def step_memory(config, lora: LoraConfig, batch: int, frames: int, dtype) -> dict[str, float]:
    """GB: the optimizer state, the trained parameters, the frozen base, and the compiled step's peak."""
    trainer = make_trainer(config, OptimConfig(), make_mesh(1, 1, 1, devices=jax.devices()[:1]), lora,
                           compute_dtype=dtype)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(sds, trainer.abstract_state, trainer.state_shardings)
    n = config.num_codebooks
    data = {"tokens": jax.ShapeDtypeStruct((1, batch, frames, n + 1), jnp.int32),
            "mask": jax.ShapeDtypeStruct((1, batch, frames, n + 1), jnp.bool_),
            "segment_ids": jax.ShapeDtypeStruct((1, batch, frames), jnp.int32)}
    frozen = None
    if lora.rank:
        frozen = jax.eval_shape(trainer._freeze, nnx.to_pure_dict(nnx.state(trainer.abstract, nnx.Param)))
    m = trainer._step.lower(state, data, frozen).compile().memory_analysis()
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 1e9  # noqa: E731
    return {"optimizer": size(state.opt_state), "trained": size(state.params), "frozen": size(frozen),
            "peak": (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                     + m.temp_size_in_bytes) / 1e9}


def main():
    p = step_arguments(__doc__)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--memory-config", default="csm_1b", help="the model size of the memory comparison")
    p.add_argument("--memory-batch", type=int, default=2)
    p.add_argument("--memory-frames", type=int, default=256)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--bases", nargs="+", default=list(BASE_DTYPES), choices=BASE_DTYPES,
                   help="the frozen base dtypes of the memory comparison (default all)")
    p.add_argument("--skip-full", action="store_true", help="leave full fine-tuning out of the memory comparison")
    args = p.parse_args()
    malloc = host_malloc(args)

    if not args.skip_speed:
        config = preset(args.config)
        tokens, mask, depth_mask = bench_batch(config, args.batch, args.frames, args.depth_fraction)
        hf = transformers_model(config)
        params = nnx.to_pure_dict(nnx.state(csm_from_transformers(hf, config), nnx.Param))
        lora = LoraConfig(rank=args.rank, alpha=args.alpha)
        times = median_times({
            "ours": our_step(config, tokens, mask, args.depth_fraction, 2e-4, jnp.float32, lora, params),
            "theirs": transformers_step(config, tokens, mask, depth_mask, 2e-4, peft_model(hf, args.rank, args.alpha))},
            args.repeats)
        ours, theirs = times["ours"], times["theirs"]
        frames = args.batch * args.frames
        print(f"{args.config}: LoRA r={args.rank} on q/k/v/o/gate/up/down of both stacks, batch {args.batch} x "
              f"{args.frames} frames, float32, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}, "
              f"malloc: {malloc}")
        print(f"ours:                 {ours * 1e3:8.1f} ms/step  {frames / ours:8.0f} frames/s")
        print(f"transformers + PEFT:  {theirs * 1e3:8.1f} ms/step  {frames / theirs:8.0f} frames/s")
        print(f"ratio transformers/ours: {theirs / ours:.2f}")

    config = preset(args.memory_config)
    print(f"\n{args.memory_config}, batch {args.memory_batch} x {args.memory_frames} frames, bfloat16 compute, "
          f"AdamW (GB; peak = arguments + outputs - donated + temporaries of the compiled step)")
    print(f"{'':28s}{'optimizer':>10s}{'trained':>10s}{'frozen':>10s}{'peak':>10s}")
    for name, lora in [*[("full fine-tune", LoraConfig())][:not args.skip_full],
                       *[(f"LoRA r={args.rank}, {d} base", LoraConfig(rank=args.rank, base_dtype=d))
                         for d in args.bases]]:
        m = step_memory(config, lora, args.memory_batch, args.memory_frames, jnp.bfloat16)
        print(f"{name:28s}" + "".join(f"{m[k]:10.3f}" for k in ("optimizer", "trained", "frozen", "peak")))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
