"""A training run's directory: checks, the per-epoch run checkpoint for --resume, history.json, best/.

  WORKDIR/checkpoints/<epoch>/   train state (params, batch_stats, optimizer state, step) + JSON meta
                                 (the recipe, history, best so far) of the latest finished epoch
  WORKDIR/best/<epoch>/          the best-val-accuracy model checkpoint (tl_jax.checkpoint)
  WORKDIR/history.json           per-epoch rows and the run's summary, rewritten every epoch

Every write is atomic (orbax's managers, os.replace), so a run killed at any moment resumes from
its latest finished epoch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from tl_jax import checkpoint
from tl_jax.config import changed_keys


class RunError(ValueError):
  """A training run cannot start or resume as asked."""


def write_json(path: Path, obj: Any) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2))
  os.replace(tmp, path)


class RunDir:
  """The run directory of one training run.

  Args:
    workdir: the directory (created if missing).
    resume: continue the run found there; without it an existing run is refused (not overwritten).
    log: receives the lines printed about the directory.

  Raises:
    RunError before any slow step: a workdir that is a file or cannot be created, an existing run
    without `resume`.
  """

  def __init__(self, workdir: str | Path, resume: bool = False, log: Callable[[str], None] = print):
    self.path = Path(workdir).absolute()
    if self.path.exists() and not self.path.is_dir():
      raise RunError(f'--workdir {self.path} is a file, not a directory; choose another --workdir')
    try:
      self.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise RunError(f'--workdir {self.path} cannot be used as a run directory ({e.strerror or e}); '
                     'choose another --workdir') from e
    run_path = self.path / checkpoint.RUN_DIR
    has_run = run_path.is_dir() and any(p.name.isdigit() for p in run_path.iterdir())
    if has_run and not resume:
      raise RunError(f'{self.path} already holds a run; pass --resume to continue it or choose another --workdir')
    if resume and not has_run:
      log(f'no finished epoch in {self.path} to resume from; starting a new run')
    self.resuming = resume and has_run
    self._run = ocp.CheckpointManager(run_path, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
                                      item_names=('state', 'meta'))
    self._best = checkpoint.best_manager(self.path)

  # -- resume

  def latest_epoch(self) -> Optional[int]:
    return self._run.latest_step()

  def restore_meta(self) -> dict:
    """The JSON meta of the latest finished epoch: 'config', 'history', 'best_val_acc', 'best_epoch', ..."""
    step = self._run.latest_step()
    return dict(self._run.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])

  def check_recipe(self, saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuses to resume a run with another recipe, naming each key that changed."""
    changed = changed_keys(saved, now)
    if changed:
      raise RunError(f'--resume with a different recipe than the run in {self.path}: ' + '; '.join(changed) +
                     '. Resume with the run\'s own settings, or start a new run in another --workdir')

  def restore_state(self, template: Mapping[str, Any]) -> dict:
    """The latest epoch's train-state tree, restored into the structure and shardings of `template`."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, dict(template))
    step = self._run.latest_step()
    return self._run.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']

  # -- per epoch

  def save_epoch(self, epoch: int, state_tree: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """The run checkpoint of finished `epoch` (replaces the previous one once written)."""
    self._run.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(state_tree)),
                                                  meta=ocp.args.JsonSave(dict(meta))), force=True)
    self._run.wait_until_finished()

  def save_best(self, epoch: int, variables: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    checkpoint.save_best(self._best, epoch, dict(variables), dict(metadata))

  def write_history(self, summary: Mapping[str, Any]) -> None:
    write_json(self.path / 'history.json', summary)

  def load_best(self) -> checkpoint.ModelCheckpoint:
    return checkpoint.load_model(self.path)

  def close(self) -> None:
    self._run.close()
    self._best.close()
