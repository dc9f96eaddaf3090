"""torchvision EfficientNet B0..B7 (MBConv) and V2 S/M/L (FusedMBConv, then MBConv) in Flax, NHWC.

torchvision's `features` is one Sequential: the stem conv (`features.0`), one Sequential of blocks
per stage (`features.1` .. `features.N`) and a last 1x1 conv (`features.N+1`); `classifier` is
Dropout then the Linear head (`classifier.1`). Top-level Flax modules are those names with '.' ->
'_', a stage's blocks one module each (`features_3_0` is `features.3.0`), so every block maps to
its stage (`stage_of`). Inside a block, `block_i` is torch's `block.i`. `FAMILY` registers the
family (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models import fast_conv
from tl_jax.models.family import HEAD, Entry, Family, bn_entries, check_create_args, conv_entries, linear_entries
from tl_jax.models.layers import BatchNorm
from tl_jax.models.resnet import torch_linear_init

STOCHASTIC_DEPTH = 0.2   # torchvision's stochastic_depth_prob for every arch, reached by the last block

# torchvision's EfficientNet init: convs kaiming_normal_(fan_out) (gain sqrt(2)), conv biases zero.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's _make_divisible: the nearest multiple of `divisor`, never more than 10 % below `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv / FusedMBConv block as torchvision builds it from its stage's config."""
  fused: bool
  expand_ratio: int
  kernel: int
  stride: int
  in_channels: int
  out_channels: int

  @property
  def expanded_channels(self) -> int:
    return make_divisible(self.in_channels * self.expand_ratio)

  @property
  def squeeze_channels(self) -> int:
    return max(1, self.in_channels // 4)

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels

  @property
  def layers(self) -> tuple[str, ...]:
    """The kinds of torch's `block.0`, `block.1`, ... in order (the module and the name table read them)."""
    expands = self.expanded_channels != self.in_channels
    if self.fused:
      return ('fused_expand', 'project') if expands else ('fused',)
    return (('expand',) if expands else ()) + ('depthwise', 'se', 'project')


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """A row of torchvision's inverted_residual_setting, widths and depth already scaled."""
  fused: bool
  expand_ratio: int
  kernel: int
  stride: int
  in_channels: int
  out_channels: int
  num_layers: int

  @property
  def blocks(self) -> tuple[BlockSpec, ...]:
    """Only the first block strides and changes the width."""
    return tuple(BlockSpec(self.fused, self.expand_ratio, self.kernel, self.stride if i == 0 else 1,
                           self.in_channels if i == 0 else self.out_channels, self.out_channels)
                 for i in range(self.num_layers))


@dataclasses.dataclass(frozen=True)
class EfficientNetSpec:
  stages: tuple[StageSpec, ...]
  last_channels: int
  dropout: float           # classifier's Dropout(p)
  bn_epsilon: float
  bn_momentum: float       # torch's convention

  @property
  def blocks(self) -> tuple[tuple[BlockSpec, ...], ...]:
    return tuple(stage.blocks for stage in self.stages)


# (expand_ratio, kernel, stride, in, out, layers) of EfficientNet's Table 1, before width/depth scaling.
_V1_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
              (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def _v1(width: float, depth: float, dropout: float, bn_epsilon: float = 1e-5, bn_momentum: float = 0.1):
  stages = tuple(StageSpec(False, e, k, s, make_divisible(i * width), make_divisible(o * width),
                           int(math.ceil(n * depth))) for e, k, s, i, o, n in _V1_STAGES)
  return EfficientNetSpec(stages, 4 * stages[-1].out_channels, dropout, bn_epsilon, bn_momentum)


def _v2(rows, dropout: float):
  """rows: (fused, expand_ratio, kernel, stride, in, out, layers) of EfficientNetV2's Table 4, unscaled."""
  return EfficientNetSpec(tuple(StageSpec(*row) for row in rows), 1280, dropout, 1e-3, 0.1)


F, M = True, False   # a stage of FusedMBConv / of MBConv blocks
ARCHS: dict[str, EfficientNetSpec] = {
    # B0..B4 use BatchNorm2d's defaults; B5..B7 (ported from lukemelas) eps 1e-3, momentum 0.01.
    'efficientnet_b0': _v1(1.0, 1.0, 0.2),
    'efficientnet_b1': _v1(1.0, 1.1, 0.2),
    'efficientnet_b2': _v1(1.1, 1.2, 0.3),
    'efficientnet_b3': _v1(1.2, 1.4, 0.3),
    'efficientnet_b4': _v1(1.4, 1.8, 0.4),
    'efficientnet_b5': _v1(1.6, 2.2, 0.4, 1e-3, 0.01),
    'efficientnet_b6': _v1(1.8, 2.6, 0.5, 1e-3, 0.01),
    'efficientnet_b7': _v1(2.0, 3.1, 0.5, 1e-3, 0.01),
    # V2: BatchNorm2d(eps=1e-3), torch's default momentum.
    'efficientnet_v2_s': _v2(((F, 1, 3, 1, 24, 24, 2), (F, 4, 3, 2, 24, 48, 4), (F, 4, 3, 2, 48, 64, 4),
                              (M, 4, 3, 2, 64, 128, 6), (M, 6, 3, 1, 128, 160, 9), (M, 6, 3, 2, 160, 256, 15)),
                             0.2),
    'efficientnet_v2_m': _v2(((F, 1, 3, 1, 24, 24, 3), (F, 4, 3, 2, 24, 48, 5), (F, 4, 3, 2, 48, 80, 5),
                              (M, 4, 3, 2, 80, 160, 7), (M, 6, 3, 1, 160, 176, 14), (M, 6, 3, 2, 176, 304, 18),
                              (M, 6, 3, 1, 304, 512, 5)), 0.3),
    'efficientnet_v2_l': _v2(((F, 1, 3, 1, 32, 32, 4), (F, 4, 3, 2, 32, 64, 7), (F, 4, 3, 2, 64, 96, 7),
                              (M, 4, 3, 2, 96, 192, 10), (M, 6, 3, 1, 192, 224, 19), (M, 6, 3, 2, 224, 384, 25),
                              (M, 6, 3, 1, 384, 640, 7)), 0.4),
}
del F, M


def arch_stages(arch: str) -> tuple[str, ...]:
  """Stem, the block stages, last conv: features.0 .. features.8 (V2-S has six block stages: .. features.7)."""
  return tuple(f'features.{i}' for i in range(len(ARCHS[arch].stages) + 2))


HEAD_NAME = 'classifier_1'


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class ConvNormAct(nn.Module):
  """torchvision's Conv2dNormActivation: conv without bias, BatchNorm, SiLU unless `activation` is False."""
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  activation: bool = True
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.1
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    pad = (self.kernel - 1) // 2   # torch's padding, on both sides ('SAME' would pad stride 2 asymmetrically)
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
                # XLA:CPU-friendly (depthwise: shifted taps; plain: fast_conv.conv2d)
                conv_general_dilated=fast_conv.conv_general_dilated, use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype, name='conv')(x_bhwc)
    x = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, name='bn')(x, train, mask_b)
    return nn.silu(x) if self.activation else x


class SqueezeExcitation(nn.Module):
  """torchvision's SqueezeExcitation with SiLU: channels scaled by sigmoid(fc2(silu(fc1(mean over pixels))))."""
  squeeze_channels: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    # fc1/fc2 are torch 1x1 convs with bias; kept as convs so their weights convert like every other conv.
    conv = lambda width, name: nn.Conv(width, (1, 1), kernel_init=_conv_init, bias_init=nn.initializers.zeros,
                                       dtype=self.dtype, name=name)
    scale = jnp.mean(_at_least_f32(x_bhwc), axis=(1, 2), keepdims=True).astype(x_bhwc.dtype)
    scale = nn.sigmoid(conv(x_bhwc.shape[-1], 'fc2')(nn.silu(conv(self.squeeze_channels, 'fc1')(scale))))
    return scale * x_bhwc


class StochasticDepth(nn.Module):
  """torchvision.ops.stochastic_depth in 'row' mode: each sample's branch kept with probability 1 - rate and
  scaled by 1 / (1 - rate); the identity when `deterministic`. Draws from the 'dropout' rng."""
  rate: float

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x_bhwc
    survival = 1.0 - self.rate
    keep_b = jax.random.bernoulli(self.make_rng('dropout'), survival, (x_bhwc.shape[0],) + (1,) * (x_bhwc.ndim - 1))
    noise_b = keep_b.astype(x_bhwc.dtype)
    if survival > 0.0:   # torch leaves the all-zero noise of rate 1 undivided
      noise_b = noise_b / survival
    return x_bhwc * noise_b


class MBConv(nn.Module):
  """torchvision's MBConv (1x1 expand, depthwise, squeeze-excitation, 1x1 project) or FusedMBConv (one full
  conv in place of expand + depthwise, no squeeze-excitation), by `spec.fused`; the residual, through
  stochastic depth, where the block keeps stride 1 and width."""
  spec: BlockSpec
  stochastic_depth_rate: float = 0.0
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.1
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, train: bool, mask_b: Optional[jax.Array],
               stochastic_depth: bool) -> jax.Array:
    spec = self.spec
    conv_norm = lambda width, kernel, i, **kw: ConvNormAct(width, kernel, bn_epsilon=self.bn_epsilon,
                                                           bn_momentum=self.bn_momentum, dtype=self.dtype,
                                                           name=f'block_{i}', **kw)
    x = x_bhwc
    for i, kind in enumerate(spec.layers):
      if kind == 'expand':
        x = conv_norm(spec.expanded_channels, 1, i)(x, train, mask_b)
      elif kind == 'depthwise':
        x = conv_norm(spec.expanded_channels, spec.kernel, i, stride=spec.stride,
                      groups=spec.expanded_channels)(x, train, mask_b)
      elif kind == 'se':
        x = SqueezeExcitation(spec.squeeze_channels, dtype=self.dtype, name=f'block_{i}')(x)
      elif kind == 'project':
        x = conv_norm(spec.out_channels, 1, i, activation=False)(x, train, mask_b)
      elif kind == 'fused_expand':
        x = conv_norm(spec.expanded_channels, spec.kernel, i, stride=spec.stride)(x, train, mask_b)
      else:   # 'fused': one conv straight to the output width
        x = conv_norm(spec.out_channels, spec.kernel, i, stride=spec.stride)(x, train, mask_b)
    if not spec.residual:
      return x
    return StochasticDepth(self.stochastic_depth_rate, name='stochastic_depth')(x, not stochastic_depth) + x_bhwc


class EfficientNet(nn.Module):
  """torchvision EfficientNet (V1 or V2): `features` is everything up to the pooled vector, `from_features`
  the classifier (Dropout, then `classifier_1`).

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `classifier_1`.
    dtype: compute dtype of convs and the head (e.g. jnp.bfloat16); params, BatchNorm statistics and
      logits stay float32. None: that of the inputs and params.
    dropout_rate: the classifier's Dropout(p); None: torchvision's for the arch (0.2 .. 0.5).
    stochastic_depth_rate: torchvision's stochastic_depth_prob; block i of n drops its branch with
      probability rate * i / n.
  """
  arch: str = 'efficientnet_b0'
  num_classes: int = 1000
  dtype: Any = None
  dropout_rate: Optional[float] = None
  stochastic_depth_rate: float = STOCHASTIC_DEPTH

  def setup(self):
    spec = ARCHS[self.arch]
    norm = dict(bn_epsilon=spec.bn_epsilon, bn_momentum=spec.bn_momentum, dtype=self.dtype)
    self.features_0 = ConvNormAct(spec.stages[0].in_channels, 3, 2, **norm)
    total = sum(len(blocks) for blocks in spec.blocks)
    stages, index = [], 0
    for s, blocks in enumerate(spec.blocks, start=1):
      stage = []
      for j, block in enumerate(blocks):
        # torch's arithmetic, in its order: prob * float(block index) / total blocks.
        rate = self.stochastic_depth_rate * float(index) / total
        stage.append(MBConv(block, rate, name=f'features_{s}_{j}', **norm))
        index += 1
      stages.append(stage)
    self.stages = stages
    self.last_conv = ConvNormAct(spec.last_channels, 1, name=f'features_{len(spec.stages) + 1}', **norm)
    # Drawn as a fresh nn.Linear(num_features, K), the layer the material puts in place of classifier[1].
    self.classifier_1 = nn.Dense(self.num_classes, kernel_init=torch_linear_init(spec.last_channels),
                                 bias_init=torch_linear_init(spec.last_channels), dtype=self.dtype)
    self.dropout = nn.Dropout(spec.dropout if self.dropout_rate is None else self.dropout_rate)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Images (NHWC, normalised) -> (B, num_features) pooled features.

    `train` turns on the blocks' stochastic depth (the 'dropout' rng) and, unless `bn_train` says
    otherwise, train-mode BatchNorm (torch's model.train() with only the BN modules in eval())."""
    bn_train = train if bn_train is None else bn_train
    x = self.features_0(x_bhwc, bn_train, mask_b)
    for stage in self.stages:
      for block in stage:
        x = block(x, bn_train, mask_b, train)
    x = self.last_conv(x, bn_train, mask_b)
    return jnp.mean(_at_least_f32(x), axis=(1, 2))   # AdaptiveAvgPool2d(1) + flatten

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's classifier: Dropout(p) then Linear; the logits in float32 whatever the compute dtype."""
    return _at_least_f32(self.classifier_1(self.dropout(features_bd, deterministic=not train)))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits. `train` turns on dropout and stochastic depth, and (unless `bn_train` says otherwise)
    train-mode BatchNorm."""
    return self.from_features(self.features(x_bhwc, train, mask_b, bn_train), train)


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> EfficientNet:
  """EfficientNet for `arch` (one of ARCHS) with a `num_classes`-way `classifier_1`, computing in `dtype`."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return EfficientNet(arch=arch, num_classes=num_classes, dtype=dtype, dropout_rate=ARCHS[arch].dropout)


def stage_of(module_name: str) -> Optional[str]:
  """features_0 / features_7 / features_8 -> that stage, features_3_1 -> 'features.3', classifier_1 -> 'head';
  None for another family's name."""
  if module_name == HEAD_NAME:
    return HEAD
  parts = module_name.split('_')
  if parts[0] != 'features' or not all(p.isdigit() for p in parts[1:]):
    return None
  if len(parts) == 2 and int(parts[1]) in (0, 7, 8):      # stem, or the last conv (after 6 or 7 stages)
    return f'features.{parts[1]}'
  if len(parts) == 3 and 1 <= int(parts[1]) <= 7:         # a block of a stage
    return f'features.{parts[1]}'
  return None


def _conv_norm_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  return conv_entries(f'{torch_prefix}.0', flax_path + ('conv',)) + bn_entries(f'{torch_prefix}.1', flax_path + ('bn',))


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's `arch`, in its state dict's order, with its place in Flax."""
  spec = ARCHS[arch]
  table = _conv_norm_entries('features.0', ('features_0',))
  for s, blocks in enumerate(spec.blocks, start=1):
    for j, block in enumerate(blocks):
      for i, kind in enumerate(block.layers):
        t, f = f'features.{s}.{j}.block.{i}', (f'features_{s}_{j}', f'block_{i}')
        if kind == 'se':
          table += conv_entries(f'{t}.fc1', f + ('fc1',), bias=True) + conv_entries(f'{t}.fc2', f + ('fc2',), bias=True)
        else:
          table += _conv_norm_entries(t, f)
  last = len(spec.stages) + 1
  table += _conv_norm_entries(f'features.{last}', (f'features_{last}',))
  if include_head:
    table += linear_entries('classifier.1', HEAD_NAME)
  return table


FAMILY = Family(
    name='efficientnet',
    archs={'efficientnet_b0': 'efficientnet_b0_rwightman-7f5810bc.pth',
           'efficientnet_b1': 'efficientnet_b1_rwightman-bac287d4.pth',
           'efficientnet_b2': 'efficientnet_b2_rwightman-c35c1473.pth',
           'efficientnet_b3': 'efficientnet_b3_rwightman-b3899882.pth',
           'efficientnet_b4': 'efficientnet_b4_rwightman-23ab8bcd.pth',
           'efficientnet_b5': 'efficientnet_b5_lukemelas-1a07897c.pth',
           'efficientnet_b6': 'efficientnet_b6_lukemelas-24a108a5.pth',
           'efficientnet_b7': 'efficientnet_b7_lukemelas-c5b4e57e.pth',
           'efficientnet_v2_s': 'efficientnet_v2_s-dd5fe13b.pth',
           'efficientnet_v2_m': 'efficientnet_v2_m-dc08266a.pth',
           'efficientnet_v2_l': 'efficientnet_v2_l-59c71312.pth'},
    create=create_model,
    stages=arch_stages,
    head=HEAD_NAME, head_torch='classifier.1', head_stages=(HEAD,),
    stage_of=stage_of,
    num_features=lambda arch: ARCHS[arch].last_channels,
    features_have_batch_norm=lambda arch: True,
    features_are_random=lambda arch: True,   # stochastic depth in train mode
    name_table=torch_name_table,
)
