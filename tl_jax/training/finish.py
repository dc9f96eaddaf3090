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


def multilabel_report(model, variables: Mapping, val_loader: Loader, class_names, out_dir: Path, best_epoch: int,
                      log: Callable[[str], None]) -> dict:
  """evaluation.json of a multi-label run: tl_jax.metrics.multilabel_metrics of the best checkpoint on the
  val data (per-class precision/recall/F1 at 0.5, mAP, subset accuracy)."""
  import json
  from tl_jax import metrics
  outputs = evaluate.predict_loader(inference.make_forward(model), variables, val_loader)
  result = metrics.multilabel_metrics(outputs.labels, outputs.logits, class_names)
  result['checkpoint_epoch'] = best_epoch
  (Path(out_dir) / 'evaluation.json').write_text(json.dumps(result, indent=1))
  log(metrics.format_multilabel(result))
  log(f'best checkpoint (epoch {best_epoch}) on the val data: mAP {result["mAP"]:.4f}; wrote evaluation.json')
  return result


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
  if data.multi_label:
    if plots:
      from tl_jax import plots as plot_lib
      plot_lib.save_curves(history, run.path / 'curves.png')
    if report:
      multilabel_report(model, variables, val_loader, data.classes, run.path, best_epoch, log)
    if config.calibrate:
      log(evaluate.NO_MULTI_LABEL_TEMPERATURE)
    return
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
    # calibrate: true fits a temperature on these val logits and stores it in the best checkpoint.
    evaluation = evaluate.evaluate_model(
        model, variables, val_loader, data.classes, out_dir=None,
        info={'checkpoint': str(checkpoint.resolve_model_dir(run.path)), 'arch': config.model.arch,
              'checkpoint_epoch': best_epoch, 'data': _val_label(data.describe()), 'source': data.describe()},
        fit_temperature=config.calibrate)
    calibrated = evaluate.calibrate_run(run.path, evaluation) if config.calibrate else None
    evaluate.write_report(evaluation, run.path)
    log(f'best checkpoint (epoch {best_epoch}) on the val data: accuracy {evaluation.accuracy:.4f}; '
        f'wrote evaluation.json, confusion.png and the calibration figures')
    if calibrated:
      log(calibrated)
