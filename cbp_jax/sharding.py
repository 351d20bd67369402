"""Running CBP on several devices: sharded seed sweeps and data-parallel training.

Nothing here is specific to one device kind: the helpers build a 1-D
`jax.sharding.Mesh` over all devices (`jax.make_mesh`) and place arrays on it
with `jax.sharding.NamedSharding`; `jax.jit` and XLA's SPMD partitioner do the
rest. CBP itself needs no change to run sharded.

Sharded sweeps
--------------
A sweep is ``jax.vmap(train)(keys)``: one independent run per seed. Laying the
leading (seed) axis of ``keys`` over the devices makes ``jax.jit`` of the
vmapped function run ``seeds / devices`` seeds on each device, with no
communication, and the same per-seed results as the unsharded run::

    mesh = cbp_jax.sharding.make_mesh("seeds")
    keys = cbp_jax.sharding.shard_leading_axis(jax.random.split(key, 64), mesh)
    finals = jax.jit(jax.vmap(train))(keys)        # sharded over seeds

`sharded_sweep` does exactly this. The number of seeds must be a multiple of
the number of devices.

Data-parallel training of one network
-------------------------------------
The global batch is split over the devices along its leading axis; parameters
and optimizer state (CBP's included) are replicated. The training step is the
ordinary single-device step under `jax.jit`; from the sharded inputs XLA
partitions it and inserts the collectives, so

* gradients are the mean over the *global* batch (an all-reduce);
* CBP's per-unit statistics (mean activation, ``|h - f_hat|``) are reductions
  over the batch axis of the activations, so they too are computed over the
  global batch (all-reduces), not per device;
* the weight magnitudes, the replacement count, the selection and the new
  weights are computed from replicated values and the *replicated* PRNG key in
  the CBP state, so every replica draws the same units and the same new
  weights: replicas never diverge, and the result equals the one-device run
  on the same global batch (to float rounding of the reductions)::

    mesh = cbp_jax.sharding.make_mesh("data")
    params, opt_state = cbp_jax.sharding.replicate((params, opt_state), mesh)
    step = cbp_jax.sharding.data_parallel(train_step, mesh)   # jit, replicated outputs
    for x, y in batches:
      x, y = cbp_jax.sharding.shard_batch((x, y), mesh)
      params, opt_state, loss = step(params, opt_state, x, y)

The meshes built here use ``AxisType.Auto`` (XLA propagates shardings through
the step; e.g. CBP's reshape of conv activations to ``(-1, units)`` needs no
annotation).

Multi-host (pods)
-----------------
The same code runs on a multi-host system with JAX's own machinery:

1. call ``jax.distributed.initialize()`` first in every process (on Cloud TPU
   and SLURM/Open MPI the coordinator address, process count and id are found
   automatically; otherwise pass them). ``jax.devices()`` then lists the
   devices of all hosts, and `make_mesh` builds one global mesh over them;
2. run the *same program* in every process (SPMD): the jitted step or sweep
   is compiled and run by every process on its own devices, and the
   collectives cross hosts;
3. replicated values (parameters, optimizer state, CBP's key) must be the
   same in every process: initialise them from the same seed in every
   process, then `replicate`. Seed keys for a sweep are likewise computed
   identically everywhere (``jax.random.split(key, n)``) before
   `shard_leading_axis`; each process only materialises the shards of its own
   devices;
4. each process usually loads only its part of the global batch: pass it to
   ``shard_batch(local_batch, mesh, process_local=True)``, which assembles the
   global array with ``jax.make_array_from_process_local_data`` (the global
   batch is the concatenation of the processes' parts, in process order);
5. bring results to the hosts with
   ``jax.experimental.multihost_utils.process_allgather`` (sharded sweep
   results) or by reading the replicated arrays' local shards
   (``x.addressable_data(0)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
  "data_parallel",
  "is_replicated_consistently",
  "leading_axis_sharding",
  "make_mesh",
  "replicate",
  "replicated_sharding",
  "shard_batch",
  "shard_leading_axis",
  "sharded_sweep",
]


def make_mesh(axis_name: str = "data", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices, of all processes).

  Args:
    axis_name: the mesh axis name (e.g. ``"seeds"`` or ``"data"``).
    devices: the devices to use; default ``jax.devices()``.

  Returns:
    A `jax.sharding.Mesh` of shape ``(len(devices),)`` with ``AxisType.Auto``.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices")
  return jax.make_mesh((len(devices),), (axis_name,), (AxisType.Auto,), devices=devices)


def _axis(mesh: Mesh, axis_name: str | None) -> str:
  if axis_name is None:
    if len(mesh.axis_names) != 1:
      raise ValueError(f"the mesh has axes {mesh.axis_names}; name the one to shard over (axis_name=...)")
    return mesh.axis_names[0]
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis '{axis_name}' is not in the mesh axes {mesh.axis_names}")
  return axis_name


def _check_leading(tree: Any, size: int, what: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = np.shape(leaf)
    where = jax.tree_util.keystr(path) or "the value"
    if len(shape) == 0:
      raise ValueError(f"{what}: {where} is a scalar; it has no leading axis to shard")
    if shape[0] % size:
      raise ValueError(
        f"{what}: leading axis of {where} has {shape[0]} entries, not a multiple of "
        f"the {size} devices of the mesh axis"
      )


def leading_axis_sharding(mesh: Mesh, axis_name: str | None = None) -> NamedSharding:
  """The sharding that splits an array's leading axis over ``axis_name``."""
  return NamedSharding(mesh, P(_axis(mesh, axis_name)))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding that keeps a full copy of an array on every device."""
  return NamedSharding(mesh, P())


def shard_leading_axis(tree: Any, mesh: Mesh | None = None, axis_name: str | None = None) -> Any:
  """Lays the leading axis of every leaf of ``tree`` over the mesh's devices.

  Works for typed PRNG key arrays too (e.g. ``jax.random.split(key, n)``).
  In a multi-process run every process must pass the same (global) value.

  Args:
    tree: a pytree of arrays sharing a leading axis (seeds, batch).
    mesh: the mesh; default `make_mesh` over all devices.
    axis_name: the mesh axis to shard over (default: the mesh's only axis).

  Returns:
    ``tree`` with every leaf a global `jax.Array` sharded along axis 0.

  Raises:
    ValueError: if a leaf is a scalar or its leading axis is not a multiple of
      the number of devices on the axis.
  """
  mesh = make_mesh() if mesh is None else mesh
  name = _axis(mesh, axis_name)
  _check_leading(tree, mesh.shape[name], "shard_leading_axis")
  return jax.device_put(tree, NamedSharding(mesh, P(name)))


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
  """Puts a full copy of every leaf of ``tree`` on every device of ``mesh``.

  In a multi-process run every process must pass the same value (e.g.
  parameters initialised from the same seed).
  """
  mesh = make_mesh() if mesh is None else mesh
  return jax.device_put(tree, replicated_sharding(mesh))


def shard_batch(
  batch: Any, mesh: Mesh | None = None, axis_name: str | None = None, *, process_local: bool = False
) -> Any:
  """Splits a batch (any pytree of arrays) along its leading axis over the devices.

  Args:
    batch: the global batch, or with ``process_local=True`` this process's
      part of it.
    mesh: the mesh; default `make_mesh` over all devices.
    axis_name: the mesh axis to shard over (default: the mesh's only axis).
    process_local: build the global batch from every process's local part
      (``jax.make_array_from_process_local_data``): multi-host data loading.

  Returns:
    The global batch, its leaves sharded `jax.Array` values.
  """
  mesh = make_mesh() if mesh is None else mesh
  name = _axis(mesh, axis_name)
  sharding = NamedSharding(mesh, P(name))
  if not process_local:
    _check_leading(batch, mesh.shape[name], "shard_batch")
    return jax.device_put(batch, sharding)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  _check_leading(batch, local_devices, "shard_batch(process_local=True)")
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def sharded_sweep(
  fn: Callable[..., Any], *args: Any, mesh: Mesh | None = None, axis_name: str | None = None
) -> Any:
  """Runs ``jax.jit(jax.vmap(fn))(*args)`` with the vmapped axis sharded over devices.

  Every argument is vmapped over its leading axis (e.g. per-seed keys and
  per-seed hyperparameters), which is laid over the devices; seeds are
  independent, so no communication happens and each seed's result is what
  the unsharded ``jax.vmap(fn)(*args)`` gives.

  Args:
    fn: the per-seed function, e.g. ``train(key)``.
    *args: its arguments, each with the seed axis first (seeds a multiple of
      the number of devices).
    mesh: the mesh; default `make_mesh` over all devices.
    axis_name: the mesh axis (default: the mesh's only axis).

  Returns:
    ``fn``'s outputs, stacked along a leading seed axis sharded over devices.
  """
  mesh = make_mesh("seeds") if mesh is None else mesh
  args = shard_leading_axis(args, mesh, axis_name)
  return jax.jit(jax.vmap(fn))(*args)


def data_parallel(
  step: Callable[..., Any], mesh: Mesh | None = None, *, donate_argnums: int | Sequence[int] = ()
) -> Callable[..., Any]:
  """``jax.jit(step)`` whose outputs are replicated over ``mesh``.

  Feed it replicated parameters/optimizer state (`replicate`) and a sharded
  batch (`shard_batch`): XLA partitions the step over the batch and inserts
  the all-reduces (gradients, CBP's activation statistics); the outputs
  (new parameters, optimizer state, metrics) are replicated, identical on
  every device.

  Args:
    step: the single-device training step, e.g.
      ``step(params, opt_state, x, y) -> (params, opt_state, loss)``.
    mesh: the mesh; default `make_mesh` over all devices.
    donate_argnums: passed to `jax.jit`.

  Returns:
    The jitted step.
  """
  mesh = make_mesh() if mesh is None else mesh
  return jax.jit(step, out_shardings=replicated_sharding(mesh), donate_argnums=donate_argnums)


def is_replicated_consistently(tree: Any) -> bool:
  """True if every addressable copy of every replicated leaf holds the same bits.

  A check that replicas did not diverge (e.g. after data-parallel CBP steps).
  Leaves that are not fully replicated are ignored.
  """
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array) or not leaf.sharding.is_fully_replicated:
      continue
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    shards = [np.asarray(s.data).tobytes() for s in leaf.addressable_shards]
    if any(s != shards[0] for s in shards[1:]):
      return False
  return True
