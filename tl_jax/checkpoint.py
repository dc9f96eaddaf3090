"""Orbax checkpoints: a model checkpoint (variables + metadata) and the training run's.

A *model checkpoint* is a directory with two orbax items, `variables` ({'params',
'batch_stats'}) and `metadata` (JSON: arch, num_classes, class names, preprocessing). The
convert script writes one; a training run keeps its best epoch as one under
`WORKDIR/best/<epoch>/` (same layout, managed by a CheckpointManager so the swap is
atomic); `load_model` accepts either, or the workdir itself.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = 'tl_jax.model/1'
BEST_DIR = 'best'
RUN_DIR = 'checkpoints'


class CheckpointError(ValueError):
  """A checkpoint directory is missing, incomplete or of another model."""


@dataclasses.dataclass
class ModelCheckpoint:
  variables: dict
  metadata: dict

  @property
  def arch(self) -> str:
    return self.metadata['arch']

  @property
  def num_classes(self) -> int:
    return int(self.metadata['num_classes'])

  @property
  def class_names(self) -> Optional[list[str]]:
    return self.metadata.get('class_names')


def make_metadata(arch: str, num_classes: int, preprocessing: dict,
                  class_names: Optional[list[str]] = None, **extra: Any) -> dict:
  if class_names is not None and len(class_names) != num_classes:
    raise CheckpointError(f'{len(class_names)} class names given for a {num_classes}-class model')
  return {'format': FORMAT, 'arch': arch, 'num_classes': int(num_classes),
          'class_names': list(class_names) if class_names is not None else None,
          'preprocessing': dict(preprocessing), **extra}


def failure_reason(error: BaseException) -> str:
  """One line on why orbax could not read or write: the first line of the innermost cause (tensorstore's
  `OUT_OF_RANGE: Error reading ... in OCDBT database ...`), or an OSError's reason (`No space left on device`)."""
  root = error
  while root.__cause__ is not None:
    root = root.__cause__
  if isinstance(root, OSError) and root.strerror:
    return root.strerror   # the file is one of orbax's own inside the checkpoint named with it
  lines = str(root).strip().splitlines()
  text = lines[0] if lines else type(root).__name__
  return text if len(text) <= 300 else text[:297] + '...'


def disk_full(error: BaseException) -> bool:
  """Whether `error` or one of its causes is ENOSPC (a full disk or quota)."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    seen = seen.__cause__ or seen.__context__
  return False


def attempt(action: Callable[[], Any]) -> tuple[Any, Optional[str], bool]:
  """(`action()`, None, False), or (None, reason, disk full) when orbax fails (it raises many types).

  The error is dropped here, with the traceback that holds orbax's pending background reads and
  writes, and collected while the interpreter runs: kept until shutdown, each of those printed a
  traceback ('Event loop is closed').
  """
  try:
    return action(), None, False
  except Exception as e:  # pylint: disable=broad-except
    reason, full = failure_reason(e), disk_full(e)
  gc.collect()
  return None, reason, full


def write_failed(what: str, path: Path, reason: str, full: bool, kept: str,
                 then: str = 'run again') -> CheckpointError:
  """The one-line error of a checkpoint that could not be written: what, where, why, what is intact
  and what to do."""
  hint = 'free space on that disk' if full else 'fix the cause'
  return CheckpointError(f'cannot write {what} {path}: {reason}. {kept}; {hint} and {then}')


def _host(tree):
  if jax.process_count() > 1:
    # Global arrays: orbax writes each process's part; NumPy copies would be written by all.
    return tree
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _model_args(variables: dict, metadata: dict) -> ocp.args.Composite:
  return ocp.args.Composite(variables=ocp.args.StandardSave(_host(variables)),
                            metadata=ocp.args.JsonSave(metadata))


def save_model(directory: str | Path, variables: dict, metadata: dict, overwrite: bool = False) -> Path:
  """Writes a model checkpoint to `directory` (orbax writes to a temp dir and renames)."""
  directory = Path(directory).absolute()
  existed = directory.exists()
  if existed and not overwrite:
    raise CheckpointError(f'{directory} already exists; choose another --out or remove it')

  def write():
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      checkpointer.save(directory, args=_model_args(variables, metadata), force=overwrite)

  _, reason, full = attempt(write)
  if reason is not None:
    raise write_failed('the checkpoint', directory, reason, full,   # orbax removes what it overwrites first
                       'The one there before was removed' if existed else 'Nothing was written')
  return directory


def best_manager(workdir: str | Path) -> ocp.CheckpointManager:
  """Keeps only the newest best epoch under WORKDIR/best/<epoch>/ (and removes what a save cut short left)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / BEST_DIR, options=options,
                               item_names=('variables', 'metadata'))


def save_best(manager: ocp.CheckpointManager, epoch: int, variables: dict, metadata: dict) -> None:
  """The best model so far as WORKDIR/best/<epoch>/; the previous best is removed once this one is whole."""
  previous = manager.latest_step()
  if epoch in manager.all_steps():
    # A run resumed in the epoch that saved it, killed before that epoch's run checkpoint: the epoch
    # ran again and replaces it (orbax refuses to save over a step).
    manager.delete(epoch)
    previous = manager.latest_step()

  def write():
    manager.save(epoch, args=_model_args(variables, metadata), force=True)
    manager.wait_until_finished()

  _, reason, full = attempt(write)
  if reason is not None:
    kept = f'The previous best, {BEST_DIR}/{previous}, is intact' if previous is not None else 'Nothing was written'
    raise write_failed('the best checkpoint', Path(manager.directory) / str(epoch), reason, full, kept,
                       'continue the run with --resume')


def resolve_model_dir(path: str | Path) -> Path:
  """A model checkpoint directory from a model dir, a `best/` dir or a training workdir."""
  path = Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f'checkpoint {path} does not exist; pass a directory written by '
                          'scripts/convert_weights.py or a training --workdir')
  if (path / 'metadata').is_dir() and (path / 'variables').is_dir():
    return path
  for candidate in (path / BEST_DIR, path):
    steps = sorted((int(p.name) for p in candidate.glob('*') if p.is_dir() and p.name.isdigit()))
    if steps:
      return candidate / str(steps[-1])
  raise CheckpointError(f'{path} holds no tl_jax model checkpoint (no variables/ and metadata/, '
                        f'and no {BEST_DIR}/<epoch>/); is training still in its first epoch?')


def load_model(path: str | Path, num_classes: Optional[int] = None) -> ModelCheckpoint:
  """Restores a model checkpoint; checks its class count against `num_classes` if given."""
  directory = resolve_model_dir(path)

  def read():
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(directory, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))

  restored, reason, _ = attempt(read)
  if reason is not None:
    raise CheckpointError(f'cannot read the checkpoint at {directory}: {reason}. It is damaged or incomplete '
                          '(a file cut short or missing); write it again, or use another checkpoint')
  metadata = dict(restored['metadata'])
  if metadata.get('format') != FORMAT:
    raise CheckpointError(f'{directory} is not a tl_jax model checkpoint (format {metadata.get("format")!r})')
  if num_classes is not None and int(metadata['num_classes']) != num_classes:
    raise CheckpointError(f'checkpoint {directory} has {metadata["num_classes"]} classes but '
                          f'{num_classes} were asked for')
  variables = {k: dict(v) for k, v in restored['variables'].items()}
  return ModelCheckpoint(variables=variables, metadata=metadata)


# The file orbax's JsonCheckpointHandler writes its item into (its default `filename`).
_JSON_FILE = 'metadata'


def update_metadata(path: str | Path, changes: dict) -> dict:
  """Merges `changes` into a model checkpoint's metadata, leaving its variables untouched; returns it.

  The metadata item is one JSON file; it is rewritten beside itself and renamed over the old one, so
  a reader sees the old or the new metadata, never half of either (what a fitted temperature needs:
  the weights stay as they are).
  """
  import json
  import os
  directory = resolve_model_dir(path)
  metadata = load_model(directory).metadata
  target = directory / 'metadata' / _JSON_FILE
  if not target.is_file():
    raise CheckpointError(f'cannot update the metadata of {directory}: {target} is missing; write the '
                          'checkpoint again')
  metadata.update(changes)
  tmp = target.with_name(f'.{_JSON_FILE}.{os.getpid()}.tmp')
  try:
    tmp.write_text(json.dumps(metadata))
    os.replace(tmp, target)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise write_failed('the metadata of', directory, e.strerror or str(e), disk_full(e),
                       'The checkpoint is unchanged') from e
  return metadata
