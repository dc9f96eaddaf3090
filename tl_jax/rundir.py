"""A training run's directory: its lock, the run checkpoints for --resume, history.json, best/.

  WORKDIR/run.lock               who runs here (pid, host, start, command); one run per directory
  WORKDIR/checkpoints/<n>/       the newest `keep_checkpoints` run checkpoints, n counting the saves: train
                                 state (params, batch_stats, optimizer state, step) + JSON meta (the recipe,
                                 history, best so far, the epoch and, saved mid-epoch, how far it got)
  WORKDIR/checkpoints.damaged/   run checkpoints that did not restore, set aside by --resume
  WORKDIR/best/<epoch>/          the best-val-accuracy model checkpoint (tl_jax.checkpoint)
  WORKDIR/history.json           per-epoch rows and the run's summary, rewritten every epoch
  WORKDIR/stop.json              why the run stopped, while it stopped on a non-finite loss

Every write is atomic (orbax writes a checkpoint to a temporary directory and renames it; os.replace),
so a run killed at any moment, or a full disk, leaves the previous checkpoint whole.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from tl_jax import checkpoint, parallel
from tl_jax.config import NONFINITE_RETRY_KEYS, RUNTIME_KEYS, ConfigError, changed_keys, validate

DAMAGED_DIR = 'checkpoints.damaged'
STOP_FILE = 'stop.json'


class RunError(ValueError):
  """A training run cannot start or resume as asked."""


def write_json(path: Path, obj: Any) -> None:
  """`obj` as `path`, whole or not at all (a full disk leaves the previous file)."""
  tmp = path.with_name(path.name + '.tmp')
  try:
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise RunError(f'cannot write {path}: {e.strerror or e}; '
                   f'{"free space on that disk" if e.errno == errno.ENOSPC else "fix the cause"} and run again '
                   'with --resume') from None


class RunLock:
  """One run per directory: an exclusive `flock` on WORKDIR/run.lock (run.lock.<p> for process p > 0).

  The kernel drops the lock of a process that dies however it dies, so a lock file whose holder is
  gone is stale: it is taken over, with a warning naming the process that left it. A clean end empties
  the file. On a file system without locks the holder's pid is checked instead (same host only).
  """

  def __init__(self, directory: Path, log: Callable[[str], None]):
    index = jax.process_index()
    self.path = directory / ('run.lock' if index == 0 else f'run.lock.{index}')
    self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      holder = self._acquire()
    except BaseException:
      os.close(self._fd)
      self._fd = None
      raise
    if holder:
      log(f'warning: took over {self.path} from {_describe(holder)}, which ended without releasing it '
          '(killed, or its machine went down); its checkpoints are resumed as they are')
    me = {'pid': os.getpid(), 'host': socket.gethostname(), 'process': index,
          'started': datetime.datetime.now().isoformat(timespec='seconds'), 'command': ' '.join(sys.argv)}
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(me).encode(), 0)
    os.fsync(self._fd)

  def _read(self) -> Optional[dict]:
    data = os.pread(self._fd, 65536, 0)
    try:
      return json.loads(data) if data.strip() else None
    except ValueError:
      return {'pid': '?', 'host': '?'}

  def _acquire(self) -> Optional[dict]:
    """Locks; returns the stale holder's record, if a process left one. RunError if the holder runs."""
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RunError(f'{self.path.parent} is in use by {_describe(self._read())}; wait for it to end, stop it, '
                     'or choose another --workdir') from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      holder = self._read()
      if holder and _alive(holder):
        raise RunError(f'{self.path.parent} is in use by {_describe(holder)}; wait for it to end, stop it, '
                       'or choose another --workdir') from None
      return holder
    return self._read()

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    os.close(self._fd)   # drops the flock
    self._fd = None


def _describe(holder: Optional[Mapping[str, Any]]) -> str:
  if not holder:
    return 'another process'
  return (f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started', '?')}: "
          f"{holder.get('command', '?')})")


def _alive(holder: Mapping[str, Any]) -> bool:
  """Whether the holder still runs, where that can be told (its host is this one); elsewhere assumed so."""
  if holder.get('host') != socket.gethostname():
    return True
  try:
    os.kill(int(holder['pid']), 0)
  except (ProcessLookupError, ValueError, KeyError):
    return False
  except PermissionError:
    return True
  return True


@dataclasses.dataclass
class Restored:
  """A run checkpoint read back: its JSON meta, the train-state tree, and where it was."""
  meta: dict
  state: dict
  path: Path


class RunDir:
  """The run directory of one training run.

  Args:
    workdir: the directory (created if missing).
    resume: continue the run found there; without it an existing run is refused (not overwritten).
    log: receives the lines printed about the directory.
    keep: run checkpoints kept (the recipe's keep_checkpoints).

  Raises:
    RunError before any slow step: a workdir that is a file or cannot be created, one in use by a
    running process, an existing run without `resume`.
  """

  def __init__(self, workdir: str | Path, resume: bool = False, log: Callable[[str], None] = print,
               keep: int = 2):
    self.path = Path(workdir).absolute()
    self.log = log
    if self.path.exists() and not self.path.is_dir():
      raise RunError(f'--workdir {self.path} is a file, not a directory; choose another --workdir')
    try:
      self.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise RunError(f'--workdir {self.path} cannot be used as a run directory ({e.strerror or e}); '
                     'choose another --workdir') from e
    self._lock = RunLock(self.path, log)
    try:
      self._open(resume, keep)
    except BaseException:
      self._lock.release()
      raise

  def _open(self, resume: bool, keep: int) -> None:
    run_path = self.path / checkpoint.RUN_DIR
    has_run = run_path.is_dir() and any(p.name.isdigit() for p in run_path.iterdir())
    if has_run and not resume:
      raise RunError(f'{self.path} already holds a run; pass --resume to continue it or choose another --workdir')
    if resume and not has_run:
      self.log(f'no finished epoch in {self.path} to resume from; starting a new run')
    self.resuming = resume and has_run
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    self._run = ocp.CheckpointManager(run_path, options=options, item_names=('state', 'meta'))
    self._best = checkpoint.best_manager(self.path)
    # The id of the next save. Ids count saves, so every process of a run numbers them alike.
    latest = self._run.latest_step()
    self._next = 0 if latest is None else latest + 1
    stop_path = self.path / STOP_FILE
    self.stopped = json.loads(stop_path.read_text()) if self.resuming and stop_path.is_file() else None

  # -- resume

  def checkpoint_path(self, step: int) -> Path:
    return Path(self._run.directory) / str(step)

  def restore_meta(self, step: int) -> dict:
    """The JSON meta of run checkpoint `step`: 'config', 'history', 'best_val_acc', 'best_epoch', ..."""
    return dict(self._run.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])

  def restore_state(self, step: int, template: Mapping[str, Any]) -> dict:
    """Run checkpoint `step`'s train-state tree, restored into the structure and shardings of `template`."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, dict(template))
    return self._run.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']

  def restore(self, template_for: Callable[[dict], Mapping[str, Any]]) -> Optional[Restored]:
    """The newest run checkpoint that restores (None: there is none).

    Args:
      template_for: a checkpoint's meta -> the train-state tree to restore it into (the structure of
        its stage's optimizer). Its errors (another recipe) are raised, not taken for damage.

    A checkpoint that does not restore (a file cut short or missing) is named with the reason and
    set aside in checkpoints.damaged/; RunError when none restores.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(self._run.all_steps(), reverse=True):
      meta, reason, _ = checkpoint.attempt(lambda: self.restore_meta(step))
      if reason is None:
        template = template_for(meta)
        state, reason, _ = checkpoint.attempt(lambda: self.restore_state(step, template))
      if reason is None:
        self._set_aside([s for s, _ in failed])
        if failed:
          self.log(f'resuming from {self.checkpoint_path(step)}, the newest checkpoint that restores')
        return Restored(meta, state, self.checkpoint_path(step))
      self.log(f'warning: checkpoint {self.checkpoint_path(step)} does not restore: {reason}')
      failed.append((step, reason))
    if failed:
      raise RunError(f'no checkpoint in {self.path / checkpoint.RUN_DIR} restores (' +
                     '; '.join(f'{step}: {reason}' for step, reason in failed) +
                     '); start the run again in another --workdir')
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged checkpoints out of the rotation, so they do not count among the kept ones."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.path / DAMAGED_DIR
      aside.mkdir(exist_ok=True)
      for step in steps:
        target, n = aside / str(step), 1
        while target.exists():
          n += 1
          target = aside / f'{step}-{n}'
        os.replace(self.checkpoint_path(step), target)
        self.log(f'moved the damaged checkpoint {self.checkpoint_path(step)} to {target}')
    parallel.wait_for_all('tl_jax: damaged checkpoints set aside')
    self._run.reload()

  def check_recipe(self, saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuses to resume a run with another recipe, naming each key that changed. After a stop on a
    non-finite loss the optimizer's hyperparameters and on_nonfinite may change (and are named)."""
    try:   # a run saved before a key existed has its default
      saved = validate(saved).to_dict()
    except ConfigError:
      pass
    retry_keys = NONFINITE_RETRY_KEYS if self.stopped and self.stopped.get('reason') == 'nonfinite' else ()
    changed = changed_keys(saved, now, ignore=RUNTIME_KEYS + retry_keys)
    if changed:
      raise RunError(f'--resume with a different recipe than the run in {self.path}: ' + '; '.join(changed) +
                     '. Resume with the run\'s own settings, or start a new run in another --workdir')
    retried = changed_keys(saved, now) if retry_keys else []
    if retried:
      self.log('resuming after the stop on a non-finite loss with ' + '; '.join(retried))

  # -- saving

  def save(self, state_tree: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """A new run checkpoint (at an epoch's end or within one); the oldest beyond `keep` is removed once
    this one is whole. A failure (a full disk) raises one CheckpointError naming the path."""
    step, previous = self._next, self._run.latest_step()

    def write():
      self._run.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(state_tree)),
                                                   meta=ocp.args.JsonSave(dict(meta))), force=True)
      self._run.wait_until_finished()

    _, reason, full = checkpoint.attempt(write)
    if reason is not None:
      kept = (f'The previous one, {self.checkpoint_path(previous)}, is intact' if previous is not None
              else 'No run checkpoint was written')
      raise checkpoint.write_failed('the run checkpoint', self.checkpoint_path(step), reason, full, kept,
                                    'continue the run with --resume')
    self._next += 1
    if self.stopped:   # a new finite state: the stop on a non-finite loss is behind us
      (self.path / STOP_FILE).unlink(missing_ok=True)
      self.stopped = None
    return self.checkpoint_path(step)

  def latest_path(self) -> Optional[Path]:
    latest = self._run.latest_step()
    return None if latest is None else self.checkpoint_path(latest)

  def save_best(self, epoch: int, variables: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    checkpoint.save_best(self._best, epoch, dict(variables), dict(metadata))

  def write_history(self, summary: Mapping[str, Any]) -> None:
    write_json(self.path / 'history.json', summary)

  def record_stop(self, record: Mapping[str, Any]) -> None:
    """Why the run stopped on a non-finite loss (each process writes it: --resume reads its own)."""
    write_json(self.path / STOP_FILE, dict(record))

  def load_best(self) -> checkpoint.ModelCheckpoint:
    return checkpoint.load_model(self.path)

  def close(self) -> None:
    """Closes the checkpoint managers and releases the lock (again: nothing)."""
    if not self._lock.held:
      return
    try:
      for manager in (self._run, self._best):
        # After a failed save orbax raises that failure again here; it was reported when it happened.
        checkpoint.attempt(manager.close)
    finally:
      self._lock.release()
