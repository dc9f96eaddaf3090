"""Flax modules that compute what torchvision's models compute."""

from tl_jax.models.layers import BatchNorm
from tl_jax.models.resnet import ARCHS, STAGES, ResNet, create_model, init_variables, num_features

__all__ = ['ARCHS', 'STAGES', 'BatchNorm', 'ResNet', 'create_model', 'init_variables', 'num_features']
