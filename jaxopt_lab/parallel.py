"""Data-parallel training over every visible device with ``jax.sharding`` (one host or many).

The whole recipe is JAX's own: a 1-D :class:`jax.sharding.Mesh` over all devices, the batch placed
with ``NamedSharding(mesh, PartitionSpec("data"))`` (split on its leading axis), the train state with
``NamedSharding(mesh, PartitionSpec())`` (replicated), and the unchanged single-device ``train_step``
compiled by ``jax.jit`` with those shardings. XLA's SPMD partitioner then inserts the collectives: the
mean of a loss over the batch, the gradient, and the mean and variance of a ``BatchNorm`` over the
batch all become *global* reductions (an all-reduce across devices). So the data-parallel step computes
the same numbers as the single-device step on the whole batch — no ``pmap``, no ``axis_name``, no
hand-written ``psum`` — and gradient centralization or micro-batching inside ``train_step`` work as
they are.

On several hosts, call :func:`initialize_distributed` first (it wraps ``jax.distributed.initialize``);
each process then passes only its own slice of the global batch to :func:`shard_batch`, which builds
the global array with ``jax.make_array_from_process_local_data``.

>>> import jax, jax.numpy as jnp
>>> from jaxopt_lab import parallel
>>> mesh = parallel.data_parallel_mesh()
>>> step = parallel.data_parallel_step(lambda w, batch: w - 0.1 * jnp.mean(batch), mesh)
>>> round(float(step(jnp.float32(1.0), jnp.ones(8 * mesh.size))), 6)
0.9

References: the JAX guide "Distributed arrays and automatic parallelization"; the same layout as the
data axis of MaxText and t5x (``PartitionSpec("data")`` on the batch, replicated parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "batch_sharded",
    "batch_sharding",
    "data_parallel_mesh",
    "data_parallel_step",
    "initialize_distributed",
    "maybe_data_parallel_mesh",
    "replicate",
    "replicated_sharding",
    "shard_batch",
]

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs: Any) -> None:
    """Joins a multi-host run: ``jax.distributed.initialize`` (call once, before any other JAX call).

    On a managed cluster (SLURM, Cloud TPU, Kubernetes with the right env vars) all arguments may be
    left ``None`` and JAX detects them; otherwise give the coordinator's ``host:port``, the number of
    processes and this process's index. Afterwards ``jax.devices()`` lists the devices of every host,
    so :func:`data_parallel_mesh` spans them all.
    """
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named :data:`DATA_AXIS` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_parallel_mesh: devices must hold at least one device, got none")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def maybe_data_parallel_mesh(data_parallel: bool | None = None) -> Mesh | None:
    """The mesh to train on, or ``None`` for plain single-device training.

    Args:
      data_parallel: ``None`` (automatic) uses a mesh when more than one device is visible; ``True``
        always does (a 1-device mesh is valid, useful to test the path); ``False`` opts out.
    """
    if data_parallel is not None and not isinstance(data_parallel, bool):
        raise TypeError(f"maybe_data_parallel_mesh: data_parallel must be None, True or False, "
                        f"got {data_parallel!r}")
    if data_parallel is False or (data_parallel is None and jax.device_count() == 1):
        return None
    return data_parallel_mesh()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over the mesh's data axis; every other axis stays whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` (e.g. a train state) on all devices of ``mesh``."""
    return jax.device_put(tree, replicated_sharding(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Splits every array of ``batch`` on its leading axis across the mesh.

    ``batch`` holds this process's rows (on one host, the whole batch). Each leaf's leading size must be
    divisible by the number of this process's devices in the mesh, so every device gets an equal slice.
    """
    sharding = batch_sharding(mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def place(path: Any, leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
        if leaf.ndim == 0 or leaf.shape[0] % local_devices:
            where = jax.tree_util.keystr(path) or "batch"
            raise ValueError(f"shard_batch: {where} has shape {leaf.shape}; its leading (batch) axis must be "
                             f"divisible by the {local_devices} local devices of the mesh")
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree_util.tree_map_with_path(place, batch)


def data_parallel_step(train_step: Callable[[Any, Any], Any], mesh: Mesh, *,
                       donate_state: bool = False) -> Callable[[Any, Any], Any]:
    """Compiles ``train_step(state, batch)`` to run data-parallel over ``mesh``.

    The returned function takes the state (placed or not) and this process's batch, shards the batch
    on its leading axis, replicates the state, and returns ``train_step``'s outputs replicated. The
    numbers equal those of ``jax.jit(train_step)`` on the whole batch on one device, up to float
    reassociation in the cross-device sums.

    Args:
      train_step: a pure function ``(state, batch) -> anything``; reductions over the batch (loss means,
        ``BatchNorm`` statistics) become global reductions automatically.
      mesh: from :func:`data_parallel_mesh`.
      donate_state: donate the input state's buffers to the output (saves a copy of the parameters and
        optimizer state; the caller must not reuse the old state).
    """
    if not callable(train_step):
        raise TypeError(f"data_parallel_step: train_step must be callable, got {type(train_step).__name__}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"data_parallel_step: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    replicated = replicated_sharding(mesh)
    compiled = jax.jit(train_step, in_shardings=(replicated, batch_sharding(mesh)), out_shardings=replicated,
                       donate_argnums=(0,) if donate_state else ())

    def step(state: Any, batch: Any) -> Any:
        # device_put is free when the state is already replicated (every step after the first).
        return compiled(jax.device_put(state, replicated), shard_batch(batch, mesh))

    return step


def batch_sharded(train_step: Callable[[Any, Any], Any], mesh: Mesh) -> Callable[[Any, Any], Any]:
    """``train_step`` with its batch constrained to be split over the mesh, for use *inside* a jit.

    :func:`data_parallel_step` compiles one step per call. A training loop that is itself one jitted
    program (a ``lax.scan`` over mini-batches gathered from a device-resident data set, as
    :func:`jaxopt_lab.lab.training.fit` does) needs the sharding stated inside it instead:
    ``jax.lax.with_sharding_constraint`` on the batch makes XLA split each step's batch over the devices
    and all-reduce its batch statistics, as above. It composes with ``vmap`` (e.g. over seeds).
    """
    if not callable(train_step):
        raise TypeError(f"batch_sharded: train_step must be callable, got {type(train_step).__name__}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"batch_sharded: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    sharding = batch_sharding(mesh)

    def step(state: Any, batch: Any) -> Any:
        return train_step(state, jax.lax.with_sharding_constraint(batch, sharding))

    return step
