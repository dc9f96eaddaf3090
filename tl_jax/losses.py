"""Losses chosen with the head: (outputs, batch) -> masked sums, the host divides.

Every loss returns {'loss_sum', 'count'} summed over the valid rows of a fixed-shape batch
(`batch['mask']` False on padding rows), so a padded last batch counts as the smaller one;
the train step minimises loss_sum / count. Classification adds 'correct'.

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
