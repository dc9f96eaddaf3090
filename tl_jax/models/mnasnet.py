"""torchvision MNASNet (B1: mnasnet0_5, 0_75, 1_0, 1_3) in Flax, NHWC.

torch's `layers` is one flat Sequential: the stem's convs and BatchNorms are top-level modules of
their own (`layers_0`, `layers_1`, ... with '.' -> '_'), `layers_8` .. `layers_13` are stacks of
inverted residuals whose blocks are `block_0`, `block_1`, ... (torch's `layers.8.0`, `layers.8.1`)
with their convs and BatchNorms under torch's indices (`layers_3` is `layers.3`). `classifier_1` is
the head. `FAMILY` registers the family (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models import fast_conv
from tl_jax.models.family import (HEAD as HEAD_STAGE, Entry, Family, bn_entries,
                                  check_create_args, conv_entries, linear_entries)
from tl_jax.models.layers import BatchNorm
from tl_jax.models.resnet import torch_linear_init

# torchvision takes TensorFlow's 0.9997 decay as torch momentum 1 - 0.9997 (eps stays torch's 1e-5).
BN_MOMENTUM = 1 - 0.9997
DROPOUT = 0.2
NUM_FEATURES = 1280
HEAD = 'classifier_1'

# torchvision's init: convs kaiming_normal_(fan_out, relu); the only Linear is the head.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

ARCHS: dict[str, float] = {'mnasnet0_5': 0.5, 'mnasnet0_75': 0.75, 'mnasnet1_0': 1.0, 'mnasnet1_3': 1.3}


@dataclasses.dataclass(frozen=True)
class Stack:
  """One `_stack` of inverted residuals: torch's layers.8 .. layers.13."""
  kernel: int
  stride: int
  expansion: int
  repeats: int


# (kernel, stride, expansion, repeats), from depths[1..6] to depths[2..7].
STACKS = (Stack(3, 2, 3, 3), Stack(5, 2, 3, 3), Stack(5, 2, 6, 3), Stack(3, 1, 6, 2), Stack(5, 2, 6, 4),
          Stack(3, 1, 6, 1))
FIRST_STACK = 8                                      # torch's index of the first stack in `layers`
LAST_CONV, LAST_BN = FIRST_STACK + len(STACKS), FIRST_STACK + len(STACKS) + 1
# Indices of `layers` that hold parameters (the rest are ReLUs), input to output.
LAYERS = (0, 1, 3, 4, 6, 7) + tuple(range(FIRST_STACK, LAST_BN + 1))
STAGES = tuple(f'layers.{i}' for i in LAYERS)
# Inside each inverted residual: conv, BN, ReLU, depthwise conv, BN, ReLU, conv, BN.
_BLOCK_CONVS, _BLOCK_BNS = (0, 3, 6), (1, 4, 7)


def round_to_multiple_of(value: float, divisor: int, round_up_bias: float = 0.9) -> int:
  """torchvision's _round_to_multiple_of: to a multiple of `divisor`, rounding up unless within 10 %."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded if rounded >= round_up_bias * value else rounded + divisor


def depths(arch: str) -> list[int]:
  """torchvision's _get_depths: the widths of the stem and of each stack's output."""
  return [round_to_multiple_of(depth * ARCHS[arch], 8) for depth in (32, 16, 24, 40, 80, 96, 192, 320)]


def _conv(features: int, kernel: int, stride: int = 1, groups: int = 1, dtype: Any = None,
          name: Optional[str] = None) -> nn.Conv:
  # torch pads kernel // 2 on every side; 'SAME' would pad stride-2 convs of even inputs asymmetrically.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 feature_group_count=groups,
                 # XLA:CPU-friendly (depthwise: shifted taps; plain: fast_conv.conv2d)
                 conv_general_dilated=fast_conv.conv_general_dilated, use_bias=False, kernel_init=_conv_init,
                 dtype=dtype, name=name)


def _bn(name: Optional[str] = None) -> BatchNorm:
  return BatchNorm(momentum=BN_MOMENTUM, epsilon=1e-5, name=name)


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class InvertedResidual(nn.Module):
  """1x1 expand, depthwise kxk, 1x1 project, BN after each, ReLU after the first two; residual
  when the shape is kept."""
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  expansion: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    mid = self.in_channels * self.expansion
    h = nn.relu(_bn('layers_1')(_conv(mid, 1, dtype=self.dtype, name='layers_0')(x), train, mask_b))
    h = _conv(mid, self.kernel, self.stride, groups=mid, dtype=self.dtype, name='layers_3')(h)
    h = nn.relu(_bn('layers_4')(h, train, mask_b))
    h = _bn('layers_7')(_conv(self.out_channels, 1, dtype=self.dtype, name='layers_6')(h), train, mask_b)
    return h + x if self.in_channels == self.out_channels and self.stride == 1 else h


class InvertedResidualStack(nn.Module):
  """torchvision's _stack: the first block changes width (and stride), the rest keep it."""
  in_channels: int
  out_channels: int
  spec: Stack
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    spec = self.spec
    for index in range(spec.repeats):
      x = InvertedResidual(self.in_channels if index == 0 else self.out_channels, self.out_channels, spec.kernel,
                           spec.stride if index == 0 else 1, spec.expansion, dtype=self.dtype,
                           name=f'block_{index}')(x, train, mask_b)
    return x


class MNASNet(nn.Module):
  """torchvision MNASNet: `features` is `layers` + the spatial mean (B, 1280).

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `classifier_1`.
    dtype: compute dtype of convs and the Linear (None: that of inputs and params); params,
      BatchNorm statistics and logits stay float32.
    dropout_rate: torch's classifier Dropout(p), active only with `train=True` ('dropout' rng).
  """
  arch: str = 'mnasnet1_0'
  num_classes: int = 1000
  dtype: Any = None
  dropout_rate: float = DROPOUT

  def setup(self):
    d = depths(self.arch)
    self.layers_0 = _conv(d[0], 3, 2, dtype=self.dtype)
    self.layers_1 = _bn()
    self.layers_3 = _conv(d[0], 3, 1, groups=d[0], dtype=self.dtype)
    self.layers_4 = _bn()
    self.layers_6 = _conv(d[1], 1, dtype=self.dtype)
    self.layers_7 = _bn()
    self.stacks = [InvertedResidualStack(d[i + 1], d[i + 2], spec, dtype=self.dtype, name=f'layers_{FIRST_STACK + i}')
                   for i, spec in enumerate(STACKS)]
    self.last_conv = _conv(NUM_FEATURES, 1, dtype=self.dtype, name=f'layers_{LAST_CONV}')
    self.last_bn = _bn(name=f'layers_{LAST_BN}')
    self.dropout = nn.Dropout(self.dropout_rate)
    # Drawn as a fresh nn.Linear(1280, K), the layer the material puts in place of classifier[1].
    self.classifier_1 = nn.Dense(self.num_classes, kernel_init=torch_linear_init(NUM_FEATURES),
                                 bias_init=torch_linear_init(NUM_FEATURES), dtype=self.dtype)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> (B, 1280), torch's x.mean([2, 3])."""
    x = nn.relu(self.layers_1(self.layers_0(x_bhwc), train, mask_b))
    x = nn.relu(self.layers_4(self.layers_3(x), train, mask_b))
    x = self.layers_7(self.layers_6(x), train, mask_b)
    for stack in self.stacks:
      x = stack(x, train, mask_b)
    x = nn.relu(self.last_bn(self.last_conv(x), train, mask_b))
    return jnp.mean(_at_least_f32(x), axis=(1, 2))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's classifier: Dropout, Linear (float32 logits)."""
    return _at_least_f32(self.classifier_1(self.dropout(features_bd, deterministic=not train)))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits. `train` turns on dropout and (unless `bn_train` says otherwise) train-mode BatchNorm."""
    bn_train = train if bn_train is None else bn_train
    return self.from_features(self.features(x_bhwc, bn_train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> MNASNet:
  """MNASNet `arch` (one of ARCHS) with a `num_classes`-way `classifier_1`, computing in `dtype` (None: float32)."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return MNASNet(arch=arch, num_classes=num_classes, dtype=dtype)


def stage_of(module_name: str) -> Optional[str]:
  """layers_8 -> 'layers.8', classifier_1 -> 'head'; None for another family's name."""
  if module_name == HEAD:
    return HEAD_STAGE
  prefix, _, index = module_name.partition('_')
  if prefix == 'layers' and index.isdigit() and str(int(index)) == index and int(index) in LAYERS:
    return f'layers.{index}'
  return None


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's MNASNet `arch`, in its state dict's order, with its place in Flax."""
  assert arch in ARCHS, arch
  table = []
  for i in (0, 3, 6):
    table += conv_entries(f'layers.{i}', (f'layers_{i}',)) + bn_entries(f'layers.{i + 1}', (f'layers_{i + 1}',))
  for s, spec in enumerate(STACKS):
    for b in range(spec.repeats):
      t, f = f'layers.{FIRST_STACK + s}.{b}.layers', (f'layers_{FIRST_STACK + s}', f'block_{b}')
      for c, n in zip(_BLOCK_CONVS, _BLOCK_BNS):
        table += conv_entries(f'{t}.{c}', f + (f'layers_{c}',)) + bn_entries(f'{t}.{n}', f + (f'layers_{n}',))
  table += conv_entries(f'layers.{LAST_CONV}', (f'layers_{LAST_CONV}',))
  table += bn_entries(f'layers.{LAST_BN}', (f'layers_{LAST_BN}',))
  if include_head:
    table += linear_entries('classifier.1', HEAD)
  return table


FAMILY = Family(
    name='mnasnet',
    archs={'mnasnet0_5': 'mnasnet0.5_top1_67.823-3ffadce67e.pth', 'mnasnet0_75': 'mnasnet0_75-7090bc5f.pth',
           'mnasnet1_0': 'mnasnet1.0_top1_73.512-f206786ef8.pth', 'mnasnet1_3': 'mnasnet1_3-a4c69d6f.pth'},
    create=create_model,
    stages=STAGES,
    head=HEAD, head_torch='classifier.1', head_stages=(HEAD_STAGE,),
    stage_of=stage_of,
    num_features=lambda arch: NUM_FEATURES,
    features_have_batch_norm=lambda arch: True,
    name_table=torch_name_table,
)
