"""Run as its own process: training steps of the tiny model on a (2, 2, 2) mesh of 8 CPU devices, either in one process
(`--processes 1`) or as one of two processes joined by `jax.distributed` over loopback (4 devices each). Each
process reads only its own share of the Emilia shards; the one-process run feeds both shares side by side, so
both runs see the same global batches. Each process prints a JSON report (losses, parameter fingerprints before
and after a save + restore of one checkpoint written together).

    python -m tests.multihost_train SHARDS WORKDIR --processes 2 --process-id I --port P
"""

import argparse
import os

args = argparse.ArgumentParser()
args.add_argument("shards")
args.add_argument("workdir")
args.add_argument("--processes", type=int, default=1)
args.add_argument("--process-id", type=int, default=0)
args.add_argument("--port", type=int, default=0)
args = args.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // args.processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.process_id)

from csm_jax.io import audio, text  # noqa: E402
from csm_jax.core.config import preset  # noqa: E402
from csm_jax.core.sharding import make_mesh  # noqa: E402
from train.data import DataConfig, Featurizer, list_shards, process_share, tar_dataset  # noqa: E402
from train.trainer import (OptimConfig, Trainer, checkpoint_manager, restore_checkpoint,  # noqa: E402
                           save_checkpoint)

STEPS = 2
config = preset("tiny_full_vocab")
data = DataConfig(max_frames=96, batch_size=2, shuffle_window=2, interleave=1)
featurizer = Featurizer(text.load_tokenizer(), audio.random_mimi(0), data)
shards = list_shards(args.shards)
shares = [jax.process_index()] if args.processes > 1 else [0, 1]
iterators = [iter(tar_dataset(shards, data, featurizer, process_index=i, process_count=2)) for i in shares]

trainer = Trainer(config, OptimConfig(learning_rate=1e-3, warmup_steps=0), make_mesh(2, 2, 2),
                  compute_dtype=jnp.float32)
state = trainer.init_state(0)
fingerprint = jax.jit(lambda params: [jnp.sum(x * x) for x in jax.tree.leaves(params)])


def next_batch():
    parts = [next(it) for it in iterators]
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


losses = []
for _ in range(STEPS):
    state, metrics = trainer.step(state, next_batch())
    losses.append(float(metrics["loss"]))
trained = [float(x) for x in fingerprint(state.params)]
manager = checkpoint_manager(args.workdir)
save_checkpoint(manager, state, iterators[0])
manager.wait_until_finished()
restored = restore_checkpoint(manager, trainer, iterators[0])
report = {"losses": losses, "trained": trained, "restored": [float(x) for x in fingerprint(restored.params)],
          "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
          "process_index": jax.process_index(),
          "shards_read": [str(s) for i in shares for s in process_share(shards, i, 2, data.seed)]}
for it in iterators:
    it.close()  # before interpreter teardown, where grain's prefetch threads fail to stop quietly
print(json.dumps(report), flush=True)
