"""An exponential moving average of the weights, equal to torch's

  AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

as torchvision's reference script keeps it (`--model-ema`, `--model-ema-steps`):

- created over the model as it is (a copy, `n_averaged` 0); the first `update_parameters` copies the
  model again, each later one is `torch._foreach_lerp_(ema, model, 1 - decay)`, i.e.
  ema = decay * ema + (1 - decay) * model, in torch's lerp arithmetic (`lerp` below);
- `use_buffers=True`: the BatchNorm running statistics are averaged the same way as the parameters
  (not copied). torch's integer buffer `num_batches_tracked` has no counterpart here: with the fixed
  BatchNorm momentum torchvision's models use it changes nothing that is computed;
- updated after the optimizer step of every batch `i` of an epoch with `i % every == 0` (the
  script's `i % model_ema_steps == 0`, `i` counted from 0 in each epoch). With `accumulate: N`, `i`
  counts the epoch's optimizer steps (one per N batches, the last one taking the batches left), and
  the batches that take no step leave the average alone, as timm updates it only after a step.

The average lives in the train state (`TrainState.ema`) and is updated inside the jitted train step,
so it costs no trip to the host. A stage with `ema` starts its own average over the weights it starts
from, as each stage starts a fresh optimizer (a stage's average is never carried into the next one,
whose frozen, feature-cached backbone could then not equal the average's); each stage trains the raw
weights, and its val phase and `best/` read the average.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the jitted train step needs of a stage's `ema` (static: hashable)."""
  decay: float
  every: int
  steps_per_epoch: int   # train batches
  accumulate: int = 1    # batches per optimizer step


def settings(config: Any, steps_per_epoch: int, accumulate: int = 1) -> Optional[Settings]:
  """The Settings of a stage's `ema` config (tl_jax.config.EMAConfig), or None without one."""
  if config is None:
    return None
  return Settings(float(config.decay), int(config.every), int(steps_per_epoch), int(accumulate))


def init(variables: Mapping) -> dict:
  """AveragedModel(model): a copy of {'params', 'batch_stats'} and `n_averaged` 0.

  Real copies, so the train state, which is donated to the step, never holds one buffer twice."""
  copy = lambda tree: jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), dict(tree))
  return {'params': copy(variables['params']), 'batch_stats': copy(variables.get('batch_stats') or {}),
          'n_averaged': jnp.zeros((), jnp.int32)}


def lerp(average: jax.Array, value: jax.Array, weight: float) -> jax.Array:
  """torch.lerp(average, value, weight) with a scalar weight, in torch's arithmetic (its CPU and CUDA
  kernels take the form that is exact at the nearer end)."""
  if abs(weight) < 0.5:
    return average + weight * (value - average)
  return value - (value - average) * (1 - weight)


def _full_mask(trainable: Any, params: Mapping) -> Any:
  """A bool per leaf of `params` from `trainable`, a bool or a prefix tree of bools."""
  return jax.tree_util.tree_map(lambda learns, sub: jax.tree_util.tree_map(lambda _: learns, sub),
                                trainable, dict(params))


def update(ema: Mapping, variables: Mapping, step: jax.Array, settings: Settings, trainable: Any = True) -> dict:
  """`ema` after the optimizer step that made `variables` ({'params', 'batch_stats'}).

  Args:
    ema: the average so far (`init`'s structure).
    step: the train steps (batches) taken in the stage before this one, which gives the batch's
      index in its epoch, `step % steps_per_epoch`.
    settings: decay, every and the steps of an epoch.
    trainable: as the train step's (a bool or a prefix tree of bools over the params). Parameters
      that do not learn keep their average, the copy of their value made when the stage started,
      which is what averaging that same value again would give (lerp of equal values is exact).
  """
  batch = step % settings.steps_per_epoch
  # Accumulation (optax.MultiSteps, tl_jax.optim.accumulated): the weights change on a group's last batch.
  stepped = ((batch + 1) % settings.accumulate == 0) | (batch == settings.steps_per_epoch - 1)
  due = stepped & ((batch // settings.accumulate) % settings.every == 0)
  first = ema['n_averaged'] == 0
  weight = 1.0 - settings.decay

  def average(old, new):
    if jnp.issubdtype(old.dtype, jnp.inexact):
      averaged = lerp(old, new, weight)
    else:   # torch's integer branch: p_ema.copy_(p_ema * decay + p_model * (1 - decay)), truncated
      averaged = (old * settings.decay + new * weight).astype(old.dtype)
    return jnp.where(due, jnp.where(first, new, averaged), old)

  learns = _full_mask(trainable, variables['params'])
  params = jax.tree_util.tree_map(lambda keep_learning, old, new: average(old, new) if keep_learning else old,
                                  learns, dict(ema['params']), dict(variables['params']))
  batch_stats = jax.tree_util.tree_map(average, dict(ema['batch_stats']), dict(variables.get('batch_stats') or {}))
  return {'params': params, 'batch_stats': batch_stats,
          'n_averaged': ema['n_averaged'] + due.astype(ema['n_averaged'].dtype)}


def variables(ema: Mapping) -> dict:
  """{'params', 'batch_stats'} of the average: what a model checkpoint holds."""
  return {'params': ema['params'], 'batch_stats': ema['batch_stats']}
