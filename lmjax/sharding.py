"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: `data` (pure data parallel: parameters replicated), `fsdp` (data parallel with
parameters, gradients and optimizer state sharded along their `embed` axis), `tensor`
(Megatron-style: heads and MLP hidden units split across devices). A laptop, a simulated
8-device CPU and a TPU pod slice run the same code; only MeshConfig changes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmjax.errors import require

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters use the bare names; activations the act_* names,
# so that a parameter's embed axis can be sharded (fsdp) while the residual stream's is not.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 to take all remaining devices."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = self.sizes
    for name, size in zip(MESH_AXES, sizes):
      require(isinstance(size, int) and (size >= 1 or size == -1),
              f"mesh.{name}={size!r} is invalid: use a positive integer, or -1 for 'the rest'.")
    require(sum(s == -1 for s in sizes) <= 1,
            f"mesh {dict(zip(MESH_AXES, sizes))} has more than one -1; at most one axis can "
            "take the remaining devices.")

  @property
  def sizes(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  def resolve(self, n_devices: int) -> tuple[int, int, int]:
    sizes = list(self.sizes)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      require(n_devices % known == 0,
              f"mesh {dict(zip(MESH_AXES, self.sizes))} cannot fill {n_devices} devices: "
              f"{n_devices} is not a multiple of {known}; change the mesh sizes.")
      sizes[sizes.index(-1)] = n_devices // known
    require(math.prod(sizes) == n_devices,
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
            f"{n_devices} are available; make data*fsdp*tensor = {n_devices} "
            "(or set one axis to -1).")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = cfg.resolve(len(devices))
  # Auto axis types: linen's logical partitioning relies on GSPMD propagation, which the
  # Explicit default of jax.make_mesh breaks.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def is_cpu(mesh: Mesh) -> bool:
  """Whether the mesh's devices are CPUs (XLA:CPU's compiler and runtime)."""
  return mesh.devices.flat[0].platform == "cpu"


def _as_tuple(mesh_axes: Any) -> tuple[str, ...]:
  """A rules-table entry (None, "axis" or a tuple of axes) as a tuple of mesh axes."""
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _mesh_axes_for(name: str | None, rules) -> tuple[str, ...]:
  return next((_as_tuple(axes) for logical, axes in rules if logical == name), ())


def logical_to_mesh_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules=LOGICAL_RULES) -> P:
  """PartitionSpec for an array with these logical axis names.

  A dimension the mesh axes do not divide is left replicated (with a log line) rather than
  failing: e.g. a 65-token vocabulary on tensor=8.
  """
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = tuple(a for a in _mesh_axes_for(name, rules) if mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      logging.log_first_n(logging.INFO, "logical axis %r (size %d) not divisible by mesh axes "
                          "%s (%d): replicated", 8, name, dim, axes, size)
      axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def tree_shardings(abstract_boxed_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for the unboxed version of a tree whose leaves may be nn.Partitioned."""
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, logical_to_mesh_spec(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches: leading (row) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def activation_rules(mesh: Mesh, rules=LOGICAL_RULES) -> tuple:
  """Rules for nn.logical_axis_rules, with axes of size 1 dropped (no-op constraints)."""
  out = []
  for logical, axes in rules:
    axes_t = tuple(a for a in _as_tuple(axes) if mesh.shape[a] > 1)
    out.append((logical, axes_t[0] if len(axes_t) == 1 else (axes_t or None)))
  return tuple(out)


def per_device_bytes(tree: Any) -> int:
  """Bytes of `tree` held by the first device: what fsdp is meant to shrink."""
  dev = jax.devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == dev:
        total += int(np.prod(shard.data.shape)) * leaf.dtype.itemsize
  return total


def global_batch_from_local(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded over data x fsdp.

  With one process this is a device_put; with several, each contributes its own rows
  (process p holds rows [p*B/P, (p+1)*B/P)), and no host ever holds the whole batch.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return {k: jax.device_put(v, sharding) for k, v in local.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
