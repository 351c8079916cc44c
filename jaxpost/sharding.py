"""One device mesh (`data`, `fsdp`, `tensor`), logical axis rules, and the shardings they give.

Parameters carry logical axis names (see `model.py`); `LOGICAL_RULES` maps them onto mesh axes:
batches split over `data` x `fsdp`, parameters over `fsdp` (ZeRO-3 style) and `tensor` (Megatron
style: heads, MLP width and vocabulary). A parameter dimension that a mesh axis does not divide is
replicated along that axis instead of failing (e.g. 2 kv heads on a tensor axis of 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve `{data, fsdp, tensor}` sizes (one may be -1 = the remaining devices)."""
    sizes = [int(mesh_config[a]) for a in AXES]
    where = ", ".join(f"mesh.{a}={s}" for a, s in zip(AXES, sizes, strict=True))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Invalid mesh ({where}): each size must be a positive integer or -1.")
    if sizes.count(-1) > 1:
        raise ValueError(f"Invalid mesh ({where}): at most one axis may be -1 (the remainder).")
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
        raise ValueError(
            f"Mesh ({where}) does not divide the {num_devices} available devices: the product of "
            f"the fixed sizes ({known}) must divide {num_devices}. Set one axis to -1 to take the "
            "remaining devices, e.g. --config.mesh.data=-1."
        )
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"Mesh ({where}) uses {math.prod(sizes)} of {num_devices} devices; the sizes must "
            "multiply to the device count. Set one axis to -1 to take the remaining devices."
        )
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        shape,
        AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
        devices=devices,
    )


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_model_fits_mesh(model_config, mesh: jax.sharding.Mesh) -> None:
    """Activation dims that are sharded over `tensor` must divide evenly."""
    t = mesh.shape["tensor"]
    for name in ("n_heads", "mlp_dim", "vocab_size"):
        value = getattr(model_config, name)
        if value % t:
            raise ValueError(
                f"model.{name}={value} is not divisible by mesh.tensor={t}; choose a tensor-"
                f"parallel size that divides it (e.g. --config.mesh.tensor=1)."
            )


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (those dims are replicated instead)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axes is None:
            fitted.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        names = tuple(n for n in names if mesh.shape[n] > 1)
        size = math.prod(mesh.shape[n] for n in names)
        fitted.append(names if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def strip_boxes(tree: Any) -> Any:
    """Drop logical-partitioning boxes without applying sharding constraints."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def logical_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for a (possibly boxed) abstract pytree from its logical axis names.

    Boxed leaves (`nn.LogicallyPartitioned`) are sharded by `LOGICAL_RULES`; other leaves
    (step counters, rng keys, optimizer counts) are replicated. The result has the structure of
    the unboxed tree.
    """
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, LOGICAL_RULES)
    shapes = strip_boxes(abstract_tree)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, np.shape(x), mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batches are `[accum_steps, batch, ...]`: the batch dim splits over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_global(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
    """Assemble each process's `[A, local_B, ...]` arrays into global `[A, B, ...]` arrays,
    the batch dim split over `data` x `fsdp` (process i's rows are the i-th block)."""
    spec = batch_sharding(mesh)
    n = jax.process_count()

    def global_shape(v):
        return (v.shape[0], v.shape[1] * n, *v.shape[2:])

    return {
        k: jax.make_array_from_process_local_data(spec, np.asarray(v), global_shape(np.asarray(v)))
        for k, v in local_batch.items()
    }
