"""Device mesh, multi-host initialisation and batch sharding.

Everything runs under jit over a one-axis ('data') Mesh of all devices of all processes: batches are
sharded along the batch axis, parameters and optimiser state are replicated.
"""

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esm.errors import UserError

DATA_AXIS = 'data'
_initialised = False


def local_batch_size(global_batch_size: int) -> int:
  """This process's rows of a global batch, which must split evenly over the processes."""
  count = jax.process_count()
  if global_batch_size < 1 or global_batch_size % count:
    raise UserError(f'batch size {global_batch_size}: expected a positive multiple of the '
                    f'process count {count}')
  return global_batch_size // count


def initialise(parallel_cfg) -> None:
  """Joins a multi-process run when config.parallel names a coordinator (idempotent).

  With no coordinator, JAX's own auto-detection (TPU pods, SLURM) is used only when requested by
  num_processes > 1; a plain single process needs no initialisation.
  """
  global _initialised
  num_processes, process_id = parallel_cfg.num_processes, parallel_cfg.process_id
  if _initialised:
    return
  if parallel_cfg.coordinator:
    logging.info('jax.distributed.initialize(coordinator=%s, num_processes=%d, process_id=%d)',
                 parallel_cfg.coordinator, parallel_cfg.num_processes, parallel_cfg.process_id)
    jax.distributed.initialize(coordinator_address=parallel_cfg.coordinator,
                               num_processes=num_processes, process_id=process_id)
  elif num_processes > 1:
    logging.info('jax.distributed.initialize() with cluster auto-detection')
    jax.distributed.initialize()
    if jax.process_count() != num_processes:
      raise UserError(f'parallel.num_processes={num_processes}, but the cluster has '
                      f'{jax.process_count()} processes')
  _initialised = True
  if jax.process_count() > 1:
    logging.info('process %d of %d: %d local of %d devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh over `devices` (default: every device of every process).

  Devices are grouped by process, in process order, so that process p's rows of a global batch
  (datasets/pipeline.py) sit at the same positions as on a single host.
  """
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: d.process_index)  # stable: keeps the order within a host
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def with_sharding(abstract_tree, sharding):
  """ShapeDtypeStructs that carry `sharding`: checkpoints then restore onto this run's devices,
  whatever the number of processes and devices that wrote them."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract_tree)


def shard_batch(mesh: Mesh, local_batch):
  """Assembles each process's slice of the global batch into one globally sharded array tree."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def gather(tree):
  """Every process gets the full (global) value of each array, as numpy."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def is_main_process() -> bool:
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any (e.g. a SIGTERM that reached one host)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.bool_))))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (no-op in a single process)."""
  if jax.process_count() > 1:
      multihost_utils.sync_global_devices(name)
