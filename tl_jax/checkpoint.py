"""Orbax checkpoints: a model checkpoint (variables + metadata) and the training run's.

A *model checkpoint* is a directory with two orbax items, `variables` ({'params',
'batch_stats'}) and `metadata` (JSON: arch, num_classes, class names, preprocessing). The
convert script writes one; a training run keeps its best epoch as one under
`WORKDIR/best/<epoch>/` (same layout, managed by a CheckpointManager so the swap is
atomic); `load_model` accepts either, or the workdir itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

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
  if directory.exists() and not overwrite:
    raise CheckpointError(f'{directory} already exists; choose another --out or remove it')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(directory, args=_model_args(variables, metadata), force=overwrite)
  return directory


def best_manager(workdir: str | Path) -> ocp.CheckpointManager:
  """Keeps only the newest best epoch under WORKDIR/best/<epoch>/."""
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / BEST_DIR, options=options,
                               item_names=('variables', 'metadata'))


def save_best(manager: ocp.CheckpointManager, epoch: int, variables: dict, metadata: dict) -> None:
  manager.save(epoch, args=_model_args(variables, metadata), force=True)
  manager.wait_until_finished()


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
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(directory, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for a damaged directory
    raise CheckpointError(f'cannot read the checkpoint at {directory}: {type(e).__name__}: {e}. '
                          'It may be incomplete or damaged; write it again.') from e
  metadata = dict(restored['metadata'])
  if metadata.get('format') != FORMAT:
    raise CheckpointError(f'{directory} is not a tl_jax model checkpoint (format {metadata.get("format")!r})')
  if num_classes is not None and int(metadata['num_classes']) != num_classes:
    raise CheckpointError(f'checkpoint {directory} has {metadata["num_classes"]} classes but '
                          f'{num_classes} were asked for')
  variables = {k: dict(v) for k, v in restored['variables'].items()}
  return ModelCheckpoint(variables=variables, metadata=metadata)
