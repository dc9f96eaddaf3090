"""Strategies -> label trees -> optax: what learns, and at which learning rate.

Freezing belongs to the optimizer: every top-level module of the model gets a stage label
(ResNet: 'stem', 'layer1'..'layer4', 'head'; VGG: 'block1'..'block5', 'classifier', 'head';
a TransferModel: its backbone's stages and each head submodule by name; see
`tl_jax.models.stage_tree`), a strategy says which stages learn, and
`optax.partition` gives the frozen ones `set_to_zero()` (no update, no momentum buffer).
Skipping the backward pass through frozen stages is the train step's job
(`trainable_mask` tells it what to differentiate).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import optax

from tl_jax import models

TRAINABLE, FROZEN = 'trainable', 'frozen'

# Which stages learn under each strategy; FINETUNE_ALL stands for every stage of the model.
FINETUNE_ALL = '*'
STRATEGY_STAGES: dict[str, tuple[str, ...]] = {
    'frozen': (models.HEAD,),
    'finetune': (FINETUNE_ALL,),
}


def stage_of(module_name: str) -> str:
  """Stage of a top-level ResNet/VGG module (see `tl_jax.models.stage_of`)."""
  return models.stage_of(module_name)


def _all_known_stages() -> tuple[str, ...]:
  stages = [s for arch in models.ARCHS for s in models.arch_stages(arch)] + [models.FEATURES]
  return tuple(dict.fromkeys(stages))


def trainable_stages(strategy: str | Sequence[str], known: Optional[Sequence[str]] = None) -> tuple[str, ...]:
  """A strategy name, or an explicit list of stages/groups (partial unfreezing), -> names that learn.

  Args:
    strategy: 'frozen' (the head), 'finetune' (everything), or names such as ['block5', 'classifier',
      'head'] for a VGG, ['layer4', 'head'] for a ResNet, or a custom head's submodule names.
    known: the names the model has (`models.stage_groups`); default: those of every built-in arch.
  """
  if isinstance(strategy, str):
    if strategy not in STRATEGY_STAGES:
      raise ValueError(f'unknown strategy {strategy!r}; choose one of {sorted(STRATEGY_STAGES)}')
    return STRATEGY_STAGES[strategy]
  known = tuple(known) if known is not None else _all_known_stages()
  unknown = sorted(set(strategy) - set(known))
  if unknown:
    raise ValueError(f'unknown stages {unknown}; stages are {known}')
  return tuple(strategy)


def trainable_mask(params: Mapping, strategy: str | Sequence[str]) -> dict:
  """Module -> whether it learns: a bool per top-level module (ResNet, VGG), nested under
  'backbone' / 'head' for a TransferModel."""
  tree = models.stage_tree(params)
  groups = models.stage_groups(tree)
  names = trainable_stages(strategy, known=tuple(groups))
  if FINETUNE_ALL in names:
    learning = {s for selected in groups.values() for s in selected}
  else:
    learning = {s for name in names for s in groups[name]}

  def mask(node):
    return {k: mask(v) for k, v in node.items()} if isinstance(node, Mapping) else node in learning

  return mask(tree)


def param_labels(params: Mapping, strategy: str | Sequence[str]) -> dict:
  """A label tree with the structure of `params`: TRAINABLE or FROZEN on every leaf."""

  def label(tree, mask):
    if isinstance(mask, bool):
      return jax.tree_util.tree_map(lambda _: TRAINABLE if mask else FROZEN, tree)
    return {k: label(v, mask[k]) for k, v in tree.items()}

  return label(params, trainable_mask(params, strategy))


def step_lr_schedule(lr: float, step_size_epochs: int, gamma: float, steps_per_epoch: int,
                     num_epochs: int) -> optax.Schedule:
  """torch's StepLR(step_size, gamma), stepped once per epoch, as a function of the optimizer step.

  The lr of epoch e is lr * gamma ** (e // step_size); an epoch has `steps_per_epoch` steps.
  """
  boundaries = {epoch * steps_per_epoch: gamma
                for epoch in range(step_size_epochs, num_epochs, step_size_epochs)}
  return optax.piecewise_constant_schedule(lr, boundaries)


def make_optimizer(params: Mapping, strategy: str | Sequence[str], schedule: optax.Schedule,
                   momentum: float = 0.9) -> optax.GradientTransformation:
  """SGD with momentum (torch's: buf = m * buf + g; p -= lr * buf) on the trainable stages only."""
  return optax.partition(
      {TRAINABLE: optax.sgd(schedule, momentum=momentum or None), FROZEN: optax.set_to_zero()},
      param_labels(params, strategy))
