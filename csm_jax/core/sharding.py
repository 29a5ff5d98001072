"""Logical axis names -> mesh axes: one ordered rules table, MaxText style.

Every `nnx.Param` carries `logical_axes` metadata (set in `csm_jax.core.layers`). A rule maps a logical name to a
mesh axis (or a tuple of them, or None = replicated). A mesh axis is used at most once per array: a later
dimension whose rule names an axis already taken stays replicated, and so does a dimension the axis size does
not divide (small decoder dims on big meshes), so every rule table is valid for every model size.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters: fsdp shards the model dimension, tensor shards heads / mlp / vocab (Megatron style).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("decoder_embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("codebooks", None),
    # activations
    ("batch", ("data", "fsdp")),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of all processes). -1 in one axis takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} needs {int(np.prod(shape))} "
                         f"devices but {len(devices)} are visible; change the mesh sizes (one may be -1)")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
                    ) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if a not in used and mesh.shape[a] > 1)
        if not names or size % int(np.prod([mesh.shape[a] for a in names])):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def param_shardings(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """A pure dict (the layout of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`) of `NamedSharding`s, one per
    parameter, from its `logical_axes` metadata. `model` may be abstract (`nnx.eval_shape`)."""

    def sharding(p: nnx.Variable) -> nnx.Variable:
        shape = p.get_value().shape
        axes = p.get_metadata().get("logical_axes", (None,) * len(shape))
        return p.replace(NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules)))

    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array (leading batch axis) over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), (0,) * ndim, mesh, rules))
