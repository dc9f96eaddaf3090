"""Data parallelism over devices and processes with jax.sharding and jax.distributed.

One `data` mesh axis over every device of every process: the batch is split along it
(`NamedSharding(mesh, P('data'))`), params, optimizer state and BatchNorm statistics are
replicated (`P()`). Under jit a mean over the batch axis of a sharded array is a mean over
the global batch, so the model's BatchNorm computes torch's SyncBatchNorm statistics and the
masked loss sums are global sums, with no collective written here.

Several processes (machines) join through `jax.distributed` (`initialize_distributed`); each
process feeds only its own rows of every global batch (`process_positions`, `shard_batch`),
and the jitted steps return replicated sums that every process reads alike.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tl_jax import xla_defaults

DATA_AXIS = 'data'


class ParallelError(ValueError):
  """Devices, processes or batch sizes that cannot run as asked."""


# ---------------------------------------------------------------------------- processes


def _cluster_detected() -> Optional[str]:
  """The name of a cluster environment JAX auto-detects (SLURM, Kubernetes, cloud TPU, MPI), if any."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  try:  # jax's own detection; private, so a layout change only disables auto-detection
    from jax._src.clusters import ClusterEnv
    for env in ClusterEnv._cluster_types:
      if not env.opt_in_only_method and env.is_env_present():
        return env.__name__
  except Exception:  # pylint: disable=broad-except
    return None
  return None


def _split_address(coordinator: str) -> tuple[str, int]:
  host, sep, port = coordinator.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ParallelError(f'--coordinator {coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234)')
  return host.strip('[]'), int(port)


def _wait_reachable(host: str, port: int, timeout_s: float) -> None:
  """Polls a TCP connect to the coordinator; JAX's own client aborts the process (no exception)
  when it cannot register, so an unreachable coordinator is detected here first."""
  deadline = time.monotonic() + timeout_s
  last: Optional[OSError] = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
        return
    except OSError as e:
      last = e
      time.sleep(0.2)
  raise ParallelError(f'coordinator {host}:{port} not reachable within {timeout_s:g}s '
                      f'({getattr(last, "strerror", None) or last}); start process 0 first, check the '
                      'address and the firewall, or raise --distributed-timeout')


def _check_bindable(port: int) -> None:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(('', port))
    except OSError as e:
      raise ParallelError(f'process 0 cannot listen on coordinator port {port} ({e.strerror or e}); '
                          'choose a free port in --coordinator') from e


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *, timeout_s: float = 60.0,
                           heartbeat_timeout_s: int = 30, shutdown_timeout_s: int = 60) -> bool:
  """Joins a multi-process run; returns whether one was joined (False: a single process).

  Args:
    coordinator: HOST:PORT of process 0 (it listens there). With `num_processes` and `process_id`,
      or none of the three to let JAX read them from a cluster environment it detects
      (SLURM, Kubernetes, cloud TPU, MPI, or JAX_COORDINATOR_ADDRESS); nothing given and no such
      environment: one process, nothing to do.
    num_processes: processes in the run.
    process_id: this process, 0..num_processes-1.
    timeout_s: how long to wait for the coordinator and the other processes.
    shutdown_timeout_s: how long a process that ends (normally or by an error) waits for the others
      at JAX's shutdown barrier; a process stuck in a collective with one that ended is stopped then.
    heartbeat_timeout_s: a process silent for this long is declared dead and JAX stops the others
      (JAX prints "Terminating process because the JAX distributed service detected fatal errors").
  """
  flags = {'--coordinator': coordinator, '--num-processes': num_processes, '--process-id': process_id}
  given = [k for k, v in flags.items() if v is not None]
  if not given:
    cluster = _cluster_detected()
    if cluster is None:
      return False
    jax.distributed.initialize(initialization_timeout=int(max(timeout_s, 1)),
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                               shutdown_timeout_seconds=int(shutdown_timeout_s))
    return True
  if len(given) != len(flags):
    missing = [k for k in flags if k not in given]
    raise ParallelError(f'{", ".join(given)} given without {", ".join(missing)}: a multi-process run needs '
                        'all three (or none, to use the cluster environment)')
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ParallelError(f'--process-id {process_id} with --num-processes {num_processes}: the id must be '
                        f'in 0..{num_processes - 1}')
  host, port = _split_address(coordinator)
  if num_processes == 1:
    return False
  if process_id == 0:
    _check_bindable(port)
  else:
    _wait_reachable(host, port, timeout_s)
  jax.distributed.initialize(coordinator, num_processes, process_id,
                             initialization_timeout=int(max(timeout_s, 1)),
                             heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                             shutdown_timeout_seconds=int(shutdown_timeout_s))
  return True


def wait_for_all(name: str) -> None:
  """Blocks until every process gets here (nothing to do in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
  """Only process 0 writes history, plots and logs."""
  return jax.process_index() == 0


# ---------------------------------------------------------------------------- mesh and shardings


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D `data` mesh over every device of every process, or the first `num_devices` local ones.

  Choosing fewer devices (`--devices N`) is for one process; a multi-process run uses them all.
  """
  available = jax.local_device_count()
  if num_devices is None:
    devices = jax.devices()
  else:
    if jax.process_count() > 1 and num_devices != available:
      raise ParallelError(f'--devices {num_devices}: a multi-process run uses every local device '
                          f'({available} here); leave --devices out')
    if not 1 <= num_devices <= available:
      raise ParallelError(f'--devices {num_devices}: this machine has {available} '
                          f'{jax.local_devices()[0].platform} device(s); choose 1..{available}')
    devices = jax.local_devices()[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def nearest_valid_batch_sizes(batch_size: int, num_devices: int) -> tuple[int, ...]:
  """The multiples of `num_devices` just below and above `batch_size` (the one below only if >= 1)."""
  below = batch_size // num_devices * num_devices
  return tuple(b for b in (below, below + num_devices) if b >= num_devices)


def check_batch_size(batch_size: int, num_devices: int, what: str = '--batch-size') -> int:
  """`batch_size` rows per device; an error naming the nearest valid sizes if it does not divide."""
  if batch_size < 1 or batch_size % num_devices:
    sizes = ' or '.join(str(b) for b in nearest_valid_batch_sizes(max(batch_size, 1), num_devices))
    raise ParallelError(f'{what} {batch_size} does not split evenly over {num_devices} devices; '
                        f'use {sizes} (a multiple of {num_devices}), or fewer --devices')
  return batch_size // num_devices


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf, whole, on every device of `mesh` (all processes must pass the same values).

  Do this to the initial train state before the first step: a state on a single device has
  another sharding, and the step would compile a second time on its second call.
  """
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map(put, tree)


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays split over `data`.

  Each process passes only its own rows (`local batch = global batch / process count`, in
  process order); JAX assembles the global batch without moving rows between processes.
  """
  sharding = batch_sharded(mesh)
  out = {}
  for name, local in local_batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def process_positions(num_samples: int, global_batch: int, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> list[np.ndarray]:
  """Per global batch, the positions in the epoch's order that this process loads (-1: padding).

  Global batch b holds positions b*B .. b*B+B-1 of the epoch's (seeded, global) order, padded
  past the end; process p loads rows p*B/P .. (p+1)*B/P-1 of it. The parts are disjoint, cover
  the epoch, and keep each sample's position, so its augmentation (seeded by position) is the
  same whatever the process count.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local = check_batch_size(global_batch, process_count, 'global batch size')
  num_batches = -(-num_samples // global_batch)
  positions = np.arange(num_batches * global_batch).reshape(num_batches, global_batch)
  positions = positions[:, process_index * local:(process_index + 1) * local]
  return list(np.where(positions < num_samples, positions, -1))


# ---------------------------------------------------------------------------- steps


def jit_train_step(step: Callable, mesh: Mesh, donate: bool = True, **step_kwargs) -> Callable:
  """`step(state, batch, **step_kwargs) -> (state, sums)` jitted with explicit shardings.

  State in and out replicated, batch split over `data`, sums replicated (so every process
  reads the global sums). E.g. `jit_train_step(train.train_step, mesh, model=model,
  trainable=trainable, bn_train=True)`.
  """
  rep, split = replicated(mesh), batch_sharded(mesh)
  return jax.jit(functools.partial(step, **step_kwargs), in_shardings=(rep, split),
                 out_shardings=(rep, rep), donate_argnums=(0,) if donate else ())


def jit_eval_step(step: Callable, mesh: Mesh, compiler_options: Optional[dict] = None,
                  **step_kwargs) -> Callable:
  """`step(state, batch, **step_kwargs) -> sums` jitted with explicit shardings.

  Scalars come out replicated; per-row outputs (e.g. 'predictions') stay split over `data`
  (read them with `gather_rows`). `compiler_options` default to the forward-only step's
  (tl_jax.xla_defaults: XLA:CPU runs it faster without YNNPACK's fusions); {} keeps the process's.
  """
  rep, split = replicated(mesh), batch_sharded(mesh)

  def out_sharding(out):
    return jax.tree_util.tree_map(lambda x: rep if np.ndim(x) == 0 else split, out)

  fn = functools.partial(step, **step_kwargs)
  if compiler_options is None:
    compiler_options = xla_defaults.forward_compiler_options()
  # out_shardings must mirror the output's structure; trace once abstractly to learn it.
  return _LazyShardedJit(fn, (rep, split), out_sharding, compiler_options)


class _LazyShardedJit:
  """jax.jit whose out_shardings follow the output tree, learnt from the first call's shapes."""

  def __init__(self, fn, in_shardings, out_sharding_of, compiler_options=None):
    self._fn, self._in, self._out_of, self._jitted = fn, in_shardings, out_sharding_of, None
    self._options = compiler_options or None

  def _get(self, *args):
    if self._jitted is None:
      shapes = jax.eval_shape(self._fn, *args)
      self._jitted = jax.jit(self._fn, in_shardings=self._in, out_shardings=self._out_of(shapes),
                             compiler_options=self._options)
    return self._jitted

  def __call__(self, *args):
    return self._get(*args)(*args)

  def lower(self, *args):
    return self._get(*args).lower(*args)

  def _cache_size(self) -> int:
    return 0 if self._jitted is None else self._jitted._cache_size()  # pylint: disable=protected-access


def host_sums(sums: Mapping[str, Any]) -> dict[str, float]:
  """Replicated scalar sums -> floats; each process reads the same (already global) values."""
  return {k: float(np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v))
          for k, v in sums.items() if np.ndim(v) == 0}


def gather_rows(x: jax.Array) -> np.ndarray:
  """A batch-split array (e.g. predictions) whole on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(mesh: Mesh) -> str:
  """One line for the log: devices, processes, platform."""
  devices = mesh.devices.reshape(-1)
  return (f'{len(devices)} {devices[0].platform} device(s) over {jax.process_count()} process(es), '
          f'{jax.local_device_count()} here')


def host_local_order(order: Sequence[int], positions: np.ndarray) -> np.ndarray:
  """Dataset indices for `positions` (from `process_positions`) in an epoch's `order`; -1 stays padding."""
  order = np.asarray(order)
  return np.where(positions >= 0, order[np.maximum(positions, 0)], -1)
