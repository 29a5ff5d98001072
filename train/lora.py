"""LoRA / QLoRA fine-tuning: a `Trainer` whose state holds only the adapters (and their optimizer moments).

The base parameters are frozen, kept apart from the state (in float32, bfloat16, or int8 with per-channel scales
or 4-bit groups for the blocks' projections) and passed to the jitted step as an argument; the loss runs the model with each
adapted weight as a `LoraWeight` (x @ W + scale * (x @ a) @ b, `csm_jax.core.lora.adapted`), so the gradient
reaches only a and b and no full-size weight gradient is computed. Export and evaluation use the merged weights.
Adapters are sharded by the same rules as their weights (a: (in axes, None), b: (None, out axes)).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from csm_jax.core.lora import (BASE_DTYPES, STACKS, TARGETS, LoraSpec, adapted, adapter_axes, adapter_shapes, frozen_base,
                               get_path, init_adapters, merge, weight_path)
from csm_jax.core.quant import Int4Weight, Int8Weight, is_quantized
from csm_jax.core.sharding import logical_to_spec
from csm_jax.io.adapters import save_adapter
from train.trainer import ResumeMismatchError, TrainState, Trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora` section of the training config; rank 0 = full fine-tuning. targets: among q, k, v, o, gate, up,
    down (a tuple, or a comma-separated string on the command line: lora.targets=q,v); stacks: backbone, decoder."""

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = tuple(TARGETS)
    stacks: tuple[str, ...] | str = STACKS
    base_dtype: str = "float32"  # the frozen base: float32, bfloat16, or int8 / int4 (QLoRA)

    def __post_init__(self):
        if self.rank:
            self.spec()  # invalid settings fail when the config is read
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"lora.base_dtype={self.base_dtype!r}: use {', '.join(BASE_DTYPES)}")

    def spec(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=float(self.alpha), targets=_names(self.targets),
                        stacks=_names(self.stacks), dropout=float(self.dropout))


def _names(x: tuple[str, ...] | str) -> tuple[str, ...]:
    """("q", "v") or "q,v" (a command-line override) -> ("q", "v")."""
    return tuple(n.strip() for n in x.split(",") if n.strip()) if isinstance(x, str) else tuple(x)


def params_fingerprint(params: dict) -> str:
    """A hash of a parameter tree's values: per array, the wrapping uint32 sum of its float32 bit patterns (exact,
    so independent of the mesh and of the reduction order)."""
    def bits(x):
        return jnp.sum(jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32), dtype=jnp.uint32)

    sums = jax.device_get(jax.jit(lambda p: [bits(x) for x in jax.tree.leaves(p)])(params))
    return hashlib.sha256(json.dumps([int(x) for x in sums]).encode()).hexdigest()


class LoraTrainer(Trainer):
    """`Trainer` for adapters over a frozen base: set the base (`init_state(seed, params)`, `init_from_checkpoint`
    or `set_base`) before stepping; a restored state needs `set_base` too."""

    def __init__(self, config, optim, mesh, lora: LoraConfig, **kwargs):
        self.lora, self.spec = lora, lora.spec()
        self.compute_dtype = kwargs.get("compute_dtype", jnp.bfloat16)
        self.base_info: dict[str, str] | None = None
        super().__init__(config, optim, mesh, **kwargs)
        abstract_frozen = jax.eval_shape(self._freeze, nnx.to_pure_dict(nnx.state(self.abstract, nnx.Param)))
        self.frozen_shardings = jax.tree.map(self._frozen_sharding, abstract_frozen, self.param_shardings,
                                             is_leaf=is_quantized)

    def _freeze(self, params: dict) -> dict:
        return frozen_base(params, self.lora.base_dtype)

    def _frozen_sharding(self, x, weight: NamedSharding):
        """An int8 weight's values shard like the weight; its scales too, except on their size-1 input axes. A 4-bit
        weight's arrays (layers, packed input rows, output columns) shard over layers like the weight."""
        if isinstance(x, Int4Weight):
            layers = NamedSharding(self.mesh, PartitionSpec(*tuple(weight.spec)[:1]))
            return Int4Weight(layers, layers, layers, x.in_shape, x.out_shape)
        if not is_quantized(x):
            return weight
        spec = tuple(weight.spec) + (None,) * (x.scale.ndim - len(weight.spec))
        return Int8Weight(weight, NamedSharding(self.mesh, PartitionSpec(
            *(None if n == 1 else a for a, n in zip(spec, x.scale.shape)))))

    def trainable_layout(self) -> tuple[dict, dict]:
        """The adapters, sharded by their weights' logical axes (a: (in, None), b: (None, out))."""
        state = nnx.state(self.abstract, nnx.Param)
        abstract = jax.eval_shape(lambda: init_adapters(jax.random.key(0), nnx.to_pure_dict(state), self.spec))
        shardings: dict = {}
        for stack, target in self.spec.pairs():
            variable = get_path(state, weight_path(stack, target))
            axes = adapter_axes(variable.get_metadata()["logical_axes"], target)
            shapes = adapter_shapes(variable.get_value().shape, target, self.spec.rank)
            shardings.setdefault(stack, {})[target] = {
                k: NamedSharding(self.mesh, logical_to_spec(axes[k], shapes[k], self.mesh, self.rules)) for k in "ab"}
        return abstract, shardings

    def model_params(self, params: dict, frozen: Any, key: jax.Array | None) -> dict:
        if key is None:  # export and eval: merged in float32
            return merge(frozen, params, self.spec)
        return adapted(frozen, params, self.spec, dropout_key=key)

    # ---- state --------------------------------------------------------------------------------------------

    def set_base(self, params: dict, info: dict[str, str] | None = None) -> None:
        """Freezes `params` (a pure dict of the full model) in the configured base dtype as the base."""
        self.frozen = jax.jit(self._freeze, out_shardings=self.frozen_shardings)(params)
        self.base_info = info

    def load_base(self, init: str | None, seed: int = 0) -> None:
        """The base of a run: the inference checkpoint `init`, or the model's random init from `seed`."""
        params = self.checkpoint_params(init) if init else self.random_params(seed)
        self.set_base(params, {"path": str(Path(init).absolute()) if init else f"random init, seed {seed}",
                               "fingerprint": params_fingerprint(params)})

    def init_state(self, seed: int = 0, params: dict | None = None) -> TrainState:
        """Fresh adapters (b = 0) over `params` as the base; without `params`, over the base already set (or the
        random init when none is)."""
        if params is not None:
            params = jax.device_put(params, self.param_shardings)
            self.set_base(params, {"path": "", "fingerprint": params_fingerprint(params)})
        elif self.frozen is None:
            self.load_base(None, seed)
        shapes = nnx.to_pure_dict(nnx.state(self.abstract, nnx.Param))
        init = jax.jit(lambda key: init_adapters(key, shapes, self.spec),
                       out_shardings=self.state_shardings.params)
        return self.fresh_state(init(jax.random.key(seed)), seed)

    def init_from_checkpoint(self, path: str | Path, seed: int = 0) -> TrainState:
        self.load_base(str(path), seed)
        return self.init_state(seed)

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "base": self.base_info or {},
                "lora": json.loads(json.dumps(dataclasses.asdict(self.spec)))}

    def check_resume(self, meta: dict | None) -> None:
        """Refuses to resume adapters trained over another base (or with other LoRA settings)."""
        super().check_resume(meta)
        if meta is None:
            return
        saved, now = meta.get("base", {}), self.base_info or {}
        if saved.get("fingerprint") != now.get("fingerprint"):
            raise ResumeMismatchError(
                f"the checkpoints were trained over the base {saved.get('path')!r} (fingerprint "
                f"{saved.get('fingerprint', '')[:12]}), but this run's base {now.get('path')!r} has other weights "
                f"(fingerprint {now.get('fingerprint', '')[:12]}); set init= to the run's base, or use a new workdir")
        if meta.get("lora") != self.checkpoint_meta()["lora"]:
            raise ResumeMismatchError(f"the checkpoints hold adapters with LoRA settings {meta.get('lora')}, not "
                                      f"{dataclasses.asdict(self.spec)}; use the same lora.* settings or a new "
                                      f"workdir")

    # ---- export -------------------------------------------------------------------------------------------

    def export(self, state: TrainState, path: str | Path, metadata: dict | None = None,
               base: str | Path | None = None) -> Path:
        """The merged model as an inference checkpoint at `path` (carrying what `base` carries, as `Trainer.export`),
        and the adapter alone beside it (`path`/../adapter, PEFT's format)."""
        merged = super().export(state, path, {"lora": dataclasses.asdict(self.spec), **(metadata or {})}, base)
        adapters = state.params
        if jax.process_count() > 1:  # every process takes part in the gather; process 0 writes
            from jax.experimental import multihost_utils

            adapters = multihost_utils.process_allgather(adapters, tiled=True)
        if jax.process_index() == 0:
            adapter = save_adapter(Path(path).parent / "adapter", jax.device_get(adapters), self.spec, self.config,
                                   {"base": self.base_info or {}, "step": int(state.step)},
                                   overwrite=True)  # a resumed run replaces its own earlier adapter
            log.info("adapter written to %s (generate with --adapter %s over the base checkpoint)", adapter, adapter)
        return merged


def make_trainer(config, optim, mesh, lora: LoraConfig, **kwargs) -> Trainer:
    """A `LoraTrainer` when `lora.rank` > 0, else the full fine-tuning `Trainer`."""
    return LoraTrainer(config, optim, mesh, lora, **kwargs) if lora.rank else Trainer(config, optim, mesh, **kwargs)
