"""torchvision ResNets (v1.5: stride on the 3x3 conv) in Flax, NHWC.

Every padding is written out as torch's: Flax's 'SAME' pads asymmetrically for even
inputs with stride 2 and would shift every feature map by a pixel.
Submodule names mirror torchvision's (`layer1_0` is `layer1.0`) so the weight
conversion table in `tl_jax.convert` reads one to one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models import fast_conv
from tl_jax.models.layers import BatchNorm, max_pool

# torch's default init for conv weights (kaiming_normal_, fan_out, relu) as torchvision's ResNet uses.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0, name: Optional[str] = None,
          dtype: Any = None, fast_backward: bool = True) -> nn.Conv:
  # fast_backward: same values, conv gradients XLA:CPU computes faster (see fast_conv).
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 kernel_init=_conv_init, name=name, dtype=dtype,
                 conv_general_dilated=fast_conv.conv_general_dilated if fast_backward else None)


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
  expansion = 1

  def setup(self):
    self.conv1 = _conv(self.planes, 3, self.stride, 1, dtype=self.dtype, fast_backward=self.fast_backward)
    self.bn1 = BatchNorm()
    self.conv2 = _conv(self.planes, 3, 1, 1, dtype=self.dtype, fast_backward=self.fast_backward)
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
  """1x1 -> 3x3 (strided) -> 1x1 convs; torchvision's Bottleneck (expansion 4)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = None
  fast_backward: bool = True
  expansion = 4

  def setup(self):
    self.conv1 = _conv(self.planes, 1, dtype=self.dtype, fast_backward=self.fast_backward)
    self.bn1 = BatchNorm()
    self.conv2 = _conv(self.planes, 3, self.stride, 1, dtype=self.dtype, fast_backward=self.fast_backward)
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
        blocks.append(spec.block_cls(planes, stride, needs_downsample, self.dtype, self.fast_backward,
                                     name=f'layer{stage}_{index}'))
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


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: bool = True) -> ResNet:
  """ResNet for `arch` (one of ARCHS) with a `num_classes`-way `fc`, computing in `dtype` (None: float32).

  `fast_backward` (default True) computes conv gradients on XLA:CPU through exact rewrites that
  its kernels run faster (`tl_jax.models.fast_conv`; other backends keep XLA's own): same
  parameters and values, gradients equal in float64 (1e-12) and up to float32 rounding.
  False: XLA's own gradients everywhere.
  (The max-pool gradient always goes through `layers.max_pool`, torch's own, without index arrays.)
  """
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(ARCHS)}')
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  return ResNet(arch=arch, num_classes=num_classes, dtype=dtype, fast_backward=fast_backward)


def num_features(arch: str) -> int:
  return ARCHS[arch].num_features
