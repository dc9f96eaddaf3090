"""Eval-mode inference on image files with a model checkpoint's own preprocessing, its fitted
temperature, optional test-time augmentation, and an `unknown` answer below a confidence."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from tl_jax import calibration
from tl_jax import metrics as metrics_lib
from tl_jax.data.folder import DataError, ImageReadError, load_image
from tl_jax.inference import load_inference, tta_transform

# One fixed batch shape so the forward compiles once however many files are given.
BATCH_SIZE = 8
UNKNOWN = 'unknown'


class PredictError(ValueError):
  """Options that cannot be applied to this checkpoint."""


@dataclasses.dataclass
class Prediction:
  path: str
  class_index: Optional[int] = None
  class_name: Optional[str] = None
  probs: Optional[list[float]] = None
  logits: Optional[list[float]] = None
  error: Optional[str] = None
  confidence: Optional[float] = None   # the top probability
  answer: Optional[str] = None         # the class's name ('class i' without names), or 'unknown' below --min-confidence

  def to_json(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == 'class_name'}


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def predict_files(checkpoint_path: str | Path, paths: Sequence[str | Path], *, tta: Optional[str] = None,
                  use_temperature: bool = True, min_confidence: Optional[float] = None) -> list[Prediction]:
  """Predicts every image in `paths`; an unreadable image gets `error` set, the others still run.

  Args:
    checkpoint_path: a model checkpoint, a training run or its best/.
    paths: image files.
    tta: None, 'flip' or 'five-crop': the probabilities are the mean softmax of the views (logits are
      then left out: there is one set per view).
    use_temperature: divide the logits by the checkpoint's fitted temperature, if it has one.
    min_confidence: answer `unknown` when the top probability is below it.
  """
  if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
    raise PredictError(f'--min-confidence must be a probability in [0, 1], got {min_confidence}')
  inference = load_inference(checkpoint_path)
  transform, names = tta_transform(inference.transform, tta), inference.class_names
  if inference.checkpoint.metadata.get('multi_label') and (min_confidence is not None or tta is not None):
    raise PredictError('--min-confidence and --tta apply to softmax heads; this checkpoint has a multi-label '
                       '(sigmoid) head: drop them')
  temperature = inference.temperature if use_temperature else None
  multi_label = bool(inference.checkpoint.metadata.get('multi_label'))

  results: dict[int, Prediction] = {}
  ready: list[tuple[int, np.ndarray]] = []
  for index, path in enumerate(paths):
    try:
      ready.append((index, transform(load_image(path))))
    except ImageReadError as e:
      # The reason alone: the training hint (--skip-bad-images) means nothing to predict.
      results[index] = Prediction(path=str(path), error=f'cannot read image {path}: {e.bad[0][1]}')
    except (DataError, OSError) as e:
      results[index] = Prediction(path=str(path), error=str(e))

  for chunk in _batches(ready, BATCH_SIZE):
    images = np.zeros((BATCH_SIZE,) + chunk[0][1].shape, np.float32)
    for row, (_, image) in enumerate(chunk):
      images[row] = image
    logits = inference.view_logits(images)[:len(chunk)]
    probs = calibration.probabilities(logits, 1.0 if temperature is None else temperature)
    if multi_label:   # one sigmoid per class; the answer names every class above 0.5 (tl_jax.metrics)
      probs = metrics_lib.sigmoid(logits)
    for (index, _), row_logits, row_probs in zip(chunk, logits, probs):
      top = int(np.argmax(row_probs))
      name = names[top] if names else None
      confidence = float(row_probs[top])
      unsure = min_confidence is not None and confidence < min_confidence
      results[index] = Prediction(path=str(paths[index]), class_index=top, class_name=name,
                                  probs=row_probs.tolist(), logits=row_logits.tolist() if tta is None else None,
                                  confidence=confidence,
                                  answer=metrics_lib.present_classes(row_probs, names) if multi_label else
                                  UNKNOWN if unsure else (name if name is not None else f'class {top}'))
  return [results[i] for i in range(len(paths))]


def format_prediction(p: Prediction, class_names: Optional[Sequence[str]], topk: int) -> str:
  if p.error:
    return f'{p.path}: ERROR {p.error}'
  order = np.argsort(p.probs)[::-1][:topk]
  label = lambda i: class_names[i] if class_names else f'class {i}'
  parts = [f'{label(i)} {p.probs[i]:.4f}' for i in order]
  if p.answer == UNKNOWN:
    return f'{p.path}: {UNKNOWN} (top: ' + ', '.join(parts) + ')'
  return f'{p.path}: ' + ', '.join(parts)
