"""Losses chosen with the head: (outputs, batch) -> masked sums, the host divides.

Every loss returns {'loss_sum', 'count'} summed over the valid rows of a fixed-shape batch
(`batch['mask']` False on padding rows), so a padded last batch counts as the smaller one;
the train step minimises loss_sum / count. Classification adds 'correct'.

The recipe's `loss:` section (`make_loss`) chooses torch's CrossEntropyLoss(weight, label_smoothing)
(`weighted_cross_entropy`: there 'count' is the weight of the rows' classes, torch's denominator, and
'rows' the number of valid rows that accuracy divides by) or, for multi-label data,
BCEWithLogitsLoss(pos_weight) (`binary_cross_entropy`).

Regression outputs may be one array or several (a tuple or dict of arrays, e.g. four
`Linear(512, 1)` heads); `batch['targets']` is either the same structure or one (B, D) array
whose columns follow the outputs' leaves in order. A row's loss is the sum over its D target
values, so loss_sum / count is the sum of per-output means, as the material's
`loss = sum(criterion(out_i, y_i))`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

Loss = Callable[[Any, Mapping[str, jax.Array]], dict]


def _row_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
  return batch['mask'].astype(jnp.float32)


def cross_entropy(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict:
  """torch's CrossEntropyLoss on integer `batch['labels']`, plus the count of correct argmaxes."""
  weights = _row_weights(batch)
  labels = batch['labels']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {'loss_sum': jnp.sum(ce * weights), 'correct': jnp.sum(correct * weights),
          'count': jnp.sum(weights)}


def _columns(tree: Any) -> jax.Array:
  """Every leaf as (B, -1), concatenated in leaf order: (B, D)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.concatenate([leaf.reshape((leaf.shape[0], -1)) for leaf in leaves], axis=-1)


def _regression(per_element: Callable[[jax.Array], jax.Array]) -> Loss:
  def loss(outputs: Any, batch: Mapping[str, jax.Array]) -> dict:
    predictions, targets = _columns(outputs), _columns(batch['targets'])
    if predictions.shape != targets.shape:
      raise ValueError(f'outputs have {predictions.shape[-1]} values per row but targets '
                       f'{targets.shape[-1]}; make the head and batch["targets"] agree')
    weights = _row_weights(batch)
    diff = predictions - targets.astype(predictions.dtype)
    per_row = jnp.sum(per_element(diff), axis=-1)
    return {'loss_sum': jnp.sum(per_row * weights), 'abs_error_sum': jnp.sum(jnp.abs(diff) * weights[:, None]),
            'count': jnp.sum(weights)}
  return loss


# torch's MSELoss: (prediction - target)^2.
mean_squared_error: Loss = _regression(jnp.square)

# torch's SmoothL1Loss(beta=1): 0.5 x^2 if |x| < 1 else |x| - 0.5 (optax's Huber loss with delta 1).
smooth_l1: Loss = _regression(lambda diff: optax.huber_loss(diff, delta=1.0))


# ----------------------------------------------------------------- options of the classification loss


def _class_vector(values, num_classes: int, dtype) -> jax.Array:
  return jnp.ones((num_classes,), dtype) if values is None else jnp.asarray(values, dtype)


def weighted_cross_entropy(label_smoothing: float = 0.0, class_weights=None) -> Loss:
  """torch's `CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)` as masked sums.

  Integer `batch['labels']` (B,): torch divides a weighted mean by the weight of the target classes,
  sum_i w[y_i] (not by the row count), and with label smoothing adds eps/C times the weighted sum of
  -log p over every class, divided by that same sum:
    loss = [(1 - eps) sum_i w[y_i] nll_i + eps/C sum_i sum_c w[c] (-log p_ic)] / sum_i w[y_i].
  So 'count' is sum_i w[y_i] over the valid rows and 'rows' their number ('correct' counts rows; the
  host divides it by 'rows').

  Probability targets `batch['soft_labels']` (B, C) (MixUp/CutMix): torch smooths the targets,
  t' = t (1 - eps) + eps/C, and its mean divides by the number of rows whatever the weights:
    loss = sum_i sum_c w[c] t'_ic (-log p_ic) / B,
  so there 'count' is the number of valid rows. 'correct' compares the argmax with the original
  integer 'labels' (the unmixed class), which the batch keeps.
  """
  eps = float(label_smoothing)

  def loss(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))   # bfloat16 logits: float32 loss
    rows = batch['mask'].astype(logits.dtype)   # the weights' sum in the logits' precision
    labels = batch['labels']
    num_classes = logits.shape[-1]
    weights = _class_vector(class_weights, num_classes, logits.dtype)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    if 'soft_labels' in batch:
      targets = batch['soft_labels'].astype(logits.dtype)
      if eps > 0:
        targets = targets * (1 - eps) + eps / num_classes
      per_row = -jnp.sum(log_p * targets * weights, axis=-1)
      count = jnp.sum(rows)
    else:
      nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
      row_weight = weights[labels]
      per_row = row_weight * nll
      if eps > 0:
        per_row = (1 - eps) * per_row + eps / num_classes * -jnp.sum(log_p * weights, axis=-1)
      count = jnp.sum(row_weight * rows)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(rows.dtype)
    return {'loss_sum': jnp.sum(per_row * rows), 'correct': jnp.sum(correct * rows), 'count': count,
            'rows': jnp.sum(rows)}

  return loss


def binary_cross_entropy(pos_weight=None) -> Loss:
  """torch's `BCEWithLogitsLoss(pos_weight=pos_weight)` (mean over every element) as masked sums, for
  multi-label `batch['labels']` (B, C) in [0, 1] (multi-hot, or mixed by MixUp/CutMix).

  Per element: -[p_c y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))] = p_c y softplus(-x) + (1 - y)
  softplus(x). A row's loss is the mean over its C classes, so loss_sum / count (count: valid rows)
  is torch's mean over B x C elements. 'correct' counts rows whose every class is right at
  threshold 0.5 (logit 0): subset accuracy.
  """

  def loss(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    rows = batch['mask'].astype(logits.dtype)
    targets = batch['labels'].astype(logits.dtype)
    weight = _class_vector(pos_weight, logits.shape[-1], logits.dtype)
    elements = weight * targets * jax.nn.softplus(-logits) + (1 - targets) * jax.nn.softplus(logits)
    per_row = jnp.mean(elements, axis=-1)
    exact = jnp.all((logits > 0) == (targets > 0.5), axis=-1).astype(rows.dtype)
    return {'loss_sum': jnp.sum(per_row * rows), 'correct': jnp.sum(exact * rows), 'count': jnp.sum(rows)}

  return loss


class LossError(ValueError):
  """Loss options that do not fit the data (e.g. a weight list of the wrong length)."""


def balanced_class_weights(counts) -> list[float]:
  """scikit-learn's compute_class_weight('balanced'): n_samples / (n_classes * count) per class."""
  counts = [int(c) for c in counts]
  if any(c == 0 for c in counts):
    empty = [i for i, c in enumerate(counts) if c == 0]
    raise LossError(f'loss.class_weights: balanced needs every class in the train split; classes {empty} have '
                    'no train samples')
  total = sum(counts)
  return [total / (len(counts) * c) for c in counts]


def balanced_pos_weight(positives, num_samples: int) -> list[float]:
  """pos_weight = negatives / positives per class, as torch's BCEWithLogitsLoss docs suggest."""
  positives = [int(p) for p in positives]
  if any(p == 0 for p in positives):
    raise LossError(f'loss.pos_weight: balanced needs a positive of every class in the train split; classes '
                    f'{[i for i, p in enumerate(positives) if p == 0]} have none')
  return [(num_samples - p) / p for p in positives]


def _per_class(key: str, value, num_classes: int, balanced) -> Any:
  """A per-class weight option: None, 'balanced' (computed by `balanced()`), a number, or a list of C."""
  if value is None:
    return None
  if value == 'balanced':
    return balanced()
  if isinstance(value, (int, float)):
    return [float(value)] * num_classes
  if len(value) != num_classes:
    raise LossError(f'{key} has {len(value)} entries but the data has {num_classes} classes; give one weight per '
                    'class (in the order of the class names) or balanced')
  return [float(v) for v in value]


def make_loss(options: Mapping[str, Any], train_labels, num_classes: int, multi_label: bool = False,
              mixing: bool = False) -> Loss:
  """The recipe's loss from its `loss:` options ({'label_smoothing', 'class_weights', 'pos_weight'}).

  Args:
    options: the recipe's loss section as plain values.
    train_labels: the train split's labels: (N,) class indices, or (N, C) multi-hot rows; they give
      the counts of `balanced` weights.
    num_classes: C.
    multi_label: a sigmoid head with BCEWithLogitsLoss(pos_weight) instead of cross-entropy.
    mixing: MixUp/CutMix give soft targets: the weighted cross-entropy handles them (the plain one
      is kept only when nothing asks for more, so default runs compute what they always did).
  """
  smoothing = float(options.get('label_smoothing') or 0.0)
  if multi_label and (smoothing or options.get('class_weights') is not None):
    key = 'label_smoothing' if smoothing else 'class_weights'
    raise LossError(f'loss.{key} applies to single-label cross-entropy; this data is multi-label '
                    '(BCEWithLogitsLoss): use loss.pos_weight')
  if not multi_label and options.get('pos_weight') is not None:
    raise LossError('loss.pos_weight applies to multi-label data (BCEWithLogitsLoss); this data is single-label: '
                    'use loss.class_weights')
  if multi_label:
    labels = np.asarray(train_labels).reshape(-1, num_classes)
    pos_weight = _per_class('loss.pos_weight', options.get('pos_weight'), num_classes,
                            lambda: balanced_pos_weight(labels.sum(axis=0), len(labels)))
    return binary_cross_entropy(pos_weight)
  counts = np.bincount(np.asarray(train_labels, np.int64), minlength=num_classes)
  weights = _per_class('loss.class_weights', options.get('class_weights'), num_classes,
                       lambda: balanced_class_weights(counts))
  if weights is None and smoothing == 0 and not mixing:
    return cross_entropy
  return weighted_cross_entropy(smoothing, weights)
