"""torchvision SqueezeNet 1.0 and 1.1 in Flax, NHWC.

Top-level modules are torch's with '.' -> '_': `features_0` is the first conv, `features_N` a Fire
module (each its own stage 'features.N'), `classifier_1` the final 1x1 conv (the head).

SqueezeNet classifies with a conv on the last feature map, followed by ReLU and the average pool,
so nothing can be pooled before the head: `features` returns the 512-channel map flattened in
torch's (C, H, W) order (`torch.flatten(model.features(x), 1)`; (B, 512 * 13 * 13) for 224 px),
and `from_features` folds it back into a square map. `FAMILY` registers the family
(tl_jax.models.registry).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.family import HEAD as HEAD_STAGE, Entry, Family, check_create_args, conv_entries
from tl_jax.models.layers import max_pool
from tl_jax.models.resnet import torch_linear_init

# torch's `features` index -> ('conv', out, kernel, stride) | ('pool',) | ('fire', squeeze, expand1x1, expand3x3).
_LAYOUTS: dict[str, dict[int, tuple]] = {
    'squeezenet1_0': {0: ('conv', 96, 7, 2), 2: ('pool',), 3: ('fire', 16, 64, 64), 4: ('fire', 16, 64, 64),
                      5: ('fire', 32, 128, 128), 6: ('pool',), 7: ('fire', 32, 128, 128),
                      8: ('fire', 48, 192, 192), 9: ('fire', 48, 192, 192), 10: ('fire', 64, 256, 256),
                      11: ('pool',), 12: ('fire', 64, 256, 256)},
    'squeezenet1_1': {0: ('conv', 64, 3, 2), 2: ('pool',), 3: ('fire', 16, 64, 64), 4: ('fire', 16, 64, 64),
                      5: ('pool',), 6: ('fire', 32, 128, 128), 7: ('fire', 32, 128, 128), 8: ('pool',),
                      9: ('fire', 48, 192, 192), 10: ('fire', 48, 192, 192), 11: ('fire', 64, 256, 256),
                      12: ('fire', 64, 256, 256)},
}
ARCHS = tuple(_LAYOUTS)

FEATURE_CHANNELS = 512
NATIVE_MAP = 13                    # the last feature map is 13x13 at 224 px in both versions
NUM_FEATURES = FEATURE_CHANNELS * NATIVE_MAP * NATIVE_MAP
DROPOUT = 0.5
HEAD = 'classifier_1'
# Each version's modules with parameters, in torch's order (1.0's max-pool at 6 is a Fire module in 1.1, ...).
STAGES: dict[str, tuple[str, ...]] = {
    arch: tuple(f'features.{i}' for i, spec in layout.items() if spec[0] != 'pool')
    for arch, layout in _LAYOUTS.items()}
_TOP_LEVEL = {stage.replace('.', '_'): stage for stages in STAGES.values() for stage in stages}
_TOP_LEVEL[HEAD] = HEAD_STAGE

# torchvision's SqueezeNet init: kaiming_uniform_ (a=0: gain sqrt(2), fan_in) and zero bias for every
# conv but the final one, which gets N(0, 0.01).
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0, dtype: Any = None,
          name: Optional[str] = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                 kernel_init=_conv_init, bias_init=nn.initializers.zeros, dtype=dtype, name=name)


def ceil_mode_padding(size: int, window: int, stride: int) -> tuple[int, int]:
  """(before, after) padding that makes a VALID pool give torch's ceil_mode=True output size.

  torch rounds the output size up but drops a last window that would start past the input."""
  out = -(-(size - window) // stride) + 1
  if (out - 1) * stride >= size:
    out -= 1
  return 0, max(0, (out - 1) * stride + window - size)


def _ceil_max_pool(x_bhwc: jax.Array) -> jax.Array:
  """MaxPool2d(3, 2, ceil_mode=True): the extra windows are padded with -inf (layers.max_pool)."""
  _, h, w, _ = x_bhwc.shape
  return max_pool(x_bhwc, (3, 3), (2, 2), (ceil_mode_padding(h, 3, 2), ceil_mode_padding(w, 3, 2)))


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Fire(nn.Module):
  """1x1 squeeze, then 1x1 and 3x3 expands concatenated (1x1 first), each conv followed by ReLU."""
  squeeze_planes: int
  expand1x1_planes: int
  expand3x3_planes: int
  dtype: Any = None

  def setup(self):
    self.squeeze = _conv(self.squeeze_planes, 1, dtype=self.dtype)
    self.expand1x1 = _conv(self.expand1x1_planes, 1, dtype=self.dtype)
    self.expand3x3 = _conv(self.expand3x3_planes, 3, padding=1, dtype=self.dtype)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    x = nn.relu(self.squeeze(x_bhwc))
    return jnp.concatenate([nn.relu(self.expand1x1(x)), nn.relu(self.expand3x3(x))], axis=-1)


class SqueezeNet(nn.Module):
  """torchvision SqueezeNet: `features` is the flattened 512-channel map, `from_features` the classifier.

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `classifier_1`, the final 1x1 conv.
    dtype: compute dtype of the convs (None: that of inputs and params); features and logits come
      back at least float32.
    dropout_rate: torch's Dropout(p) before the final conv (0.5); active only with `train=True`,
      where it draws from the 'dropout' rng.
  """
  arch: str = 'squeezenet1_1'
  num_classes: int = 1000
  dtype: Any = None
  dropout_rate: float = DROPOUT

  def setup(self):
    layers = []
    for index, spec in _LAYOUTS[self.arch].items():
      if spec[0] == 'conv':
        layers.append(_conv(spec[1], spec[2], spec[3], dtype=self.dtype, name=f'features_{index}'))
      elif spec[0] == 'fire':
        layers.append(Fire(*spec[1:], dtype=self.dtype, name=f'features_{index}'))
    self.layers = layers
    # A fresh nn.Conv2d(512, K, 1) as the PyTorch tutorial puts in place of classifier[1]: torch's
    # default init, U(-1/sqrt(512), 1/sqrt(512)) for weight and bias.
    self.classifier_1 = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                                kernel_init=torch_linear_init(FEATURE_CHANNELS),
                                bias_init=torch_linear_init(FEATURE_CHANNELS))
    self.dropout = nn.Dropout(self.dropout_rate)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> the last map (B, 512 * H' * W') in torch's (C, H, W) flatten order."""
    del train, mask_b   # no BatchNorm
    x, layers = x_bhwc, iter(self.layers)
    for spec in _LAYOUTS[self.arch].values():
      if spec[0] == 'pool':
        x = _ceil_max_pool(x)
      elif spec[0] == 'conv':
        x = nn.relu(next(layers)(x))
      else:
        x = next(layers)(x)
    x = _at_least_f32(x)
    return jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's classifier on the map `features` flattened: Dropout, 1x1 conv, ReLU, global average pool."""
    side = math.isqrt(features_bd.shape[1] // FEATURE_CHANNELS)
    if FEATURE_CHANNELS * side * side != features_bd.shape[1]:
      raise ValueError(f'{features_bd.shape[1]} features are not a square map of {FEATURE_CHANNELS} channels')
    x = jnp.transpose(features_bd.reshape((-1, FEATURE_CHANNELS, side, side)), (0, 2, 3, 1))
    x = nn.relu(self.classifier_1(self.dropout(x, deterministic=not train)))
    return jnp.mean(_at_least_f32(x), axis=(1, 2))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits; `train` turns on dropout (SqueezeNet has no BatchNorm for `bn_train` to drive)."""
    del bn_train
    return self.from_features(self.features(x_bhwc, train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None,
                 fast_backward: Optional[bool] = None) -> SqueezeNet:
  """SqueezeNet `arch` (one of ARCHS) with a `num_classes`-way final conv, computing in `dtype` (None: float32)."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return SqueezeNet(arch=arch, num_classes=num_classes, dtype=dtype)


def stage_of(module_name: str) -> Optional[str]:
  """features_5 -> 'features.5', classifier_1 -> 'head'; None for another family's name."""
  return _TOP_LEVEL.get(module_name)


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's `arch`, in its state dict's order, with its place in Flax."""
  table = []
  for index, spec in _LAYOUTS[arch].items():
    if spec[0] == 'conv':
      table += conv_entries(f'features.{index}', (f'features_{index}',), bias=True)
    elif spec[0] == 'fire':
      for conv in ('squeeze', 'expand1x1', 'expand3x3'):
        table += conv_entries(f'features.{index}.{conv}', (f'features_{index}', conv), bias=True)
  if include_head:
    table += conv_entries('classifier.1', (HEAD,), bias=True)
  return table


FAMILY = Family(
    name='squeezenet',
    archs={'squeezenet1_0': 'squeezenet1_0-b66bff10.pth', 'squeezenet1_1': 'squeezenet1_1-b8a52dc0.pth'},
    create=create_model,
    stages=STAGES.__getitem__,
    head=HEAD, head_torch='classifier.1', head_stages=(HEAD_STAGE,),
    stage_of=stage_of,
    num_features=lambda arch: NUM_FEATURES,   # at 224 px; the map, hence the width, follows the input size
    features_have_batch_norm=lambda arch: False,
    name_table=torch_name_table,
)
