"""Classification metrics from predictions, in NumPy, with scikit-learn's definitions.

Accuracy, mean cross-entropy, per-class precision/recall/F1/support, their macro and
support-weighted averages, and the confusion matrix (rows = true class, columns = predicted),
as `sklearn.metrics` computes them with `labels=range(num_classes)` and `zero_division=0`: a
class that is never predicted has precision 0 (no prediction to be right about), a class
absent from the labels has recall 0, and F1 is 2·tp / (2·tp + fp + fn), 0 when that is 0/0.
scikit-learn is not needed at runtime; the tests compare against it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# sklearn's zero_division=0: a ratio whose denominator is 0 is reported as this.
ZERO_DIVISION = 0.0


class MetricsError(ValueError):
  """Labels, predictions or losses that cannot be scored together."""


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) int64 counts; entry [t, p] counts samples of class t predicted p."""
  flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-sample -log softmax(logits)[label], in float64 (torch's F.cross_entropy, reduction='none')."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_z = np.log(np.exp(shifted).sum(axis=-1))
  return log_z - shifted[np.arange(len(labels)), labels]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  safe = np.where(denominator > 0, denominator, 1)
  return np.where(denominator > 0, numerator / safe, ZERO_DIVISION)


def _check_indices(name: str, values, num_classes: int) -> np.ndarray:
  array = np.asarray(values)
  if array.ndim != 1:
    raise MetricsError(f'{name} must be one class index per sample, got shape {array.shape}')
  if array.size and not np.issubdtype(array.dtype, np.integer):
    raise MetricsError(f'{name} must be integer class indices, got dtype {array.dtype}')
  bad = array[(array < 0) | (array >= num_classes)]
  if bad.size:
    raise MetricsError(f'{name} holds {bad[0]}, outside the {num_classes} classes')
  return array.astype(np.int64)


def compute_metrics(labels: Sequence[int], predictions: Optional[Sequence[int]],
                    losses_or_logits: Optional[np.ndarray], class_names: Sequence[str]) -> dict:
  """Every metric of the evaluation report, as a JSON-ready dict.

  Args:
    labels: (N,) true class indices.
    predictions: (N,) predicted class indices; None takes the argmax of the logits.
    losses_or_logits: (N, C) logits (the loss is their mean cross-entropy), or (N,) per-sample
      losses (their mean is the loss), or None (no loss is reported).
    class_names: name of each class index; C = len(class_names).

  Returns:
    {'num_samples', 'accuracy', 'loss', 'class_names', 'per_class': {name: {'precision',
    'recall', 'f1', 'support'}}, 'macro_avg', 'weighted_avg', 'confusion_matrix' (list of rows,
    true x predicted), 'never_predicted', 'absent'} — the last two list the class names whose
    precision, respectively recall, is 0 only because there was nothing to divide by.
  """
  class_names = [str(name) for name in class_names]
  num_classes = len(class_names)
  if num_classes < 1:
    raise MetricsError('no class names given')
  if len(set(class_names)) != num_classes:
    raise MetricsError(f'class names repeat: {class_names}')
  labels = _check_indices('labels', labels, num_classes)
  if not labels.size:
    raise MetricsError('no samples to evaluate')
  scores = None if losses_or_logits is None else np.asarray(losses_or_logits, np.float64)
  if predictions is None:
    if scores is None or scores.ndim != 2:
      raise MetricsError('predictions are needed unless (N, C) logits are given')
    predictions = np.argmax(scores, axis=-1)
  predictions = _check_indices('predictions', predictions, num_classes)
  if len(predictions) != len(labels):
    raise MetricsError(f'{len(predictions)} predictions for {len(labels)} labels')

  loss = None
  if scores is not None:
    if scores.ndim == 2:
      if scores.shape != (len(labels), num_classes):
        raise MetricsError(f'logits must be (N, C) = ({len(labels)}, {num_classes}), got {scores.shape}')
      losses = cross_entropy(scores, labels)
    elif scores.shape == (len(labels),):
      losses = scores
    else:
      raise MetricsError(f'losses must be ({len(labels)},) or logits ({len(labels)}, {num_classes}), '
                         f'got shape {scores.shape}')
    loss = float(np.mean(losses))

  confusion = confusion_matrix(labels, predictions, num_classes)
  tp = np.diag(confusion).astype(np.float64)
  predicted = confusion.sum(axis=0).astype(np.float64)  # tp + fp
  support = confusion.sum(axis=1).astype(np.float64)    # tp + fn
  precision = _ratio(tp, predicted)
  recall = _ratio(tp, support)
  f1 = _ratio(2 * tp, predicted + support)
  total = support.sum()

  def average(weights: np.ndarray) -> dict:
    weights = weights / weights.sum() if weights.sum() > 0 else np.zeros_like(weights)
    return {'precision': float(weights @ precision), 'recall': float(weights @ recall),
            'f1': float(weights @ f1), 'support': int(total)}

  return {
      'num_samples': int(len(labels)),
      'accuracy': float(tp.sum() / total),
      'loss': loss,
      'class_names': class_names,
      'per_class': {name: {'precision': float(precision[i]), 'recall': float(recall[i]), 'f1': float(f1[i]),
                           'support': int(support[i])} for i, name in enumerate(class_names)},
      'macro_avg': average(np.ones(num_classes)),
      'weighted_avg': average(support),
      'confusion_matrix': confusion.tolist(),
      'never_predicted': [name for i, name in enumerate(class_names) if predicted[i] == 0],
      'absent': [name for i, name in enumerate(class_names) if support[i] == 0],
  }
