"""What a run does when things go wrong: a non-finite loss, a signal, a long epoch to protect.

- `StepSums` adds up a phase's device sums on the host as the steps finish, without waiting for
  the one in flight, and checks each step's `finite` flag (tl_jax.training.steps.guard_nonfinite) as
  it reads it: a non-finite step is found a step or two after it ran, for no wait of the device.
- `SignalWatcher` turns SIGTERM and SIGINT into a stop after the step in flight (or at once where
  nothing is in progress), and a second one into an immediate exit.
- `SaveSchedule` says when `checkpoint_every` wants a mid-epoch checkpoint; `PhaseProgress` is what
  one holds of the epoch so far; `across_processes` makes every process of a run take the same
  decision at the same step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax import cli
from tl_jax.config import CheckpointEvery

SUM_KEYS = ('loss_sum', 'correct', 'count')
# Summed when a loss returns them: 'rows', the valid rows under a weighted loss whose count is their weight.
OPTIONAL_SUM_KEYS = ('rows',)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(RuntimeError):
  """A train step's loss, gradient norm or updated parameters were not finite (on_nonfinite: stop), at
  `step` of its epoch (None: every step of the epoch was, and was skipped)."""
  exit_code = 3   # not bad input (2): the recipe diverges on this data

  def __init__(self, message: str, step: Optional[int] = None, loss: float = float('nan')):
    super().__init__(message)
    self.step, self.loss = step, loss


class Preempted(cli.Stopped):
  """The run stopped on SIGTERM or SIGINT, its progress saved; exit status 128 + the signal's number."""


@dataclasses.dataclass
class PhaseProgress:
  """How far a phase got: its steps done, their metrics summed on the host in step order, the seconds
  the device starved for data and spent in the phase, and the steps skipped as non-finite. A
  mid-epoch checkpoint holds the train phase's, so the resumed epoch adds up to the uninterrupted one."""
  steps: int = 0
  totals: dict = dataclasses.field(default_factory=lambda: {k: 0.0 for k in SUM_KEYS})
  starved: float = 0.0
  seconds: float = 0.0
  skipped: int = 0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: dict) -> 'PhaseProgress':
    return cls(**{**values, 'totals': dict(values['totals'])})


def _ready(value: Any) -> bool:
  return not hasattr(value, 'is_ready') or value.is_ready()


def _host_float(value: Any) -> float:
  # The sums are replicated (global over devices and processes), so the local copy is the whole value.
  return float(np.asarray(value.addressable_data(0) if isinstance(value, jax.Array) else value))


class StepSums:
  """A phase's device sums, read in step order as their steps finish, into `progress`.

  `add` queues a step's sums and reads those whose step is done (`is_ready`, no wait); `read_all`
  waits for the rest. Reading a step whose `finite` flag is False raises NonFiniteError; a step
  whose `skipped` flag is set (on_nonfinite: skip_step) is counted.
  """

  def __init__(self, progress: PhaseProgress):
    self.progress = progress
    self.dispatched = progress.steps
    self._pending: collections.deque = collections.deque()

  def add(self, sums: dict) -> None:
    self._pending.append({k: sums[k] for k in (*SUM_KEYS, *OPTIONAL_SUM_KEYS, 'finite', 'skipped') if k in sums})
    self.dispatched += 1
    while self._pending and all(_ready(v) for v in self._pending[0].values()):
      self._read(self._pending.popleft())

  def read_all(self) -> PhaseProgress:
    while self._pending:
      self._read(self._pending.popleft())
    return self.progress

  def _read(self, sums: dict) -> None:
    step = self.progress.steps
    if 'finite' in sums and not _host_float(sums['finite']):
      loss = _host_float(sums['loss_sum']) / max(_host_float(sums['count']), 1.0)
      self._pending.clear()
      raise NonFiniteError('non-finite loss or gradient', step, loss)
    if 'skipped' in sums and _host_float(sums['skipped']):
      self.progress.skipped += 1
    for k in SUM_KEYS:
      self.progress.totals[k] += _host_float(sums[k])
    for k in OPTIONAL_SUM_KEYS:
      if k in sums:
        self.progress.totals[k] = self.progress.totals.get(k, 0.0) + _host_float(sums[k])
    self.progress.steps += 1


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  finite = jnp.bool_(True)
  for leaf in jax.tree_util.tree_leaves(tree):
    finite &= jnp.all(jnp.isfinite(leaf))
  return finite


def weights_finite(variables: Any) -> bool:
  """Whether every weight and BatchNorm statistic is finite: checked before each save, since a step
  with a finite loss and gradient can still make an update too large for float32. One pass over the
  weights per save, not per step."""
  return bool(_host_float(_all_finite(variables)))


def across_processes(*values: int) -> tuple[int, ...]:
  """Each value's maximum over the processes of the run, so that all take the same decision at the
  same step (every process must call this at the same points): a flag set in one is set in all, and a
  signal one of them got is the one all stop for. One process: the values themselves."""
  if jax.process_count() == 1:
    return tuple(int(v) for v in values)
  from jax.experimental import multihost_utils
  every = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))
  return tuple(int(v) for v in every.reshape(jax.process_count(), len(values)).max(axis=0))


class SaveSchedule:
  """When `checkpoint_every` asks for a mid-epoch checkpoint: after every `steps` train steps of the run
  (counted over the epochs, so a resumed run saves where the uninterrupted one would), or when
  `minutes` have passed since the last save. Not after an epoch's last step: its own checkpoint follows."""

  def __init__(self, every: Optional[CheckpointEvery], steps_per_epoch: int):
    self.every, self.steps_per_epoch = every, steps_per_epoch
    self.last_save = time.monotonic()

  def due(self, epoch: int, steps_done: int) -> bool:
    if self.every is None or steps_done >= self.steps_per_epoch:
      return False
    if self.every.steps is not None:
      return (epoch * self.steps_per_epoch + steps_done) % self.every.steps == 0
    return time.monotonic() - self.last_save >= 60 * self.every.minutes

  def saved(self) -> None:
    self.last_save = time.monotonic()


class SignalWatcher:
  """SIGTERM (a scheduler, a preempted VM) and SIGINT (Ctrl-C) while a run is in progress.

  Inside `deferred()` (an epoch's steps and saves) the first signal is only noted: the loop looks at
  `received` after each step, finishes the step in flight, saves and stops. Elsewhere (set-up,
  compiling, the final evaluation) everything is already saved, so it stops the run at once. A
  second signal exits the process at once. Installed only from the main thread (Python's rule);
  the previous handlers come back on exit.

  Args:
    saved: describes what a stop at once leaves (the latest checkpoint), for its message.
  """

  def __init__(self, saved: Callable[[], str]):
    self.signum: Optional[int] = None
    self._saved = saved
    self._deferring = False
    self._previous: dict = {}

  def __enter__(self) -> 'SignalWatcher':
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  @property
  def received(self) -> int:
    """The number of the signal this process got (0: none yet)."""
    return self.signum or 0

  @contextlib.contextmanager
  def deferred(self):
    self._deferring = True
    try:
      yield
    finally:
      self._deferring = False

  @staticmethod
  def stop(signum: int, message: str) -> Preempted:
    """The error that ends the run after signal `signum` (this process's or another's): `message` says
    where; the exit status is the signal's."""
    return Preempted(f'{signal.Signals(signum).name}: {message}', 128 + signum)

  def stop_at_once(self, signum: Optional[int] = None) -> Preempted:
    return self.stop(signum or self.received, f'stopped; the run is saved up to {self._saved()}; '
                     'continue it with --resume')

  def _handle(self, signum, frame) -> None:
    if self.signum is not None:
      # os.write: a print here could re-enter a print the main thread was in the middle of.
      os.write(2, f'{signal.Signals(signum).name} again: exiting at once, without saving\n'.encode())
      os._exit(128 + signum)
    self.signum = signum
    if not self._deferring:
      raise self.stop_at_once()
    name = signal.Signals(signum).name
    os.write(2, f'{name}: finishing the step in flight, then saving and stopping ({name} again exits at '
                'once)\n'.encode())
