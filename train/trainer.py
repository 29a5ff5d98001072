"""Sharded training: the train state, the optimizer, one jitted step (with gradient accumulation) and the
Orbax checkpoint that holds the train state and the Grain iterator together.

Parameters are float32 master weights placed by `csm_jax.core.sharding`'s rules; the model computes in
`compute_dtype` (bfloat16 by default; the layers cast the weights at use). The whole step, accumulation included,
is one compiled function; the state buffers are donated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from csm_jax.io.checkpoint import abstract_model, load_params, save_model
from csm_jax.core.config import CsmConfig
from csm_jax.core.layers import remat_policy
from csm_jax.core.model import Csm
from csm_jax.core.sharding import DEFAULT_RULES, batch_sharding, param_shardings
from train.loss import choose_depth_frames, csm_loss, depth_frame_count, target_frames


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 500
    schedule: str = "constant"  # or "cosine" (decays to 10% over total_steps)
    total_steps: int = 10_000
    weight_decay: float = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    accumulation: int = 1  # micro-batches per optimizer step
    depth_fraction: float = 1 / 16
    depth_weight: float = 1.0


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    if cfg.schedule == "constant":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                         optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    elif cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                      max(cfg.total_steps, cfg.warmup_steps + 1),
                                                      end_value=0.1 * cfg.learning_rate)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}: use 'constant' or 'cosine'")
    no_decay_on_norms = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "scale" not in jax.tree_util.keystr(path), params)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=no_decay_on_norms))


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # pure dict of float32 arrays, the layout of nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt_state: Any
    rng: jax.Array  # uint32 key data (raw, so that Orbax can save it)


class Trainer:
    """Owns the mesh placement and the compiled step for one model config, batch shape and optimizer."""

    def __init__(self, config: CsmConfig, optim: OptimConfig, mesh: Mesh, *, compute_dtype=jnp.bfloat16,
                 rules=DEFAULT_RULES, remat: str = "none"):
        """remat: activation rematerialisation per transformer block, "none", "full" or "dots"
        (`csm_jax.core.layers.REMAT_POLICIES`): less memory for recomputation in the backward pass."""
        self.config, self.optim, self.mesh = config, optim, mesh
        self.abstract = abstract_model(config, dtype=compute_dtype, param_dtype=jnp.float32)
        remat_policy(remat)  # an unknown name fails here, not at the first step
        self.abstract.backbone.remat = self.abstract.decoder.remat = remat
        self.graphdef = nnx.graphdef(self.abstract)
        self.tx = make_optimizer(optim)
        self.param_shardings = param_shardings(self.abstract, mesh, rules)
        self.rules = rules
        replicated = NamedSharding(mesh, PartitionSpec())
        self.abstract_state = jax.eval_shape(
            self._init_state, nnx.to_pure_dict(nnx.state(self.abstract, nnx.Param)), jnp.zeros((), jnp.uint32))
        # optimizer moments are shaped like the parameters and sharded like them; counters are replicated
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, sharding: sharding, self.abstract_state.opt_state, self.param_shardings,
            transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings,
                                          rng=replicated)
        self._step = jax.jit(self._train_step, donate_argnums=0,
                             out_shardings=(self.state_shardings, replicated))
        self._eval = jax.jit(self._eval_metrics)

    # ---- state --------------------------------------------------------------------------------------------

    def _init_state(self, params: dict, seed: jax.Array) -> TrainState:
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed)))

    def init_state(self, seed: int = 0, params: dict | None = None) -> TrainState:
        """A fresh state: `params` (a pure dict, e.g. `load_params` of a converted checkpoint) or random init."""
        if params is None:
            shardings = self.param_shardings

            @jax.jit
            def random_params():
                model = Csm(self.config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
                return jax.lax.with_sharding_constraint(nnx.to_pure_dict(nnx.state(model, nnx.Param)), shardings)

            params = random_params()
        params = jax.device_put(params, self.param_shardings)
        init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        return init(params, jnp.asarray(seed, jnp.uint32))

    def init_from_checkpoint(self, path: str | Path, seed: int = 0) -> TrainState:
        """Start from an inference checkpoint (converted from PyTorch, or exported by an earlier run)."""
        abstract = abstract_model(self.config, dtype=jnp.float32, param_dtype=jnp.float32)
        state = load_params(path, abstract)
        return self.init_state(seed, nnx.to_pure_dict(state))

    # ---- the step -----------------------------------------------------------------------------------------

    def _loss(self, params: dict, batch: dict[str, jax.Array], key: jax.Array):
        model = nnx.merge(self.graphdef, params)
        tokens, mask, seg = batch["tokens"], batch["mask"], batch["segment_ids"]
        count = depth_frame_count(*seg.shape, self.optim.depth_fraction)
        indices, weights = choose_depth_frames(key, target_frames(mask, seg), count)
        return csm_loss(model, tokens, mask, seg, indices, weights, self.optim.depth_weight)

    def _train_step(self, state: TrainState, batch: dict[str, jax.Array]):
        """batch arrays are (accumulation, B, S, ...): one optimizer update over all micro-batches."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def micro(carry, xs):
            grads, i = carry
            (_, metrics), g = grad_fn(state.params, xs, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grads, g), i + 1), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, _), metrics = jax.lax.scan(micro, (zeros, 0), batch)
        grads = jax.tree.map(lambda g: g / self.optim.accumulation, grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = jax.tree.map(jnp.mean, metrics) | {"grad_norm": optax.global_norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def put_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows (accumulation, B_local, S, ...) -> global arrays sharded over the data axes."""
        def put(x):
            sharding = NamedSharding(self.mesh, PartitionSpec(None, *batch_sharding(self.mesh, x.ndim - 1,
                                                                                   self.rules).spec))
            return jax.make_array_from_process_local_data(sharding, x)

        return {k: put(v) for k, v in local.items()}

    def step(self, state: TrainState, local_batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
        return self._step(state, self.put_batch(local_batch))

    def _eval_metrics(self, params: dict, batch: dict[str, jax.Array], rng: jax.Array) -> dict:
        key = jax.random.wrap_key_data(rng)
        return jax.tree.map(jnp.mean, jax.lax.map(lambda micro: self._loss(params, micro, key)[1], batch))

    def eval_loss(self, state: TrainState, local_batch: dict[str, np.ndarray]) -> dict:
        """Loss metrics on a held-out batch (compiled once, not per call)."""
        return self._eval(state.params, self.put_batch(local_batch), state.rng)

    # ---- export -------------------------------------------------------------------------------------------

    def export(self, state: TrainState, path: str | Path, metadata: dict | None = None) -> Path:
        """Writes the trained weights as an inference checkpoint (`csm_jax.load_model`, `python -m convert`)."""
        params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params)
        model = nnx.merge(nnx.graphdef(abstract_model(self.config)), params)
        return save_model(model, path, {"source": "train", "step": int(state.step), **(metadata or {})})


def checkpoint_manager(directory: str | Path, keep: int = 3, every: int = 1) -> ocp.CheckpointManager:
    """Orbax manager over {"state": train state, "data": Grain iterator}; saves asynchronously, keeps `keep`."""
    import grain

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "data": grain.checkpoint.CheckpointHandler()})


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, data_iterator) -> bool:
    import grain

    return manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))


def restore_checkpoint(manager: ocp.CheckpointManager, trainer: Trainer, data_iterator,
                       step: int | None = None) -> TrainState | None:
    """Restores the latest (or `step`) state into `trainer`'s shardings and rewinds `data_iterator` in place."""
    import grain

    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainer.abstract_state,
                          trainer.state_shardings)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]
