"""Training configuration: a dataclass, YAML files in configs/, command-line overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import yaml

STRATEGIES = ('frozen', 'finetune')
BN_POLICIES = ('train', 'frozen')


class ConfigError(ValueError):
  """A config file or flag has a bad value."""


@dataclasses.dataclass
class TrainConfig:
  """The tutorial's recipe by default (batch 4, SGD 0.001/0.9, StepLR(7, 0.1), 25 epochs)."""
  strategy: str = 'finetune'        # frozen: only fc learns; finetune: everything learns
  arch: str = 'resnet18'
  weights: str = 'imagenet'         # imagenet | random | PATH (.pth / .safetensors)
  data: str = 'data/hymenoptera_data'
  epochs: int = 25
  batch_size: int = 4
  # Eval-mode BN makes val outputs independent of how images are batched, so val can use a
  # larger batch than training (fewer, better-filled steps) without changing any number.
  eval_batch_size: int = 32
  lr: float = 0.001
  momentum: float = 0.9
  step_size_epochs: int = 7         # StepLR(step_size=7, gamma=0.1), stepped once per epoch
  gamma: float = 0.1
  bn: str = 'train'                 # train: BN uses batch stats in the train phase (tutorial); frozen: eval-mode BN
  seed: int = 0
  workers: int = 2                  # decode/augment threads
  prefetch: int = 4                 # batches prepared ahead of the step
  skip_bad_images: bool = False

  def validate(self) -> 'TrainConfig':
    from tl_jax.models import ARCHS
    checks = [
        (self.strategy in STRATEGIES, f'strategy must be one of {STRATEGIES}, got {self.strategy!r}'),
        (self.bn in BN_POLICIES, f'bn must be one of {BN_POLICIES}, got {self.bn!r}'),
        (self.arch in ARCHS, f'arch must be one of {sorted(ARCHS)}, got {self.arch!r}'),
        (self.epochs >= 1, f'epochs must be >= 1, got {self.epochs}'),
        (self.batch_size >= 2, f'batch_size must be >= 2 (train-mode BatchNorm needs 2 samples), got {self.batch_size}'),
        (self.eval_batch_size >= 1, f'eval_batch_size must be >= 1, got {self.eval_batch_size}'),
        (self.lr > 0, f'lr must be > 0, got {self.lr}'),
        (0 <= self.momentum < 1, f'momentum must be in [0, 1), got {self.momentum}'),
        (self.step_size_epochs >= 1, f'step_size_epochs must be >= 1, got {self.step_size_epochs}'),
        (0 < self.gamma <= 1, f'gamma must be in (0, 1], got {self.gamma}'),
        (self.workers >= 0, f'workers must be >= 0, got {self.workers}'),
        (self.prefetch >= 1, f'prefetch must be >= 1, got {self.prefetch}'),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(message)
    return self

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def load_config(path: Optional[str | Path] = None, **overrides: Any) -> TrainConfig:
  """Defaults <- YAML file <- overrides (None values ignored), validated."""
  values: dict[str, Any] = {}
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise ConfigError(f'config file {path} not found')
    try:
      loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f'{path} is not valid YAML: {e}') from e
    if not isinstance(loaded, dict):
      raise ConfigError(f'{path} must hold a mapping of config keys')
    values.update(loaded)
  values.update({k: v for k, v in overrides.items() if v is not None})
  known = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f'unknown config keys {unknown}; known: {sorted(known)}')
  source = f' in {path}' if path is not None else ''
  return TrainConfig(**{k: _typed(k, v, source) for k, v in values.items()}).validate()


def _typed(key: str, value: Any, source: str) -> Any:
  """`value` as the type of TrainConfig's default for `key` (an int is a float too); else ConfigError."""
  expected = type(getattr(TrainConfig, key))
  if expected is float and isinstance(value, (int, str)) and not isinstance(value, bool):
    # An int is a float too, and YAML 1.1 reads `1e-3` (no dot) as a string meant as a number.
    try:
      return float(value)
    except ValueError:
      pass
  if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
    return value
  raise ConfigError(f'{key}{source} must be {_TYPE_NAMES[expected]}, got {value!r}')


_TYPE_NAMES = {int: 'a whole number', float: 'a number', bool: 'true or false', str: 'a string'}
