"""Data parallelism with ``jax.sharding``: one ``Mesh`` over a ``data`` axis.

The trainer is written for one global batch; sharding only says where its pieces live.
The batch is split over the ``data`` axis, everything else (params, optimizer state,
``quant_stats``, ``batch_stats``, the dataset) is replicated. Under ``jax.jit`` the
compiler inserts the cross-device reductions the global computation needs, so an
observer's min/max, a BatchNorm's batch mean and the loss are taken over the whole
global batch: every replica holds the same ranges and statistics as a one-device run
(up to the order of float sums).

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize`` when the
process is one of several (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``, or a Slurm / Open MPI launch, which JAX detects itself); each host
then holds the whole dataset and feeds its own devices' part of every batch.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed() -> bool:
  """``jax.distributed.initialize()`` when launched as one of several processes.

  Returns whether it was called. Must run before any JAX computation."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
        process_id=int(env.get("JAX_PROCESS_ID", "0")),
    )
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()  # JAX reads the cluster from Slurm's / Open MPI's variables
    return True
  return False


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: every device of every host)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Sharding of an array whose axis ``batch_axis`` is the batch."""
  return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))


def check_divisible(mesh: Mesh, batch_size: int, what: str = "batch size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{what} {batch_size} is not divisible by the {n} devices of the data mesh; "
                     f"use a multiple of {n}")


def put(tree: Any, sharding: NamedSharding) -> Any:
  """``tree``'s arrays as global arrays with ``sharding``, from host or device values.

  Every process passes the same full values (the dataset, the initial state); on one
  host this is ``jax.device_put``, on several each process places its own shards."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree)
