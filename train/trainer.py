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
from csm_jax.core.errors import UserError
from csm_jax.core.layers import remat_policy
from csm_jax.core.model import Csm
from csm_jax.core.sharding import DEFAULT_RULES, batch_sharding, param_shardings
from train.loss import choose_depth_frames, csm_loss, depth_frame_count, target_frames


class ResumeMismatchError(UserError):
    """Resuming checkpoints that another run (another model, base or LoRA settings) wrote."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 500
    schedule: str = "constant"  # or "cosine": decays to 10% at the run's last step (the Trainer's `steps`)
    weight_decay: float = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    accumulation: int = 1  # micro-batches per optimizer step
    depth_fraction: float = 1 / 16
    depth_weight: float = 1.0


def learning_rate_schedule(cfg: OptimConfig, steps: int | None = None) -> optax.Schedule:
    """Linear warm-up, then constant or cosine; the cosine reaches its end value at update `steps - 1`, the run's
    last (optax counts updates from 0), so it needs the run length `steps`."""
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                     optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    if cfg.schedule == "cosine":
        if steps is None:
            raise ValueError("the cosine schedule decays over the run: pass the run's steps to the Trainer")
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(steps - 1, cfg.warmup_steps + 1),
                                                  end_value=0.1 * cfg.learning_rate)
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use 'constant' or 'cosine'")


def make_optimizer(cfg: OptimConfig, steps: int | None = None) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, steps)
    no_decay_on_norms = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "scale" not in jax.tree_util.keystr(path), params)
    return optax.chain(clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=no_decay_on_norms))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm as one scalar factor, min(1, max_norm / norm), that XLA fuses into the optimizer's
    update of every parameter (optax's select between g and g / norm is a separate pass over the gradients)."""

    def update(updates, state, params=None):
        factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
        return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # pure dict of float32 arrays, the layout of nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt_state: Any
    rng: jax.Array  # uint32 key data (raw, so that Orbax can save it)


class Trainer:
    """Owns the mesh placement and the compiled step for one model config, batch shape and optimizer.

    steps: the run's length, over which the cosine schedule decays (needed only for `optim.schedule="cosine"`).
    remat: activation rematerialisation per transformer block, "none", "full" or "dots"
    (`csm_jax.core.layers.REMAT_POLICIES`): less memory for recomputation in the backward pass.
    """

    def __init__(self, config: CsmConfig, optim: OptimConfig, mesh: Mesh, *, steps: int | None = None,
                 compute_dtype=jnp.bfloat16, rules=DEFAULT_RULES, remat: str = "none"):
        self.config, self.optim, self.mesh = config, optim, mesh
        self.abstract = abstract_model(config, dtype=compute_dtype, param_dtype=jnp.float32)
        remat_policy(remat)  # an unknown name fails here, not at the first step
        self.abstract.backbone.remat = self.abstract.decoder.remat = remat
        self.graphdef = nnx.graphdef(self.abstract)
        self.tx = make_optimizer(optim, steps)
        self.param_shardings = param_shardings(self.abstract, mesh, rules)
        self.rules = rules
        replicated = NamedSharding(mesh, PartitionSpec())
        self.frozen = None  # parameters the step reads but does not train (LoRA's base: see train.lora)
        trainable, trainable_shardings = self.trainable_layout()
        self.abstract_state = jax.eval_shape(self._init_state, trainable, jnp.zeros((), jnp.uint32))
        # optimizer moments are shaped like the parameters and sharded like them; counters are replicated
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, sharding: sharding, self.abstract_state.opt_state, trainable_shardings,
            transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
        self.state_shardings = TrainState(step=replicated, params=trainable_shardings, opt_state=opt_shardings,
                                          rng=replicated)
        self._step = jax.jit(self._train_step, donate_argnums=0,
                             out_shardings=(self.state_shardings, replicated))
        self._eval = jax.jit(self._eval_metrics)
        self._model_params = jax.jit(self.model_params)

    # ---- state --------------------------------------------------------------------------------------------

    def trainable_layout(self) -> tuple[dict, dict]:
        """(abstract trained parameters, their shardings): here every model parameter."""
        return nnx.to_pure_dict(nnx.state(self.abstract, nnx.Param)), self.param_shardings

    def model_params(self, params: dict, frozen: Any, key: jax.Array | None) -> dict:
        """The model's full parameter dict from the trained `params` and `self.frozen` (`key`: None outside
        training); here the trained parameters are the model's."""
        return params

    def _init_state(self, params: dict, seed: jax.Array) -> TrainState:
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed)))

    def random_params(self, seed: int) -> dict:
        """The model's random init (a pure dict), placed by the sharding rules."""
        shardings = self.param_shardings

        @jax.jit
        def random_params():
            model = Csm(self.config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
            return jax.lax.with_sharding_constraint(nnx.to_pure_dict(nnx.state(model, nnx.Param)), shardings)

        return random_params()

    def init_state(self, seed: int = 0, params: dict | None = None) -> TrainState:
        """A fresh state: `params` (a pure dict, e.g. `load_params` of a converted checkpoint) or random init."""
        params = jax.device_put(self.random_params(seed) if params is None else params, self.param_shardings)
        return self.fresh_state(params, seed)

    def fresh_state(self, trainable: dict, seed: int) -> TrainState:
        init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        return init(trainable, jnp.asarray(seed, jnp.uint32))

    def checkpoint_params(self, path: str | Path) -> dict:
        """An inference checkpoint's parameters (a pure float32 dict), placed by the sharding rules."""
        abstract = abstract_model(self.config, dtype=jnp.float32, param_dtype=jnp.float32)
        return jax.device_put(nnx.to_pure_dict(load_params(path, abstract)), self.param_shardings)

    def init_from_checkpoint(self, path: str | Path, seed: int = 0) -> TrainState:
        """Start from an inference checkpoint (converted from PyTorch, or exported by an earlier run)."""
        return self.init_state(seed, self.checkpoint_params(path))

    def checkpoint_meta(self) -> dict:
        """What the checkpoints store besides the state and the data iterator: the model's config."""
        return {"model": self.config.to_dict()}

    def check_resume(self, meta: dict | None) -> None:
        """Refuses to resume checkpoints written for another model (`meta`: what `checkpoint_meta` saved with them;
        checkpoints without it are left to the restore's own shape check)."""
        if meta is None or "model" not in meta:
            return
        differences = CsmConfig.from_dict(meta["model"]).differences(self.config)
        if differences:
            raise ResumeMismatchError(f"the checkpoints were written for another model than this run's (checkpoints "
                                      f"!= this run: {'; '.join(differences)}); resume with that run's config, or "
                                      f"give a new workdir")

    # ---- the step -----------------------------------------------------------------------------------------

    def _loss(self, params: dict, batch: dict[str, jax.Array], key: jax.Array, frozen: Any = None,
              training: bool = True):
        model = nnx.merge(self.graphdef, self.model_params(params, frozen, jax.random.fold_in(key, 1)
                                                           if training else None))
        tokens, mask, seg, loss_mask = batch["tokens"], batch["mask"], batch["segment_ids"], batch.get("loss_mask")
        count = depth_frame_count(*seg.shape, self.optim.depth_fraction)
        indices, weights = choose_depth_frames(key, target_frames(mask, seg, loss_mask), count)
        return csm_loss(model, tokens, mask, seg, indices, weights, self.optim.depth_weight, loss_mask)

    def _train_step(self, state: TrainState, batch: dict[str, jax.Array], frozen: Any = None):
        """batch arrays are (accumulation, B, S, ...): one optimizer update over all micro-batches."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def micro(carry, xs):
            grads, i = carry
            (_, metrics), g = grad_fn(state.params, xs, jax.random.fold_in(key, i), frozen)
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
        return self._step(state, self.put_batch(local_batch), self.frozen)

    def _eval_metrics(self, params: dict, batch: dict[str, jax.Array], rng: jax.Array, frozen: Any = None) -> dict:
        key = jax.random.wrap_key_data(rng)
        return jax.tree.map(jnp.mean, jax.lax.map(lambda micro: self._loss(params, micro, key, frozen, False)[1],
                                                  batch))

    def eval_loss(self, state: TrainState, local_batch: dict[str, np.ndarray]) -> dict:
        """Loss metrics on a held-out batch (compiled once, not per call)."""
        return self._eval(state.params, self.put_batch(local_batch), state.rng, self.frozen)

    # ---- export -------------------------------------------------------------------------------------------

    def host_params(self, state: TrainState) -> dict:
        """The current model's parameters (merged with any adapters) as a pure dict of float32 numpy arrays, e.g. to
        export or to generate with. In a multi-process run every process must call this (the sharded parameters are
        gathered from all of them); each gets the whole model."""
        params = self._model_params(state.params, self.frozen, None)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        else:
            params = jax.device_get(params)
        return jax.tree.map(lambda x: np.asarray(x, np.float32), params)

    def export(self, state: TrainState, path: str | Path, metadata: dict | None = None,
               base: str | Path | None = None) -> Path:
        """Writes the trained weights as an inference checkpoint (`csm_jax.load_model`, `python -m convert`), with
        what the checkpoint `base` it started from carries besides its weights (e.g. the Mimi codec).

        In a multi-process run every process takes part (the sharded parameters are gathered from all of them) and
        process 0 writes."""
        params = self.host_params(state)
        if jax.process_index() == 0:
            model = nnx.merge(nnx.graphdef(abstract_model(self.config)), params)
            save_model(model, path, {"source": "train", "step": int(state.step), **(metadata or {})},
                       overwrite=True, base=base)  # a resumed run replaces its own earlier export
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("csm_jax export written")
        return Path(path)


def checkpoint_manager(directory: str | Path, keep: int = 3, every: int = 1) -> ocp.CheckpointManager:
    """Orbax manager over {"state": train state, "data": Grain iterator}; saves asynchronously, keeps `keep`."""
    import grain

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "data": grain.checkpoint.CheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, data_iterator,
                    meta: dict | None = None) -> bool:
    """Saves the state and the iterator, and `meta` (JSON, e.g. which base a LoRA run adapts) when given."""
    import grain

    extra = {"meta": ocp.args.JsonSave(meta)} if meta else {}
    return manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator), **extra))


def checkpoint_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The `meta` saved with the latest (or `step`) checkpoint; None without checkpoints or meta."""
    step = manager.latest_step() if step is None else step
    if step is None or not (Path(manager.directory) / str(step) / "meta").exists():
        return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


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
