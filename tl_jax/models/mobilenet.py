"""torchvision MobileNetV2 and MobileNetV3 (small, large) in Flax, NHWC.

Top-level modules are torchvision's `features.N` and `classifier.N` with '.' -> '_'. Inside a block
each child keeps its torch index (`conv_1` is `conv.1`, `block_2` is `block.2`); a
Conv2dNormActivation's conv and BatchNorm (torch's `.0` and `.1`) are `conv` and `bn`
(`v2_name_table` and `v3_name_table` spell out every tensor). `FAMILY_V2` and `FAMILY_V3` register the two
families (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.models import fast_conv
from tl_jax.models.family import HEAD as HEAD_STAGE, Entry, Family, bn_entries, conv_entries, linear_entries
from tl_jax.models.layers import BatchNorm
from tl_jax.models.resnet import torch_linear_init

# torchvision's init: convs kaiming_normal_(fan_out), Linear N(0, 0.01) with zero bias.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_linear_init = nn.initializers.normal(0.01)

DROPOUT = 0.2
# torch's BatchNorm2d defaults (MobileNetV2) and the norm_layer MobileNetV3 passes.
V2_BN = (0.1, 1e-5)
V3_BN = (0.01, 1e-3)


def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's _make_divisible: the nearest multiple of `divisor`, never 10 % below `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def relu6(x: jax.Array) -> jax.Array:
  """torch's ReLU6; its gradient is 0 at 0 and 6, as torch's hardtanh_backward."""
  return jax.nn.relu6(x)


@jax.custom_jvp
def hardswish(x: jax.Array) -> jax.Array:
  """torch's Hardswish, x * relu6(x + 3) / 6 in torch's order, with torch's gradient (`_hardswish_jvp`)."""
  return x * relu6(x + 3) / 6


@hardswish.defjvp
def _hardswish_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  # torch's hardswish_backward, also at the kinks: 0 up to -3, x / 3 + 1/2 between, 1 from 3 on.
  slope_dx = jnp.where(x < 3, dx * (x / 3 + 0.5), dx)
  return hardswish(x), jnp.where(x <= -3, jnp.zeros_like(dx), slope_dx)


@jax.custom_jvp
def hardsigmoid(x: jax.Array) -> jax.Array:
  """torch's Hardsigmoid, relu6(x + 3) / 6, with torch's gradient (`_hardsigmoid_jvp`)."""
  return relu6(x + 3) / 6


@hardsigmoid.defjvp
def _hardsigmoid_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  # torch's backward kernel multiplies by the float constant 1.0f / 6.0f in every dtype, so its
  # float64 gradient is 3e-8 off the exact 1/6; the same constant keeps float64 gradients equal.
  one_sixth = jnp.asarray(np.float32(1 / 6), x.dtype)
  return hardsigmoid(x), jnp.where((x > -3) & (x < 3), dx * one_sixth, jnp.zeros_like(dx))


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _conv(features: int, kernel: int, stride: int = 1, groups: int = 1, use_bias: bool = False,
          dtype: Any = None, name: Optional[str] = None) -> nn.Conv:
  # torch pads (k - 1) // 2 on every side; 'SAME' would pad stride-2 convs of even inputs asymmetrically.
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 feature_group_count=groups,
                 # XLA:CPU-friendly (depthwise: shifted taps; plain: fast_conv.conv2d)
                 conv_general_dilated=fast_conv.conv_general_dilated, use_bias=use_bias, kernel_init=_conv_init,
                 bias_init=nn.initializers.zeros, dtype=dtype, name=name)


class ConvBNAct(nn.Module):
  """torchvision's Conv2dNormActivation: bias-free conv, BatchNorm, optional activation.

  Attributes:
    depthwise: one group per input channel (the block's 3x3/5x5 conv).
    bn: (torch momentum, eps) of the BatchNorm.
  """
  features: int
  kernel: int = 1
  stride: int = 1
  depthwise: bool = False
  activation: Optional[Callable[[jax.Array], jax.Array]] = None
  bn: tuple[float, float] = V2_BN
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    groups = x.shape[-1] if self.depthwise else 1
    x = _conv(self.features, self.kernel, self.stride, groups, dtype=self.dtype, name='conv')(x)
    x = BatchNorm(momentum=self.bn[0], epsilon=self.bn[1], name='bn')(x, train, mask_b)
    return x if self.activation is None else self.activation(x)


# ----------------------------------------------------------------------------------- MobileNetV2

@dataclasses.dataclass(frozen=True)
class V2Block:
  in_channels: int
  out_channels: int
  stride: int
  expand_ratio: int


def _v2_blocks() -> tuple[V2Block, ...]:
  """features.1 .. features.17 from torchvision's (t, c, n, s) table (width_mult 1)."""
  blocks, in_channels = [], 32
  for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1)):
    for i in range(n):
      blocks.append(V2Block(in_channels, c, s if i == 0 else 1, t))
      in_channels = c
  return tuple(blocks)


V2_BLOCKS = _v2_blocks()
V2_STEM, V2_LAST = 32, 1280
V2_ARCHS = ('mobilenet_v2',)
V2_STAGES = tuple(f'features.{i}' for i in range(len(V2_BLOCKS) + 2))
V2_HEAD = 'classifier_1'


class InvertedResidualV2(nn.Module):
  """[1x1 expand,] depthwise 3x3, 1x1 project + BN; ReLU6; residual when the shape is kept."""
  spec: V2Block
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    spec = self.spec
    hidden = int(round(spec.in_channels * spec.expand_ratio))
    h, index = x, 0
    if spec.expand_ratio != 1:
      h = ConvBNAct(hidden, 1, activation=relu6, dtype=self.dtype, name='conv_0')(h, train, mask_b)
      index = 1
    h = ConvBNAct(hidden, 3, spec.stride, depthwise=True, activation=relu6, dtype=self.dtype,
                  name=f'conv_{index}')(h, train, mask_b)
    h = _conv(spec.out_channels, 1, dtype=self.dtype, name=f'conv_{index + 1}')(h)
    h = BatchNorm(name=f'conv_{index + 2}')(h, train, mask_b)
    return x + h if spec.stride == 1 and spec.in_channels == spec.out_channels else h


class MobileNetV2(nn.Module):
  """torchvision MobileNetV2: `features` is the convs + global average pool (B, 1280).

  Attributes:
    arch: 'mobilenet_v2'.
    num_classes: outputs of `classifier_1`.
    dtype: compute dtype of convs and the Linear (None: that of inputs and params); params,
      BatchNorm statistics and logits stay float32.
    dropout_rate: torch's classifier Dropout(p), active only with `train=True` ('dropout' rng).
  """
  arch: str = 'mobilenet_v2'
  num_classes: int = 1000
  dtype: Any = None
  dropout_rate: float = DROPOUT

  def setup(self):
    layers = [ConvBNAct(V2_STEM, 3, 2, activation=relu6, dtype=self.dtype, name='features_0')]
    layers += [InvertedResidualV2(spec, dtype=self.dtype, name=f'features_{i}')
               for i, spec in enumerate(V2_BLOCKS, start=1)]
    layers.append(ConvBNAct(V2_LAST, 1, activation=relu6, dtype=self.dtype, name=f'features_{len(V2_BLOCKS) + 1}'))
    self.layers = layers
    self.dropout = nn.Dropout(self.dropout_rate)
    # Drawn as a fresh nn.Linear(1280, K), the layer the material puts in place of classifier[1].
    self.classifier_1 = nn.Dense(self.num_classes, kernel_init=torch_linear_init(V2_LAST),
                                 bias_init=torch_linear_init(V2_LAST), dtype=self.dtype)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> (B, 1280) globally averaged features."""
    x = x_bhwc
    for layer in self.layers:
      x = layer(x, train, mask_b)
    return jnp.mean(_at_least_f32(x), axis=(1, 2))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's classifier: Dropout, Linear (float32 logits)."""
    return _at_least_f32(self.classifier_1(self.dropout(features_bd, deterministic=not train)))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits. `train` turns on dropout and (unless `bn_train` says otherwise) train-mode BatchNorm."""
    bn_train = train if bn_train is None else bn_train
    return self.from_features(self.features(x_bhwc, bn_train, mask_b), train)


# ----------------------------------------------------------------------------------- MobileNetV3

@dataclasses.dataclass(frozen=True)
class V3Block:
  """One row of torchvision's InvertedResidualConfig table (width_mult 1, no dilation)."""
  in_channels: int
  kernel: int
  expanded: int
  out_channels: int
  use_se: bool
  use_hs: bool   # Hardswish, else ReLU
  stride: int


@dataclasses.dataclass(frozen=True)
class V3Spec:
  blocks: tuple[V3Block, ...]
  last_channel: int   # classifier.0's width

  @property
  def num_features(self) -> int:
    return 6 * self.blocks[-1].out_channels


def _v3(rows, last_channel) -> V3Spec:
  return V3Spec(tuple(V3Block(i, k, e, o, se, act == 'HS', s) for i, k, e, o, se, act, s in rows), last_channel)


V3_ARCHS: dict[str, V3Spec] = {
    'mobilenet_v3_large': _v3((
        (16, 3, 16, 16, False, 'RE', 1), (16, 3, 64, 24, False, 'RE', 2), (24, 3, 72, 24, False, 'RE', 1),
        (24, 5, 72, 40, True, 'RE', 2), (40, 5, 120, 40, True, 'RE', 1), (40, 5, 120, 40, True, 'RE', 1),
        (40, 3, 240, 80, False, 'HS', 2), (80, 3, 200, 80, False, 'HS', 1), (80, 3, 184, 80, False, 'HS', 1),
        (80, 3, 184, 80, False, 'HS', 1), (80, 3, 480, 112, True, 'HS', 1), (112, 3, 672, 112, True, 'HS', 1),
        (112, 5, 672, 160, True, 'HS', 2), (160, 5, 960, 160, True, 'HS', 1), (160, 5, 960, 160, True, 'HS', 1),
    ), 1280),
    'mobilenet_v3_small': _v3((
        (16, 3, 16, 16, True, 'RE', 2), (16, 3, 72, 24, False, 'RE', 2), (24, 3, 88, 24, False, 'RE', 1),
        (24, 5, 96, 40, True, 'HS', 2), (40, 5, 240, 40, True, 'HS', 1), (40, 5, 240, 40, True, 'HS', 1),
        (40, 5, 120, 48, True, 'HS', 1), (48, 5, 144, 48, True, 'HS', 1), (48, 5, 288, 96, True, 'HS', 2),
        (96, 5, 576, 96, True, 'HS', 1), (96, 5, 576, 96, True, 'HS', 1),
    ), 1024),
}
V3_STEM = 16
V3_MAX_FEATURES = max(len(spec.blocks) + 2 for spec in V3_ARCHS.values())
V3_STAGES = tuple(f'features.{i}' for i in range(V3_MAX_FEATURES)) + ('classifier',)
V3_HEAD = 'classifier_3'


class SqueezeExcitation(nn.Module):
  """torchvision's SqueezeExcitation with MobileNetV3's Hardsigmoid: x * hsig(fc2(relu(fc1(avg(x)))))."""
  squeeze_channels: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = jnp.mean(_at_least_f32(x), axis=(1, 2), keepdims=True).astype(x.dtype)
    scale = nn.relu(_conv(self.squeeze_channels, 1, use_bias=True, dtype=self.dtype, name='fc1')(scale))
    scale = hardsigmoid(_conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name='fc2')(scale))
    return scale * x


def _v3_layer_kinds(spec: V3Block) -> list[str]:
  """The children of the block's `block` Sequential in torch's order: 'expand', 'depthwise', 'se', 'project'."""
  kinds = ['expand'] if spec.expanded != spec.in_channels else []
  return kinds + ['depthwise'] + (['se'] if spec.use_se else []) + ['project']


class InvertedResidualV3(nn.Module):
  """[1x1 expand,] depthwise kxk, [squeeze-excitation,] 1x1 project; residual when the shape is kept."""
  spec: V3Block
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    spec = self.spec
    activation = hardswish if spec.use_hs else nn.relu
    h = x
    for index, kind in enumerate(_v3_layer_kinds(spec)):
      name = f'block_{index}'
      if kind == 'expand':
        h = ConvBNAct(spec.expanded, 1, activation=activation, bn=V3_BN, dtype=self.dtype, name=name)(h, train, mask_b)
      elif kind == 'depthwise':
        h = ConvBNAct(spec.expanded, spec.kernel, spec.stride, depthwise=True, activation=activation, bn=V3_BN,
                      dtype=self.dtype, name=name)(h, train, mask_b)
      elif kind == 'se':
        h = SqueezeExcitation(make_divisible(spec.expanded // 4, 8), dtype=self.dtype, name=name)(h)
      else:
        h = ConvBNAct(spec.out_channels, 1, bn=V3_BN, dtype=self.dtype, name=name)(h, train, mask_b)
    return x + h if spec.stride == 1 and spec.in_channels == spec.out_channels else h


class MobileNetV3(nn.Module):
  """torchvision MobileNetV3: `features` is the convs + global average pool (B, 576 / 960).

  Attributes:
    arch: one of V3_ARCHS.
    num_classes: outputs of `classifier_3`.
    dtype: compute dtype of convs and Linears (None: that of inputs and params); params,
      BatchNorm statistics and logits stay float32.
    dropout_rate: torch's Dropout(p) between the two Linears, active only with `train=True`.
  """
  arch: str = 'mobilenet_v3_large'
  num_classes: int = 1000
  dtype: Any = None
  dropout_rate: float = DROPOUT

  def setup(self):
    spec = V3_ARCHS[self.arch]
    layers = [ConvBNAct(V3_STEM, 3, 2, activation=hardswish, bn=V3_BN, dtype=self.dtype, name='features_0')]
    layers += [InvertedResidualV3(block, dtype=self.dtype, name=f'features_{i}')
               for i, block in enumerate(spec.blocks, start=1)]
    layers.append(ConvBNAct(spec.num_features, 1, activation=hardswish, bn=V3_BN, dtype=self.dtype,
                            name=f'features_{len(spec.blocks) + 1}'))
    self.layers = layers
    self.classifier_0 = nn.Dense(spec.last_channel, kernel_init=_linear_init, bias_init=nn.initializers.zeros,
                                 dtype=self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)
    # Drawn as a fresh nn.Linear(last_channel, K), the layer the material puts in place of classifier[3].
    self.classifier_3 = nn.Dense(self.num_classes, kernel_init=torch_linear_init(spec.last_channel),
                                 bias_init=torch_linear_init(spec.last_channel), dtype=self.dtype)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> (B, num_features) globally averaged features."""
    x = x_bhwc
    for layer in self.layers:
      x = layer(x, train, mask_b)
    return jnp.mean(_at_least_f32(x), axis=(1, 2))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's classifier: Linear, Hardswish, Dropout, Linear (float32 logits)."""
    x = self.dropout(hardswish(self.classifier_0(features_bd)), deterministic=not train)
    return _at_least_f32(self.classifier_3(x))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits. `train` turns on dropout and (unless `bn_train` says otherwise) train-mode BatchNorm."""
    bn_train = train if bn_train is None else bn_train
    return self.from_features(self.features(x_bhwc, bn_train, mask_b), train)


# ----------------------------------------------------------------------------------- families

def _check_options(arch: str, known, fast_backward: Optional[bool]) -> None:
  if arch not in known:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(known)}')
  if fast_backward:
    raise ValueError(f'fast_backward is built for the ResNets, not {arch}')


def create_v2(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> MobileNetV2:
  """MobileNetV2 with a `num_classes`-way `classifier_1`, computing in `dtype` (None: float32)."""
  _check_options(arch, V2_ARCHS, fast_backward)
  return MobileNetV2(arch=arch, num_classes=num_classes, dtype=dtype)


def create_v3(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> MobileNetV3:
  """MobileNetV3 `arch` (one of V3_ARCHS) with a `num_classes`-way `classifier_3`, computing in `dtype`."""
  _check_options(arch, V3_ARCHS, fast_backward)
  return MobileNetV3(arch=arch, num_classes=num_classes, dtype=dtype)


def _features_index(module_name: str, count: int) -> Optional[int]:
  prefix, _, index = module_name.partition('_')
  if prefix == 'features' and index.isdigit() and str(int(index)) == index and int(index) < count:
    return int(index)
  return None


def v2_stage_of(module_name: str) -> Optional[str]:
  """features_3 -> 'features.3', classifier_1 -> 'head'; None for another family's name."""
  if module_name == V2_HEAD:
    return HEAD_STAGE
  index = _features_index(module_name, len(V2_STAGES))
  return None if index is None else f'features.{index}'


def v3_stage_of(module_name: str) -> Optional[str]:
  """features_3 -> 'features.3', classifier_0 -> 'classifier', classifier_3 -> 'head'; None for another
  family's name."""
  if module_name == V3_HEAD:
    return HEAD_STAGE
  if module_name == 'classifier_0':
    return 'classifier'
  index = _features_index(module_name, V3_MAX_FEATURES)
  return None if index is None else f'features.{index}'


def _conv_bn_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  """A Conv2dNormActivation: its conv is torch's `.0`, its BatchNorm `.1`."""
  return conv_entries(f'{torch_prefix}.0', flax_path + ('conv',)) + bn_entries(f'{torch_prefix}.1', flax_path + ('bn',))


def v2_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's MobileNetV2, in its state dict's order, with its place in Flax."""
  assert arch in V2_ARCHS, arch
  table = _conv_bn_entries('features.0', ('features_0',))
  for i, spec in enumerate(V2_BLOCKS, start=1):
    t, f = f'features.{i}.conv', f'features_{i}'
    index = 0
    if spec.expand_ratio != 1:
      table += _conv_bn_entries(f'{t}.0', (f, 'conv_0'))
      index = 1
    table += _conv_bn_entries(f'{t}.{index}', (f, f'conv_{index}'))
    table += conv_entries(f'{t}.{index + 1}', (f, f'conv_{index + 1}'))
    table += bn_entries(f'{t}.{index + 2}', (f, f'conv_{index + 2}'))
  last = len(V2_BLOCKS) + 1
  table += _conv_bn_entries(f'features.{last}', (f'features_{last}',))
  if include_head:
    table += linear_entries('classifier.1', V2_HEAD)
  return table


def v3_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's MobileNetV3 `arch`, in its state dict's order, with its place in Flax."""
  spec = V3_ARCHS[arch]
  table = _conv_bn_entries('features.0', ('features_0',))
  for i, block in enumerate(spec.blocks, start=1):
    for index, kind in enumerate(_v3_layer_kinds(block)):
      t, f = f'features.{i}.block.{index}', (f'features_{i}', f'block_{index}')
      if kind == 'se':
        table += conv_entries(f'{t}.fc1', f + ('fc1',), bias=True) + conv_entries(f'{t}.fc2', f + ('fc2',), bias=True)
      else:
        table += _conv_bn_entries(t, f)
  last = len(spec.blocks) + 1
  table += _conv_bn_entries(f'features.{last}', (f'features_{last}',))
  table += linear_entries('classifier.0', 'classifier_0')
  if include_head:
    table += linear_entries('classifier.3', V3_HEAD)
  return table


FAMILY_V2 = Family(
    name='mobilenet_v2',
    archs={'mobilenet_v2': 'mobilenet_v2-b0353104.pth'},
    create=create_v2,
    stages=V2_STAGES,
    head=V2_HEAD, head_torch='classifier.1', head_stages=(HEAD_STAGE,),
    stage_of=v2_stage_of,
    num_features=lambda arch: V2_LAST,
    features_have_batch_norm=lambda arch: True,
    name_table=v2_name_table,
)

FAMILY_V3 = Family(
    name='mobilenet_v3',
    archs={'mobilenet_v3_small': 'mobilenet_v3_small-047dcff4.pth',
           'mobilenet_v3_large': 'mobilenet_v3_large-8738ca79.pth'},
    create=create_v3,
    # per arch: mobilenet_v3_small has 13 feature modules, large 17
    stages=lambda arch: tuple(f'features.{i}' for i in range(len(V3_ARCHS[arch].blocks) + 2)) + ('classifier',),
    head=V3_HEAD, head_torch='classifier.3', head_stages=('classifier', HEAD_STAGE),
    stage_of=v3_stage_of,
    num_features=lambda arch: V3_ARCHS[arch].num_features,
    features_have_batch_norm=lambda arch: True,
    name_table=v3_name_table,
)
