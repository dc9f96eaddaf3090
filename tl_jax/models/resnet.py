"""torchvision ResNets (v1.5: stride on the 3x3 conv), ResNeXts and wide ResNets in Flax, NHWC.

Every padding is written out as torch's: Flax's 'SAME' pads asymmetrically for even
inputs with stride 2 and would shift every feature map by a pixel.
Submodule names mirror torchvision's (`layer1_0` is `layer1.0`) so the torch name table
(`torch_name_table`) reads one to one. `FAMILY` registers the family (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from tl_jax.models import fast_conv
from tl_jax.models import winograd as winograd_conv
from tl_jax.models.family import HEAD, Entry, Family, bn_entries, conv_entries, linear_entries
from tl_jax.models.layers import BatchNorm, max_pool

# torch's default init for conv weights (kaiming_normal_, fan_out, relu) as torchvision's ResNet uses.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0, name: Optional[str] = None,
          dtype: Any = None, fast_backward: bool = True, groups: int = 1, winograd: bool = False) -> nn.Conv:
  # fast_backward: same values, conv gradients XLA:CPU computes faster (see fast_conv); its
  # rewrites are for ungrouped convs, and it hands ResNeXt's grouped ones to lax unchanged.
  # winograd: the 3x3 stride-1 convs the measured policy marks run as Winograd on CPU (tl_jax.models.winograd).
  direct = fast_conv.conv_general_dilated if fast_backward else lax.conv_general_dilated
  conv_fn = functools.partial(winograd_conv.conv_general_dilated, fallback=direct) if winograd else direct
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 feature_group_count=groups, kernel_init=_conv_init, name=name, dtype=dtype,
                 conv_general_dilated=conv_fn)


def torch_linear_init(fan_in: int):
  """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class BasicBlock(nn.Module):
  """Two 3x3 convs; torchvision's BasicBlock (expansion 1)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = None
  fast_backward: bool = True
  winograd: bool = False
  expansion = 1

  def setup(self):
    self.conv1 = _conv(self.planes, 3, self.stride, 1, dtype=self.dtype, fast_backward=self.fast_backward,
                       winograd=self.winograd)
    self.bn1 = BatchNorm()
    self.conv2 = _conv(self.planes, 3, 1, 1, dtype=self.dtype, fast_backward=self.fast_backward,
                       winograd=self.winograd)
    self.bn2 = BatchNorm()
    if self.downsample:
      self.downsample_conv = _conv(self.planes, 1, self.stride, 0, dtype=self.dtype,
                                   fast_backward=self.fast_backward)
      self.downsample_bn = BatchNorm()

  def __call__(self, x, train: bool, mask=None):
    out = nn.relu(self.bn1(self.conv1(x), train, mask))
    out = self.bn2(self.conv2(out), train, mask)
    identity = self.downsample_bn(self.downsample_conv(x), train, mask) if self.downsample else x
    return nn.relu(out + identity)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, grouped for ResNeXt) -> 1x1 convs; torchvision's Bottleneck (expansion 4).

  The inner width is torch's `int(planes * base_width / 64) * groups`: `planes` for ResNet,
  e.g. 4 x 32 groups for resnext50_32x4d's first stage, 2 x planes for the wide ResNets.
  """
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = None
  fast_backward: bool = True
  groups: int = 1
  base_width: int = 64
  winograd: bool = False
  expansion = 4

  def setup(self):
    width = int(self.planes * (self.base_width / 64.0)) * self.groups
    self.conv1 = _conv(width, 1, dtype=self.dtype, fast_backward=self.fast_backward)
    self.bn1 = BatchNorm()
    self.conv2 = _conv(width, 3, self.stride, 1, dtype=self.dtype, fast_backward=self.fast_backward,
                       groups=self.groups, winograd=self.winograd)
    self.bn2 = BatchNorm()
    self.conv3 = _conv(self.planes * 4, 1, dtype=self.dtype, fast_backward=self.fast_backward)
    self.bn3 = BatchNorm()
    if self.downsample:
      self.downsample_conv = _conv(self.planes * 4, 1, self.stride, 0, dtype=self.dtype,
                                   fast_backward=self.fast_backward)
      self.downsample_bn = BatchNorm()

  def __call__(self, x, train: bool, mask=None):
    out = nn.relu(self.bn1(self.conv1(x), train, mask))
    out = nn.relu(self.bn2(self.conv2(out), train, mask))
    out = self.bn3(self.conv3(out), train, mask)
    identity = self.downsample_bn(self.downsample_conv(x), train, mask) if self.downsample else x
    return nn.relu(out + identity)


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  block: str                 # 'basic' | 'bottleneck'
  stage_sizes: tuple[int, ...]
  groups: int = 1            # torch's `groups` of the Bottleneck's 3x3 conv (ResNeXt)
  width_per_group: int = 64  # torch's `width_per_group` (ResNeXt, wide ResNets)

  @property
  def block_cls(self):
    return BasicBlock if self.block == 'basic' else Bottleneck

  @property
  def num_features(self) -> int:
    return 512 * self.block_cls.expansion


ARCHS: dict[str, ResNetSpec] = {
    'resnet18': ResNetSpec('basic', (2, 2, 2, 2)),
    'resnet34': ResNetSpec('basic', (3, 4, 6, 3)),
    'resnet50': ResNetSpec('bottleneck', (3, 4, 6, 3)),
    'resnet101': ResNetSpec('bottleneck', (3, 4, 23, 3)),
    'resnet152': ResNetSpec('bottleneck', (3, 8, 36, 3)),
    'resnext50_32x4d': ResNetSpec('bottleneck', (3, 4, 6, 3), groups=32, width_per_group=4),
    'resnext101_32x8d': ResNetSpec('bottleneck', (3, 4, 23, 3), groups=32, width_per_group=8),
    'resnext101_64x4d': ResNetSpec('bottleneck', (3, 4, 23, 3), groups=64, width_per_group=4),
    'wide_resnet50_2': ResNetSpec('bottleneck', (3, 4, 6, 3), width_per_group=128),
    'wide_resnet101_2': ResNetSpec('bottleneck', (3, 4, 23, 3), width_per_group=128),
}

STAGES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4')


class ResNet(nn.Module):
  """torchvision ResNet: `features` is everything up to the pooled vector, `head` is `fc`.

  The split lets a frozen-backbone train step run the backbone outside `jax.grad`, so no
  backward pass goes through what does not learn.
  """
  arch: str = 'resnet18'
  num_classes: int = 1000
  # Compute dtype of convs and the fc (e.g. jnp.bfloat16); params, BatchNorm statistics and the
  # logits stay float32. None: the dtype of the inputs and params (float32, or float64 in tests).
  dtype: Any = None
  # True: conv gradients through tl_jax's XLA:CPU rewrites (see create_model); same values.
  fast_backward: bool = True
  # True: 3x3 stride-1 convs as Winograd on CPU where the measured policy says it is faster (create_model).
  winograd: bool = False

  def setup(self):
    spec = ARCHS[self.arch]
    self.conv1 = _conv(64, 7, 2, 3, dtype=self.dtype, fast_backward=self.fast_backward)
    self.bn1 = BatchNorm()
    in_planes = 64
    for stage, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), spec.stage_sizes), start=1):
      blocks = []
      for index in range(num_blocks):
        stride = 2 if (stage > 1 and index == 0) else 1
        needs_downsample = index == 0 and (stride != 1 or in_planes != planes * spec.block_cls.expansion)
        grouping = {} if spec.block == 'basic' else {'groups': spec.groups, 'base_width': spec.width_per_group}
        blocks.append(spec.block_cls(planes, stride, needs_downsample, self.dtype, self.fast_backward,
                                     winograd=self.winograd, name=f'layer{stage}_{index}', **grouping))
        in_planes = planes * spec.block_cls.expansion
      setattr(self, f'layer{stage}', blocks)
    self.fc = nn.Dense(self.num_classes, kernel_init=torch_linear_init(spec.num_features),
                       bias_init=torch_linear_init(spec.num_features), dtype=self.dtype, name='fc')

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               return_stages: bool = False) -> Any:
    """Backbone: image batch (NHWC, normalised) -> pooled features (B, num_features).

    With `return_stages`, also returns {'stem', 'layer1'..'layer4'} activations (NHWC)."""
    stages = {}
    x = nn.relu(self.bn1(self.conv1(x_bhwc), train, mask_b))
    # torch's MaxPool2d with torch's gradient (layers.max_pool): JAX's own max-pool gradient builds
    # index arrays of the padded input on CPU, about 5 % of the finetune step's time.
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    stages['stem'] = x
    for stage in range(1, 5):
      for block in getattr(self, f'layer{stage}'):
        x = block(x, train, mask_b)
      stages[f'layer{stage}'] = x
    pooled = jnp.mean(_at_least_f32(x), axis=(1, 2))
    return (pooled, stages) if return_stages else pooled

  def head(self, features_bd: jax.Array) -> jax.Array:
    # The loss is computed from float32 logits whatever the compute dtype.
    return _at_least_f32(self.fc(features_bd))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """What the model computes after `features` (the models' common name; see tl_jax.feature_cache)."""
    del train   # fc has no dropout
    return self.head(features_bd)

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    # bn_train: the models' common call (VGG's `train` also drives dropout); a ResNet's train is its BN's.
    return self.head(self.features(x_bhwc, train if bn_train is None else bn_train, mask_b))


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = True,
                 winograd: Optional[bool] = None) -> ResNet:
  """ResNet for `arch` (one of ARCHS) with a `num_classes`-way `fc`, computing in `dtype` (None: float32).

  `fast_backward` (default True) computes conv gradients on XLA:CPU through exact rewrites that
  its kernels run faster (`tl_jax.models.fast_conv`; other backends keep XLA's own): same
  parameters and values, gradients equal in float64 (1e-12) and up to float32 rounding.
  False: XLA's own gradients everywhere.
  (The max-pool gradient always goes through `layers.max_pool`, torch's own, without index arrays.)
  `winograd` (None: True) runs the 3x3 stride-1 convolutions, forward and gradients, as Winograd
  F(2x2)/F(4x4) on CPU for the shapes and ops where `benchmarks/bench_winograd.py` measured it faster
  (`tl_jax.models.winograd.policy`); float32 values differ from the direct conv by rounding only.
  """
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(ARCHS)}')
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  return ResNet(arch=arch, num_classes=num_classes, dtype=dtype,
                fast_backward=True if fast_backward is None else fast_backward,
                winograd=True if winograd is None else winograd)


def stage_of(module_name: str) -> Optional[str]:
  """conv1/bn1 -> 'stem', layer3_1 -> 'layer3', fc -> 'head'; None for another family's name."""
  if module_name in ('conv1', 'bn1'):
    return 'stem'
  if module_name == 'fc':
    return HEAD
  if module_name.startswith('layer') and module_name[5:6].isdigit():
    return module_name.split('_')[0]
  return None


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's `arch`, in its state dict's order, with its place in Flax."""
  spec = ARCHS[arch]
  convs_per_block = 2 if spec.block == 'basic' else 3
  table = conv_entries('conv1', ('conv1',)) + bn_entries('bn1', ('bn1',))
  for stage, num_blocks in enumerate(spec.stage_sizes, start=1):
    for index in range(num_blocks):
      t, f = f'layer{stage}.{index}', f'layer{stage}_{index}'
      for c in range(1, convs_per_block + 1):
        table += conv_entries(f'{t}.conv{c}', (f, f'conv{c}')) + bn_entries(f'{t}.bn{c}', (f, f'bn{c}'))
      if index == 0 and (stage > 1 or spec.block == 'bottleneck'):
        table += conv_entries(f'{t}.downsample.0', (f, 'downsample_conv'))
        table += bn_entries(f'{t}.downsample.1', (f, 'downsample_bn'))
  if include_head:
    table += linear_entries('fc', 'fc')
  return table


FAMILY = Family(
    name='resnet',
    archs={'resnet18': 'resnet18-f37072fd.pth', 'resnet34': 'resnet34-b627a593.pth',
           'resnet50': 'resnet50-0676ba61.pth', 'resnet101': 'resnet101-63fe2227.pth',
           'resnet152': 'resnet152-394f9c45.pth', 'resnext50_32x4d': 'resnext50_32x4d-7cdf4587.pth',
           'resnext101_32x8d': 'resnext101_32x8d-8ba56ff5.pth',
           'resnext101_64x4d': 'resnext101_64x4d-173b62eb.pth',
           'wide_resnet50_2': 'wide_resnet50_2-95faca4d.pth', 'wide_resnet101_2': 'wide_resnet101_2-32ee1156.pth'},
    create=create_model,
    stages=STAGES,
    head='fc', head_torch='fc', head_stages=(HEAD,),
    stage_of=stage_of,
    num_features=lambda arch: ARCHS[arch].num_features,
    features_have_batch_norm=lambda arch: True,
    name_table=torch_name_table,
)
