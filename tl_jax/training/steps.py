"""Pure steps: `train_step(state, batch) -> (state, sums)`, `eval_step(state, batch) -> sums` and
`features_step`, jitted where they are used (tl_jax.parallel), with the state donated.

Metrics come back as masked sums (a padded row adds nothing); the host divides.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tl_jax import losses
from tl_jax.training import ema as ema_lib
from tl_jax.training.state import TrainState, dropout_key, eval_variables, model_variables


def _split(tree: Mapping, trainable) -> tuple[Optional[dict], Optional[dict]]:
  """(learned, fixed) parts of `tree` by `trainable`, a bool or a prefix tree of bools."""
  if isinstance(trainable, bool):
    return (dict(tree), None) if trainable else (None, dict(tree))
  learned, fixed = {}, {}
  for key, sub in tree.items():
    mask = trainable[key]
    if isinstance(mask, bool) or not isinstance(sub, Mapping):
      (learned if mask else fixed)[key] = sub
      continue
    sub_learned, sub_fixed = _split(sub, mask)
    if sub_learned:
      learned[key] = sub_learned
    if sub_fixed:
      fixed[key] = sub_fixed
  return learned, fixed


def _merge(a: Optional[Mapping], b: Optional[Mapping]) -> dict:
  if not a or not b:
    return dict(a or b or {})
  out = dict(a)
  for key, value in b.items():
    out[key] = _merge(out[key], value) if key in out and isinstance(value, Mapping) else value
  return out


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               trainable: Mapping[str, Any], bn_train: bool,
               loss: losses.Loss = losses.cross_entropy,
               aux_weights: tuple[float, ...] = (),
               on_nonfinite: Optional[str] = None,
               ema: Optional[ema_lib.Settings] = None) -> tuple[TrainState, dict]:
  """One optimizer step on the mean loss of the valid rows of `batch`.

  Args:
    state: params, batch_stats ({} for models without BatchNorm), optimizer state, dropout rng.
    batch: 'images' (B, H, W, 3), 'mask' (B,) with False on padding rows, and what `loss`
      reads ('labels' (B,) for cross-entropy, 'targets' for regression). With 'features' (B, F)
      in place of 'images' (tl_jax.feature_cache), only the model's `from_features` runs.
    model: a ResNet, VGG or TransferModel.
    trainable: module -> learns (`optim.trainable_mask`: a bool per top-level module, or a
      nested dict of them). Only those are differentiated, so no backward pass runs through a
      frozen backbone (the optimizer's `set_to_zero` keeps them unchanged).
    bn_train: BatchNorm uses (masked) batch statistics and updates its running stats, as under
      torch's model.train(); False: running stats everywhere (eval-mode BN). Dropout is on
      either way, as torch's model.train() with only the BN modules put in eval().
    loss: (outputs, batch) -> masked sums with 'loss_sum' and 'count' (see tl_jax.losses).
    aux_weights: the weight of each auxiliary output in the loss (Inception v3: (0.4,), GoogLeNet:
      (0.3, 0.3), as torchvision's recipes), for models that return `(logits, (aux, ...))` with
      `with_aux=True`; the metrics other than the loss come from the main logits.
    on_nonfinite: None, 'stop' (the sums get the step's `finite` flag) or 'skip_step' (a non-finite
      step's update is dropped and the sums say it was `skipped`): `guard_nonfinite`.
    ema: the stage's moving average of the weights (`state.ema`) is updated after the optimizer
      step (tl_jax.training.ema); None: the stage keeps none.
  """
  learned, fixed = _split(state.params, trainable)
  batch_stats = state.batch_stats if state.batch_stats is not None else {}

  def loss_fn(learned_params):
    variables = {'params': _merge(fixed, learned_params), 'batch_stats': batch_stats}
    if 'features' in batch:   # cached backbone features (tl_jax.feature_cache): the backbone is fixed
      outputs, updates = model.apply(variables, batch['features'], train=True, method='from_features',
                                     mutable=[], rngs={'dropout': dropout_key(state)})
    else:
      extra = {'with_aux': True} if aux_weights else {}
      outputs, updates = model.apply(variables, batch['images'], train=True, bn_train=bn_train,
                                     mask_b=batch['mask'], mutable=['batch_stats'] if bn_train else [],
                                     rngs={'dropout': dropout_key(state)}, **extra)
    if aux_weights and 'features' not in batch:
      outputs, aux_outputs = outputs
      sums = loss(outputs, batch)
      # torchvision's recipe: loss = main + sum(w * aux), each a mean over the batch.
      sums['loss_sum'] = sums['loss_sum'] + sum(w * loss(aux, batch)['loss_sum']
                                                for w, aux in zip(aux_weights, aux_outputs, strict=True))
    else:
      sums = loss(outputs, batch)
    return sums['loss_sum'] / sums['count'], (sums, updates.get('batch_stats', batch_stats))

  (_, (sums, new_batch_stats)), learned_grads = jax.value_and_grad(loss_fn, has_aux=True)(learned or {})
  # Frozen modules get zero gradients; optax.partition routes them to set_to_zero, which
  # never reads them, so XLA folds these zeros away.
  grads = _merge(learned_grads, jax.tree_util.tree_map(jnp.zeros_like, fixed) if fixed else None)
  new_state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)
  if ema is not None:
    new_state = new_state.replace(ema=ema_lib.update(state.ema, model_variables(new_state), state.step, ema,
                                                      trainable))
  if on_nonfinite is not None:
    return guard_nonfinite(state, new_state, sums, learned_grads, skip=on_nonfinite == 'skip_step')
  return new_state, sums


def guard_nonfinite(state: TrainState, new_state: TrainState, sums: dict, grads: Any,
                    skip: bool) -> tuple[TrainState, dict]:
  """Adds `finite` to a train step's sums: whether its loss and gradient norm are finite.

  One flag reduced on the device (one pass over the gradients), read by the host with the other sums
  once the step is done, so checking costs the step no wait. (An update too large for float32 can
  still overflow finite weights: the run checks the weights before it saves them.) With `skip` the
  flag is `skipped` (not finite) instead, and a
  skipped step keeps `state`'s weights, BatchNorm statistics and optimizer moments, as torch's
  GradScaler skips `optimizer.step()`; the integer counts (the step, the optimizer's and the
  schedule's) move on, so the lr still changes on the epochs' boundaries (torch's Adam alone would
  not count the skipped step). Its sums are zeros: the epoch's metrics are those of the steps taken.
  """
  finite = jnp.isfinite(sums['loss_sum']) & jnp.isfinite(optax.tree.norm(grads))
  if skip:
    def keep(new, old):
      return jnp.where(finite, new, old) if jnp.issubdtype(new.dtype, jnp.inexact) else new
    new_state = jax.tree_util.tree_map(keep, new_state, state)
    sums = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in sums.items()}
    return new_state, {**sums, 'skipped': ~finite}
  return new_state, {**sums, 'finite': finite}


def features_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module) -> dict:
  """Eval-mode backbone features (B, F) of an image batch, for tl_jax.feature_cache."""
  return {'features': model.apply(model_variables(state), batch['images'], train=False, method='features')}


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
              loss: losses.Loss = losses.cross_entropy) -> dict:
  """Eval-mode forward (of 'images', or of cached 'features'); masked sums of the loss (and correct
  predictions) and count.

  Classification adds 'predictions' (argmax); other heads' outputs are returned as 'outputs'.
  """
  variables = eval_variables(state)   # the moving average of the weights, when the stage keeps one
  if 'features' in batch:   # cached backbone features (tl_jax.feature_cache)
    outputs = model.apply(variables, batch['features'], train=False, method='from_features')
  else:
    outputs = model.apply(variables, batch['images'], train=False)
  sums = loss(outputs, batch)
  if 'correct' in sums and batch['labels'].ndim == 2:   # multi-label: the host ranks the rows for mAP
    return {**sums, 'outputs': outputs, 'targets': batch['labels'], 'mask': batch['mask']}
  if 'correct' in sums:
    return {**sums, 'predictions': jnp.argmax(outputs, axis=-1)}
  return {**sums, 'outputs': outputs}
