"""Classification metrics from predictions, in NumPy, with scikit-learn's definitions.

Accuracy, mean cross-entropy, per-class precision/recall/F1/support, their macro and
support-weighted averages, and the confusion matrix (rows = true class, columns = predicted),
as `sklearn.metrics` computes them with `labels=range(num_classes)` and `zero_division=0`: a
class that is never predicted has precision 0 (no prediction to be right about), a class
absent from the labels has recall 0, and F1 is 2·tp / (2·tp + fp + fn), 0 when that is 0/0.
scikit-learn is not needed at runtime; the tests compare against it. Multi-label data has its own
(`multilabel_metrics`: per-class precision/recall/F1 at a threshold, average precision and mAP,
subset accuracy).
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


# ----------------------------------------------------------------------------------- multi-label


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
  """scikit-learn's average_precision_score for one class: sum over the distinct scores, highest first, of
  (R_k - R_{k-1}) P_k; 0 for a class with no positive (sklearn's value, with its warning left out)."""
  targets, scores = np.asarray(targets, np.float64), np.asarray(scores, np.float64)
  order = np.argsort(-scores, kind='mergesort')
  targets, scores = targets[order], scores[order]
  ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]   # the last row of each distinct score
  tps = np.cumsum(targets)[ends]
  if not len(tps) or tps[-1] == 0:
    return 0.0
  precision = tps / (ends + 1)
  recall = tps / tps[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sigmoid(logits: np.ndarray) -> np.ndarray:
  """A multi-label head's per-class probabilities, in float64."""
  return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def present_classes(probs: Sequence[float], class_names: Optional[Sequence[str]], threshold: float = 0.5) -> str:
  """A multi-label answer: the names of the classes whose probability is above `threshold`, or '(none)'."""
  names = [class_names[i] if class_names else f'class {i}' for i, p in enumerate(probs) if p > threshold]
  return ' '.join(names) if names else '(none)'


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
  """mAP: the mean over the C columns of `average_precision` (sklearn's macro average_precision_score)."""
  targets, scores = np.asarray(targets), np.asarray(scores)
  return float(np.mean([average_precision(targets[:, c] > 0.5, scores[:, c]) for c in range(targets.shape[1])]))


def multilabel_metrics(targets: np.ndarray, logits: np.ndarray, class_names: Sequence[str],
                       threshold: float = 0.5) -> dict:
  """Multi-label metrics as scikit-learn computes them, as a JSON-ready dict.

  Args:
    targets: (N, C) 0/1 (a row may hold several classes, or none).
    logits: (N, C) the sigmoid head's outputs; a class is predicted where sigmoid(logit) > threshold.
    class_names: C names.

  Returns:
    {'num_samples', 'multi_label': True, 'threshold', 'subset_accuracy' (every class of the row right:
    sklearn's accuracy_score on indicator rows), 'mAP' (the mean over classes of average_precision_score,
    ranked by the logits), 'loss' (BCEWithLogitsLoss's mean), 'per_class': {name: {'precision', 'recall',
    'f1', 'support', 'average_precision'}} (precision_recall_fscore_support(zero_division=0)),
    'macro_avg', 'micro_avg', 'absent' (classes with no positive: their AP and recall are 0)}.
  """
  class_names = [str(name) for name in class_names]
  targets = np.asarray(targets, np.float64)
  logits = np.asarray(logits, np.float64)
  if targets.ndim != 2 or targets.shape != logits.shape or targets.shape[1] != len(class_names):
    raise MetricsError(f'targets {targets.shape} and logits {logits.shape} must both be (N, {len(class_names)})')
  if not len(targets):
    raise MetricsError('no samples to evaluate')
  positive = targets > 0.5
  predicted = sigmoid(logits) > threshold
  tp = np.sum(predicted & positive, axis=0).astype(np.float64)
  fp = np.sum(predicted & ~positive, axis=0).astype(np.float64)
  fn = np.sum(~predicted & positive, axis=0).astype(np.float64)
  precision, recall, f1 = _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)
  ap = np.array([average_precision(positive[:, c], logits[:, c]) for c in range(len(class_names))])
  tp_all, fp_all, fn_all = tp.sum(), fp.sum(), fn.sum()
  micro = {'precision': float(_ratio(tp_all, tp_all + fp_all)), 'recall': float(_ratio(tp_all, tp_all + fn_all)),
           'f1': float(_ratio(2 * tp_all, 2 * tp_all + fp_all + fn_all)), 'support': int(positive.sum())}
  losses = np.logaddexp(0.0, -logits) * targets + np.logaddexp(0.0, logits) * (1 - targets)
  return {
      'num_samples': int(len(targets)),
      'multi_label': True,
      'threshold': float(threshold),
      'subset_accuracy': float(np.mean(np.all(predicted == positive, axis=1))),
      'mAP': float(np.mean(ap)),
      'loss': float(np.mean(losses)),
      'class_names': class_names,
      'per_class': {name: {'precision': float(precision[i]), 'recall': float(recall[i]), 'f1': float(f1[i]),
                           'support': int(positive[:, i].sum()), 'average_precision': float(ap[i])}
                    for i, name in enumerate(class_names)},
      'macro_avg': {'precision': float(precision.mean()), 'recall': float(recall.mean()), 'f1': float(f1.mean()),
                    'support': int(positive.sum())},
      'micro_avg': micro,
      'absent': [name for i, name in enumerate(class_names) if not positive[:, i].any()],
  }


def format_multilabel(metrics: dict) -> str:
  """The multi-label metrics as a few printed lines: totals, then one line per class."""
  lines = [f"{metrics['num_samples']} images, multi-label at threshold {metrics['threshold']:g}: "
           f"mAP {metrics['mAP']:.4f}, subset accuracy {metrics['subset_accuracy']:.4f}, loss {metrics['loss']:.4f}",
           f"{'class':<20} {'precision':>9} {'recall':>7} {'f1':>7} {'AP':>7} {'support':>7}"]
  for name, row in metrics['per_class'].items():
    lines.append(f"{name[:20]:<20} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>7.4f} "
                 f"{row['average_precision']:>7.4f} {row['support']:>7d}")
  for avg in ('macro_avg', 'micro_avg'):
    row = metrics[avg]
    lines.append(f"{avg:<20} {row['precision']:>9.4f} {row['recall']:>7.4f} {row['f1']:>7.4f} {'':>7} "
                 f"{row['support']:>7d}")
  return '\n'.join(lines)
