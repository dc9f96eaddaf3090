"""The train state: params, BatchNorm statistics, optimizer state, and the dropout key."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # Base key for dropout; the step's key is fold_in(rng, step), so a resumed run draws the same masks.
  rng: Any = None
  # The stage's moving average of the weights (tl_jax.training.ema), None without `ema`.
  ema: Any = None


def create_train_state(model, variables: Mapping, tx: optax.GradientTransformation,
                       rng: Optional[jax.Array] = None, ema: Any = None) -> TrainState:
  """A state for `model` over `variables` ({'params', 'batch_stats'}; no 'batch_stats' for models
  without BatchNorm) with optimizer `tx`, dropout key `rng` (default PRNGKey(0)) and the moving
  average `ema` of the weights (tl_jax.training.ema.init; None: none)."""
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables.get('batch_stats', {}),
                           rng=jax.random.PRNGKey(0) if rng is None else rng, ema=ema)


def dropout_key(state: TrainState) -> jax.Array:
  """This step's dropout key. A state without `rng` uses PRNGKey(0), so ResNet states built
  before the field existed still run (ResNets draw nothing)."""
  base = state.rng if state.rng is not None else jax.random.PRNGKey(0)
  return jax.random.fold_in(base, state.step)


def model_variables(state: TrainState) -> dict:
  """{'params', 'batch_stats'}: what a model checkpoint holds."""
  return {'params': state.params, 'batch_stats': state.batch_stats if state.batch_stats is not None else {}}


def eval_variables(state: TrainState) -> dict:
  """The weights the val phase and `best/` use: the moving average when the stage keeps one, as
  torchvision's reference script evaluates `model_ema`."""
  if state.ema is not None:
    return {'params': state.ema['params'], 'batch_stats': state.ema['batch_stats']}
  return model_variables(state)


def state_tree(state: TrainState) -> dict:
  """What a run checkpoint holds: the variables, the optimizer state, the step and the moving
  average of the weights (when the stage keeps one)."""
  tree = {'params': state.params, 'batch_stats': state.batch_stats, 'opt_state': state.opt_state,
          'step': state.step}
  if state.ema is not None:
    tree['ema'] = state.ema
  return tree
