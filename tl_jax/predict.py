"""Eval-mode inference on image files with a model checkpoint's own preprocessing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.data.folder import DataError, ImageReadError, load_image
from tl_jax.inference import load_inference

# One fixed batch shape so the forward compiles once however many files are given.
BATCH_SIZE = 8


@dataclasses.dataclass
class Prediction:
  path: str
  class_index: Optional[int] = None
  class_name: Optional[str] = None
  probs: Optional[list[float]] = None
  logits: Optional[list[float]] = None
  error: Optional[str] = None

  def to_json(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == 'class_name'}


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def predict_files(checkpoint_path: str | Path, paths: Sequence[str | Path]) -> list[Prediction]:
  """Predicts every image in `paths`; an unreadable image gets `error` set, the others still run."""
  inference = load_inference(checkpoint_path)
  transform, names = inference.transform, inference.class_names

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
    logits = np.asarray(inference.forward(inference.variables, jnp.asarray(images)))[:len(chunk)]
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for (index, _), row_logits, row_probs in zip(chunk, logits, probs):
      top = int(np.argmax(row_logits))
      results[index] = Prediction(path=str(paths[index]), class_index=top,
                                  class_name=names[top] if names else None,
                                  probs=row_probs.tolist(), logits=row_logits.tolist())
  return [results[i] for i in range(len(paths))]


def format_prediction(p: Prediction, class_names: Optional[Sequence[str]], topk: int) -> str:
  if p.error:
    return f'{p.path}: ERROR {p.error}'
  order = np.argsort(p.probs)[::-1][:topk]
  label = lambda i: class_names[i] if class_names else f'class {i}'
  parts = [f'{label(i)} {p.probs[i]:.4f}' for i in order]
  return f'{p.path}: ' + ', '.join(parts)
