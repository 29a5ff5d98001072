"""Device memory of one compiled training step, from XLA's own buffer assignment (`memory_analysis`) on abstract
inputs: nothing is allocated, so CSM-1B at any batch can be sized on a laptop.

    python benchmarks/train_memory.py --config csm_1b --batch 8 --frames 2048 --remat none full dots

Per remat policy: arguments (float32 parameters + AdamW moments + the batch, donated into the outputs), temporaries
(activations kept for the backward pass, gradients, workspace) and their sum. Compiled for the backend JAX runs on
(the CPU here): a GPU's buffer assignment differs in detail (fusion, cuDNN attention's workspace), so read it as an
estimate of what must fit the card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def step_memory(config_name: str, batch: int, frames: int, remat: str, compute_dtype: str = "bfloat16") -> dict:
    from csm_jax.core.config import preset
    from csm_jax.core.sharding import make_mesh
    from train.trainer import OptimConfig, Trainer

    trainer = Trainer(preset(config_name), OptimConfig(), make_mesh(-1, 1, 1), compute_dtype=jnp.dtype(compute_dtype),
                      remat=remat)
    n = trainer.config.num_codebooks
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainer.abstract_state,
                         trainer.state_shardings)
    shapes = {"tokens": ((1, batch, frames, n + 1), np.int32), "mask": ((1, batch, frames, n + 1), np.bool_),
              "segment_ids": ((1, batch, frames), np.int32)}
    data = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    start = time.perf_counter()
    analysis = trainer._step.lower(state, data).compile().memory_analysis()
    gb = 1e9
    out = {"remat": remat, "compile_s": round(time.perf_counter() - start, 1),
           "arguments_gb": analysis.argument_size_in_bytes / gb, "outputs_gb": analysis.output_size_in_bytes / gb,
           "aliased_gb": analysis.alias_size_in_bytes / gb, "temporaries_gb": analysis.temp_size_in_bytes / gb}
    # donated state: outputs alias the arguments, so the peak is arguments + temporaries (+ unaliased outputs)
    out["total_gb"] = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                       + analysis.output_size_in_bytes - analysis.alias_size_in_bytes) / gb
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="csm_1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=2048)
    p.add_argument("--remat", nargs="+", default=["none", "full", "dots"])
    args = p.parse_args()
    for remat in args.remat:
        print(json.dumps({"config": args.config, "batch": args.batch, "frames": args.frames,
                          **step_memory(args.config, args.batch, args.frames, remat)}), flush=True)


if __name__ == "__main__":
    main()
