"""torchvision AlexNet in Flax, NHWC.

Top-level modules are torch's with '.' -> '_': `features_0` .. `features_10` are the five convs
(torch's `features.N`, each its own stage 'features.N'), `classifier_1` / `classifier_4` the two
4096-wide Linear layers (stage 'classifier') and `classifier_6` the last one (the head).
`FAMILY` registers the family (tl_jax.models.registry).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.family import HEAD as HEAD_STAGE, Entry, Family, check_create_args, conv_entries, linear_entries
from tl_jax.models.layers import max_pool
from tl_jax.models.resnet import torch_linear_init
from tl_jax.models.vgg import adaptive_avg_pool

ARCHS = ('alexnet',)

# (torch index in `features`, out channels, kernel, stride, padding, max-pool after it)
_CONVS = ((0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, False),
          (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, True))
_IN_CHANNELS = (3, 64, 192, 384, 256)

STAGES = tuple(f'features.{index}' for index, *_ in _CONVS) + ('classifier',)
POOL_SIZE = 6                      # AdaptiveAvgPool2d((6, 6))
NUM_FEATURES = 256 * POOL_SIZE * POOL_SIZE
HIDDEN = 4096
DROPOUT = 0.5
HEAD = 'classifier_6'
_TOP_LEVEL = {f'features_{index}': f'features.{index}' for index, *_ in _CONVS}
_TOP_LEVEL.update({'classifier_1': 'classifier', 'classifier_4': 'classifier', HEAD: HEAD_STAGE})

# AlexNet has no init of its own: torch's defaults, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every
# weight and bias (kaiming_uniform_ with a=sqrt(5) is that bound for the weights).
_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class AlexNet(nn.Module):
  """torchvision AlexNet: `features` is convs + avgpool + flatten (B, 9216), `from_features` the classifier.

  Attributes:
    arch: 'alexnet'.
    num_classes: outputs of `classifier_6`.
    dtype: compute dtype of convs and matmuls (None: that of inputs and params); the features
      and logits come back at least float32.
    dropout_rate: torch's Dropout(p) before classifier[1] and [4] (0.5); active only with
      `train=True`, where it draws from the 'dropout' rng.
  """
  arch: str = 'alexnet'
  num_classes: int = 1000
  dtype: Any = None
  dropout_rate: float = DROPOUT

  def setup(self):
    self.convs = [
        nn.Conv(width, (k, k), strides=(s, s), padding=((p, p), (p, p)), dtype=self.dtype,
                kernel_init=_default_kernel_init, bias_init=torch_linear_init(c_in * k * k),
                name=f'features_{index}')
        for (index, width, k, s, p, _), c_in in zip(_CONVS, _IN_CHANNELS)]
    self.classifier_1 = nn.Dense(HIDDEN, dtype=self.dtype, kernel_init=torch_linear_init(NUM_FEATURES),
                                 bias_init=torch_linear_init(NUM_FEATURES))
    self.classifier_4 = nn.Dense(HIDDEN, dtype=self.dtype, kernel_init=torch_linear_init(HIDDEN),
                                 bias_init=torch_linear_init(HIDDEN))
    # Drawn as a fresh nn.Linear(4096, K), the layer the material puts in place of classifier[6].
    self.classifier_6 = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_linear_init(HIDDEN),
                                 bias_init=torch_linear_init(HIDDEN))
    self.dropout = nn.Dropout(self.dropout_rate)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> (B, 9216) in torch's (C, H, W) flatten order; no BatchNorm to train."""
    del train, mask_b
    x = x_bhwc
    for conv, (*_, pool_after) in zip(self.convs, _CONVS):
      x = nn.relu(conv(x))
      if pool_after:
        # MaxPool2d(3, 2) without padding: floor mode drops what does not fill a window, as VALID does.
        x = max_pool(x, (3, 3), (2, 2), ((0, 0), (0, 0)))
    x = adaptive_avg_pool(_at_least_f32(x), POOL_SIZE)
    # torch flattens (C, H, W): transposing keeps classifier_1's kernel a plain transpose of torch's weight.
    return jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's classifier: Dropout-Linear-ReLU-Dropout-Linear-ReLU-Linear."""
    x = nn.relu(self.classifier_1(self.dropout(features_bd, deterministic=not train)))
    x = nn.relu(self.classifier_4(self.dropout(x, deterministic=not train)))
    return _at_least_f32(self.classifier_6(x))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits; `train` turns on dropout (AlexNet has no BatchNorm for `bn_train` to drive)."""
    del bn_train
    return self.from_features(self.features(x_bhwc, train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> AlexNet:
  """AlexNet with a `num_classes`-way `classifier_6`, computing in `dtype` (None: float32)."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return AlexNet(arch=arch, num_classes=num_classes, dtype=dtype)


def stage_of(module_name: str) -> Optional[str]:
  """features_3 -> 'features.3', classifier_1/_4 -> 'classifier', classifier_6 -> 'head'; None otherwise."""
  return _TOP_LEVEL.get(module_name)


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's AlexNet, in its state dict's order, with its place in Flax."""
  del arch
  table = []
  for index, *_ in _CONVS:
    table += conv_entries(f'features.{index}', (f'features_{index}',), bias=True)
  table += linear_entries('classifier.1', 'classifier_1') + linear_entries('classifier.4', 'classifier_4')
  if include_head:
    table += linear_entries('classifier.6', HEAD)
  return table


FAMILY = Family(
    name='alexnet',
    archs={'alexnet': 'alexnet-owt-7be5be79.pth'},
    create=create_model,
    stages=STAGES,
    head=HEAD, head_torch='classifier.6', head_stages=('classifier', HEAD_STAGE),
    stage_of=stage_of,
    num_features=lambda arch: NUM_FEATURES,
    features_have_batch_norm=lambda arch: False,
    name_table=torch_name_table,
    init_size=lambda arch: 64,   # the smallest input torch's AlexNet takes is 63 px
)
