"""torchvision ShuffleNetV2 (x0.5, x1.0, x1.5, x2.0) in Flax, NHWC.

Top-level modules are torch's with '.' -> '_': `conv1_0` / `conv1_1` (conv, BN: stage 'conv1'),
`stage2_0` .. `stage4_3` the InvertedResidual blocks (stages 'stage2'..'stage4'), `conv5_0` /
`conv5_1` (stage 'conv5') and `fc` (the head). `FAMILY` registers the family
(tl_jax.models.registry).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models import fast_conv
from tl_jax.models.family import HEAD, Entry, Family, bn_entries, check_create_args, conv_entries, linear_entries
from tl_jax.models.layers import BatchNorm, max_pool
from tl_jax.models.resnet import torch_linear_init

STAGE_REPEATS = (4, 8, 4)
# stages_out_channels of each arch: conv1, stage2, stage3, stage4, conv5.
ARCHS: dict[str, tuple[int, ...]] = {
    'shufflenet_v2_x0_5': (24, 48, 96, 192, 1024),
    'shufflenet_v2_x1_0': (24, 116, 232, 464, 1024),
    'shufflenet_v2_x1_5': (24, 176, 352, 704, 1024),
    'shufflenet_v2_x2_0': (24, 244, 488, 976, 2048),
}
STAGES = ('conv1', 'stage2', 'stage3', 'stage4', 'conv5')

# ShuffleNetV2 has no init of its own: torch's defaults, kaiming_uniform_(a=sqrt(5)) for conv weights,
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in of a depthwise 3x3 is 9, as Flax counts it too).
_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1, dtype: Any = None,
          name: Optional[str] = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                 feature_group_count=groups,
                 # XLA:CPU-friendly (depthwise: shifted taps; plain: fast_conv.conv2d)
                 conv_general_dilated=fast_conv.conv_general_dilated, use_bias=False,
                 kernel_init=_default_kernel_init, dtype=dtype,
                 name=name)


def channel_shuffle(x_bhwc: jax.Array, groups: int) -> jax.Array:
  """torch's channel_shuffle: channel i * (C / groups) + j moves to j * groups + i."""
  b, h, w, c = x_bhwc.shape
  return jnp.swapaxes(x_bhwc.reshape((b, h, w, groups, c // groups)), -1, -2).reshape((b, h, w, c))


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class InvertedResidual(nn.Module):
  """torchvision's ShuffleNetV2 block; submodules `branch1_0` .. `branch2_6` are torch's Sequential indices.

  Stride 1 passes the first half of the channels through and transforms the second (branch2);
  stride 2 transforms all of them twice (branch1, branch2), doubling the width. Then shuffle."""
  in_channels: int
  out_channels: int
  stride: int
  dtype: Any = None

  def setup(self):
    width = self.out_channels // 2
    if self.stride > 1:
      self.branch1_0 = _conv(self.in_channels, 3, self.stride, 1, groups=self.in_channels, dtype=self.dtype)
      self.branch1_1 = BatchNorm()
      self.branch1_2 = _conv(width, 1, dtype=self.dtype)
      self.branch1_3 = BatchNorm()
    self.branch2_0 = _conv(width, 1, dtype=self.dtype)
    self.branch2_1 = BatchNorm()
    self.branch2_3 = _conv(width, 3, self.stride, 1, groups=width, dtype=self.dtype)
    self.branch2_4 = BatchNorm()
    self.branch2_5 = _conv(width, 1, dtype=self.dtype)
    self.branch2_6 = BatchNorm()

  def _branch2(self, x, train, mask_b):
    x = nn.relu(self.branch2_1(self.branch2_0(x), train, mask_b))
    x = self.branch2_4(self.branch2_3(x), train, mask_b)
    return nn.relu(self.branch2_6(self.branch2_5(x), train, mask_b))

  def __call__(self, x_bhwc: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    if self.stride == 1:
      half = x_bhwc.shape[-1] // 2
      out = jnp.concatenate([x_bhwc[..., :half], self._branch2(x_bhwc[..., half:], train, mask_b)], axis=-1)
    else:
      left = self.branch1_1(self.branch1_0(x_bhwc), train, mask_b)
      left = nn.relu(self.branch1_3(self.branch1_2(left), train, mask_b))
      out = jnp.concatenate([left, self._branch2(x_bhwc, train, mask_b)], axis=-1)
    return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
  """torchvision ShuffleNetV2: `features` is everything up to the spatial mean, `from_features` is `fc`.

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `fc`.
    dtype: compute dtype of convs and the fc (None: that of inputs and params); params, BatchNorm
      statistics, features and logits stay at least float32.
  """
  arch: str = 'shufflenet_v2_x1_0'
  num_classes: int = 1000
  dtype: Any = None

  def setup(self):
    channels = ARCHS[self.arch]
    self.conv1_0 = _conv(channels[0], 3, 2, 1, dtype=self.dtype)
    self.conv1_1 = BatchNorm()
    in_channels = channels[0]
    for stage, (repeats, width) in enumerate(zip(STAGE_REPEATS, channels[1:4]), start=2):
      blocks = [InvertedResidual(in_channels if i == 0 else width, width, 2 if i == 0 else 1, self.dtype,
                                 name=f'stage{stage}_{i}') for i in range(repeats)]
      setattr(self, f'stage{stage}', blocks)
      in_channels = width
    self.conv5_0 = _conv(channels[4], 1, dtype=self.dtype)
    self.conv5_1 = BatchNorm()
    # Drawn as a fresh nn.Linear(C, K), the layer the material puts in place of `fc`.
    self.fc = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_linear_init(channels[4]),
                       bias_init=torch_linear_init(channels[4]))

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> (B, conv5 width), conv5's output averaged over H and W."""
    x = nn.relu(self.conv1_1(self.conv1_0(x_bhwc), train, mask_b))
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage in (2, 3, 4):
      for block in getattr(self, f'stage{stage}'):
        x = block(x, train, mask_b)
    x = nn.relu(self.conv5_1(self.conv5_0(x), train, mask_b))
    return jnp.mean(_at_least_f32(x), axis=(1, 2))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """`fc` (no dropout in ShuffleNetV2)."""
    del train
    return _at_least_f32(self.fc(features_bd))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits; `bn_train` (default `train`) drives BatchNorm, the only train-mode difference."""
    return self.from_features(self.features(x_bhwc, train if bn_train is None else bn_train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None,
                 fast_backward: Optional[bool] = None) -> ShuffleNetV2:
  """ShuffleNetV2 `arch` (one of ARCHS) with a `num_classes`-way `fc`, computing in `dtype` (None: float32)."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return ShuffleNetV2(arch=arch, num_classes=num_classes, dtype=dtype)


_TOP_LEVEL = {'conv1_0': 'conv1', 'conv1_1': 'conv1', 'conv5_0': 'conv5', 'conv5_1': 'conv5', 'fc': HEAD}
_TOP_LEVEL.update({f'stage{stage}_{i}': f'stage{stage}'
                   for stage, repeats in zip((2, 3, 4), STAGE_REPEATS) for i in range(repeats)})


def stage_of(module_name: str) -> Optional[str]:
  """conv1_1 -> 'conv1', stage3_5 -> 'stage3', conv5_0 -> 'conv5', fc -> 'head'; None for another family's name."""
  return _TOP_LEVEL.get(module_name)


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's `arch`, in its state dict's order, with its place in Flax."""
  del arch   # the widths differ, the names do not
  table = conv_entries('conv1.0', ('conv1_0',)) + bn_entries('conv1.1', ('conv1_1',))
  for stage, repeats in zip((2, 3, 4), STAGE_REPEATS):
    for i in range(repeats):
      t, f = f'stage{stage}.{i}', f'stage{stage}_{i}'
      branches = (('branch1', (0, 1, 2, 3)),) if i == 0 else ()
      for branch, indices in branches + (('branch2', (0, 1, 3, 4, 5, 6)),):
        for index in indices:
          # Each branch alternates conv, BatchNorm (ReLUs at branch1.4, branch2.2 and branch2.7).
          is_conv = (index in (0, 2)) if branch == 'branch1' else (index in (0, 3, 5))
          make = conv_entries if is_conv else bn_entries
          table += make(f'{t}.{branch}.{index}', (f, f'{branch}_{index}'))
  table += conv_entries('conv5.0', ('conv5_0',)) + bn_entries('conv5.1', ('conv5_1',))
  if include_head:
    table += linear_entries('fc', 'fc')
  return table


FAMILY = Family(
    name='shufflenet',
    archs={'shufflenet_v2_x0_5': 'shufflenetv2_x0.5-f707e7126e.pth',
           'shufflenet_v2_x1_0': 'shufflenetv2_x1-5666bf0f80.pth',
           'shufflenet_v2_x1_5': 'shufflenetv2_x1_5-3c479a10.pth',
           'shufflenet_v2_x2_0': 'shufflenetv2_x2_0-8be3c8ee.pth'},
    create=create_model,
    stages=STAGES,
    head='fc', head_torch='fc', head_stages=(HEAD,),
    stage_of=stage_of,
    num_features=lambda arch: ARCHS[arch][4],
    features_have_batch_norm=lambda arch: True,
    name_table=torch_name_table,
)
