"""Run as its own process (it sets the device count before JAX starts): one training step of the tiny model on a
(data, fsdp, tensor) mesh, and the same step on one device, for full fine-tuning and for LoRA over an int8 base;
prints a JSON report.

    python -m tests.sharded_step 2 2 2
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's packages first

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from csm_jax.core.config import preset  # noqa: E402
from csm_jax.core.sharding import make_mesh  # noqa: E402
from tests.helpers import utterance_batch  # noqa: E402
from train.lora import LoraConfig, LoraTrainer  # noqa: E402
from train.trainer import OptimConfig, Trainer  # noqa: E402


def batch(config, accumulation=2, rows=4, length=16, seed=0):
    """`accumulation` micro-batches of `rows` rows: 4 text frames, then audio frames and the end frame."""
    tokens, mask = utterance_batch(np.random.default_rng(seed), config, (accumulation, rows), 4, length - 4)
    return {"tokens": tokens.astype(np.int32), "mask": mask, "segment_ids": np.ones(tokens.shape[:3], np.int32)}


def main(shape):
    config = preset("tiny")
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, accumulation=2)
    results = {}
    for mesh_shape in [(1, 1, 1), shape]:
        mesh = make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
        trainer = Trainer(config, optim, mesh, compute_dtype=jnp.float32)
        state, metrics = trainer.step(trainer.init_state(0), batch(config))
        results[mesh_shape] = (jax.device_get(state.params), jax.device_get(metrics), state.params)
    (one, one_m, _), (many, many_m, sharded) = results[(1, 1, 1)], results[shape]
    diffs = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many))]
    specs = {"wq": str(sharded["backbone"]["blocks"]["attn"]["wq"].sharding.spec),
             "w_down": str(sharded["backbone"]["blocks"]["mlp"]["w_down"].sharding.spec),
             "text_embeddings": str(sharded["text_embeddings"].sharding.spec),
             "wq_shard_shape": list(sharded["backbone"]["blocks"]["attn"]["wq"].addressable_shards[0].data.shape)}
    print(json.dumps({"loss": [float(one_m["loss"]), float(many_m["loss"])], "max_param_diff": max(diffs),
                      "specs": specs, "lora": lora_steps(config, optim, shape)}))


def lora_steps(config, optim, shape):
    """Two LoRA steps (the first leaves b = 0 so the second has a real delta) over an int8 base, both stacks."""
    lora = LoraConfig(rank=4, alpha=8.0, base_dtype="int8")
    results = {}
    for mesh_shape in [(1, 1, 1), shape]:
        mesh = make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
        trainer = LoraTrainer(config, optim, mesh, lora, compute_dtype=jnp.float32)
        state = trainer.init_state(0)
        for seed in range(2):
            state, metrics = trainer.step(state, batch(config, seed=seed))
        results[mesh_shape] = (jax.device_get(state.params), float(metrics["loss"]), state, trainer.frozen)
    (one, one_loss, _, _), (many, many_loss, sharded, frozen) = results[(1, 1, 1)], results[shape]
    q = sharded.params["backbone"]["q"]
    moments = sum(x.size for x in jax.tree.leaves(sharded.opt_state) if x.ndim)
    return {"loss": [one_loss, many_loss],
            "max_adapter_diff": max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one),
                                                                                jax.tree.leaves(many))),
            "adapter_values_off": sum(int((~np.isclose(a, b, rtol=1e-4, atol=1e-5)).sum())
                                      for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many))),
            "max_b": max(float(np.abs(x["b"]).max()) for s in one.values() for x in s.values()),
            "adapter_size": sum(x.size for x in jax.tree.leaves(one)), "optimizer_moments": moments,
            "specs": {"q_a": str(q["a"].sharding.spec), "q_b": str(q["b"].sharding.spec),
                      "down_a": str(sharded.params["backbone"]["down"]["a"].sharding.spec),
                      "wq_int8": str(frozen["backbone"]["blocks"]["attn"]["wq"].values.sharding.spec),
                      "wq_scale": str(frozen["backbone"]["blocks"]["attn"]["wq"].scale.sharding.spec),
                      "wq_dtype": str(frozen["backbone"]["blocks"]["attn"]["wq"].values.dtype)}}


if __name__ == "__main__":
    main(tuple(int(x) for x in sys.argv[1:4]))
