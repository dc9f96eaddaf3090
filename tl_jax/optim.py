"""Strategies -> label trees -> optax: what learns, and at which learning rate.

Freezing belongs to the optimizer: every top-level module of the model gets a stage label
('stem', 'layer1'..'layer4', 'head'), a strategy says which stages learn, and
`optax.partition` gives the frozen ones `set_to_zero()` (no update, no momentum buffer).
Skipping the backward pass through frozen stages is the train step's job
(`trainable_mask` tells it what to differentiate).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import optax

from tl_jax.models import STAGES

TRAINABLE, FROZEN = 'trainable', 'frozen'

# Which stages learn under each strategy.
STRATEGY_STAGES: dict[str, tuple[str, ...]] = {
    'frozen': ('head',),
    'finetune': STAGES + ('head',),
}


def stage_of(module_name: str) -> str:
  """Stage of a top-level ResNet module: conv1/bn1 -> 'stem', layer3_1 -> 'layer3', fc -> 'head'."""
  if module_name in ('conv1', 'bn1'):
    return 'stem'
  if module_name == 'fc':
    return 'head'
  if module_name.startswith('layer'):
    return module_name.split('_')[0]
  raise ValueError(f'no stage known for module {module_name!r}')


def trainable_stages(strategy: str | Sequence[str]) -> tuple[str, ...]:
  """A strategy name, or an explicit list of stages (partial unfreezing), -> stages that learn."""
  if isinstance(strategy, str):
    if strategy not in STRATEGY_STAGES:
      raise ValueError(f'unknown strategy {strategy!r}; choose one of {sorted(STRATEGY_STAGES)}')
    return STRATEGY_STAGES[strategy]
  unknown = sorted(set(strategy) - set(STAGES + ('head',)))
  if unknown:
    raise ValueError(f'unknown stages {unknown}; stages are {STAGES + ("head",)}')
  return tuple(strategy)


def trainable_mask(params: Mapping, strategy: str | Sequence[str]) -> dict[str, bool]:
  """Top-level module name -> whether it learns."""
  stages = trainable_stages(strategy)
  return {name: stage_of(name) in stages for name in params}


def param_labels(params: Mapping, strategy: str | Sequence[str]) -> dict:
  """A label tree with the structure of `params`: TRAINABLE or FROZEN on every leaf."""
  mask = trainable_mask(params, strategy)

  def label_all(tree, label):
    return {k: label_all(v, label) for k, v in tree.items()} if isinstance(tree, Mapping) else label

  return {name: label_all(sub, TRAINABLE if mask[name] else FROZEN) for name, sub in params.items()}


def step_lr_schedule(lr: float, step_size_epochs: int, gamma: float, steps_per_epoch: int,
                     num_epochs: int) -> optax.Schedule:
  """torch's StepLR(step_size, gamma), stepped once per epoch, as a function of the optimizer step.

  The lr of epoch e is lr * gamma ** (e // step_size); an epoch has `steps_per_epoch` steps.
  """
  boundaries = {epoch * steps_per_epoch: gamma
                for epoch in range(step_size_epochs, num_epochs, step_size_epochs)}
  return optax.piecewise_constant_schedule(lr, boundaries)


def epoch_lrs(schedule, lr: float, epochs: int) -> list[float]:
  """The lr of every epoch (placeholder: step and constant only)."""
  schedule = dict(schedule or {'name': 'constant'})
  if schedule['name'] == 'step':
    return [lr * schedule.get('gamma', 0.1) ** (e // schedule['step_size']) for e in range(epochs)]
  return [lr] * epochs


def make_schedule(schedule, lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  schedule = dict(schedule or {'name': 'constant'})
  if schedule['name'] == 'step':
    return step_lr_schedule(lr, schedule['step_size'], schedule.get('gamma', 0.1), steps_per_epoch, epochs)
  return optax.constant_schedule(lr)


def make_optimizer(params: Mapping, strategy: str | Sequence[str], optimizer, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """SGD with momentum (torch's: buf = m * buf + g; p -= lr * buf) on the trainable stages only."""
  momentum = dict(optimizer).get('momentum', 0.0)
  return optax.partition(
      {TRAINABLE: optax.sgd(schedule, momentum=momentum or None), FROZEN: optax.set_to_zero()},
      param_labels(params, strategy))
