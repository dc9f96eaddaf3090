"""The convolutional base of a torchvision classifier, and a model of that base under any Flax head.

The material builds regressors from `nn.Sequential(*list(resnet.children())[:-1])` with its own
`Linear(in_features, 1)` heads. `Backbone(arch)` is that base (ResNet: everything but `fc`;
VGG: `features` + avgpool, flattened) with the parameter names of the full model, so
`tl_jax.convert.torch_to_flax(..., base_only=True)` loads straight into it;
`TransferModel(arch, head)` puts any Flax module on top. The head may return an array, a
tuple or a dict.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import flax.linen as nn
import jax

from tl_jax.models.registry import family_of


def num_features(arch: str) -> int:
  """Width of the flattened features: 512 or 2048 for ResNets, 512*7*7 for VGGs."""
  return family_of(arch).num_features(arch)


class Backbone(nn.Module):
  """Images (NHWC, normalised) -> pooled, flattened features (B, num_features(arch))."""
  arch: str = 'resnet18'

  def setup(self):
    # The full classifier with its head never called: the head has no parameters, and sharing
    # the scope keeps the classifier's parameter names (conv1, layer1_0, block1_conv1, ...).
    self.net = family_of(self.arch).create(self.arch, 1)
    nn.share_scope(self, self.net)

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """`train` drives dropout and stochastic depth and, unless `bn_train` says otherwise, BatchNorm
    (torch's model.train() with the BN modules alone put in eval() for `bn: frozen`)."""
    if bn_train is None or bn_train == train:
      return self.net.features(x_bhwc, train, mask_b)
    if 'bn_train' in inspect.signature(self.net.features).parameters:   # BatchNorm and stochastic depth
      return self.net.features(x_bhwc, train, mask_b, bn_train=bn_train)
    family = family_of(self.arch)
    # Features with BatchNorm and nothing random (ResNet, VGG, DenseNet, ...): `train` is BatchNorm's
    # alone. Without BatchNorm (ConvNeXt, ViT, Swin): `train` is their stochastic depth and dropout's.
    return self.net.features(x_bhwc, bn_train if family.features_have_batch_norm(self.arch) else train, mask_b)


class TransferModel(nn.Module):
  """`Backbone(arch)` under `head`, any Flax module of the (B, num_features) features.

  Parameters are {'backbone': <the classifier's names, its head aside>, 'head': <the head's>};
  each top-level submodule of the head is a stage of its own for freezing (see `stage_tree`).

  Attributes:
    arch: backbone architecture (one of tl_jax.models.ARCHS).
    head: the user's module; its output (array, tuple or dict) is the model's output.
  """
  arch: str
  head: nn.Module

  def setup(self):
    self.backbone = Backbone(self.arch)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    return self.backbone(x_bhwc, train, mask_b)

  def from_features(self, features_bd: jax.Array, train: bool = False) -> Any:
    """The head on backbone features (the models' common name; see tl_jax.feature_cache)."""
    del train
    return self.head(features_bd)

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> Any:
    return self.head(self.backbone(x_bhwc, train, mask_b, bn_train))
