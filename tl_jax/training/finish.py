"""The end of a run: the best weights back in the state, figures and the evaluation of the best
checkpoint (by process 0 alone)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from tl_jax import checkpoint, evaluate, inference
from tl_jax.config import Config
from tl_jax.data.loader import Loader
from tl_jax.rundir import RunDir
from tl_jax.training.pipeline import Pipeline, spread_sample_loader
from tl_jax.training.state import TrainState


@dataclasses.dataclass
class TrainResult:
  history: list[dict]
  best_val_acc: float
  best_epoch: int
  compile_seconds: dict[str, float]
  state: TrainState
  class_names: list[str]
  workdir: Path


def _val_label(source: Mapping[str, Any]) -> str:
  """Where the val samples come from, in a few words: a folder, a TFDS split, or a split folder's share."""
  if source['kind'] == 'tfds':
    return f"tfds:{source.get('name')} {source['splits']['val']}"
  if source['kind'] == 'folder':
    return str(Path(source['path']) / 'val')
  return f"{source['path']} (val split)"


def final_outputs(model, variables: Mapping, pipeline: Pipeline, config: Config, run: RunDir,
                  history: list[dict], best_epoch: int, plots: bool, report: bool,
                  log: Callable[[str], None]) -> None:
  """predictions.png, curves.png and the evaluation of the best checkpoint, by process 0 alone."""
  data, transforms = pipeline.data, pipeline.transforms
  # Every val sample, in float32 on this process's first device: no collective, so the other
  # processes need not take part.
  val_loader = Loader(data.val.samples, transforms.val, config.data.eval_batch_size, shuffle=False,
                      workers=config.data.workers, prefetch=config.data.prefetch, load=data.load)
  variables = jax.device_get(variables)
  if plots:
    from tl_jax import plots as plot_lib
    sample = spread_sample_loader(val_loader, 6)
    batch = next(iter(sample.epoch(0)))
    predictions = np.argmax(np.asarray(inference.make_forward(model)(variables, batch.images)), axis=-1)
    shown = int(min(6, batch.mask.sum()))
    plot_lib.save_predictions(batch.images[:shown], predictions[:shown], batch.labels[:shown], data.classes,
                              transforms.val.mean, transforms.val.std, run.path / 'predictions.png',
                              num_images=shown)
    plot_lib.save_curves(history, run.path / 'curves.png')
  if report:
    evaluation = evaluate.evaluate_model(
        model, variables, val_loader, data.classes, out_dir=run.path,
        info={'checkpoint': str(checkpoint.resolve_model_dir(run.path)), 'arch': config.model.arch,
              'checkpoint_epoch': best_epoch, 'data': _val_label(data.describe()), 'source': data.describe()})
    log(f'best checkpoint (epoch {best_epoch}) on the val data: accuracy {evaluation.accuracy:.4f}; '
        f'wrote evaluation.json and confusion.png')
