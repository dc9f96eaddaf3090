"""Flax modules that compute what torchvision's models compute."""

from tl_jax.models.layers import BatchNorm
from tl_jax.models.resnet import ARCHS, STAGES, ResNet, create_model, init_variables, num_features

__all__ = ['ARCHS', 'STAGES', 'arch_stages', 'BatchNorm', 'ResNet', 'create_model', 'init_variables', 'num_features']


def arch_stages(arch: str) -> tuple[str, ...]:
  """The stages of `arch` that a recipe can freeze or train, input to output."""
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(ARCHS)}')
  return STAGES + ('head',)
