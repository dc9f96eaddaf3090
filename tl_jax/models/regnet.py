"""torchvision RegNetX / RegNetY (400MF .. 128GF) in Flax, NHWC.

Top-level modules are torchvision's with '.' -> '_': `stem` (3x3 stride-2 conv, BN, ReLU),
`trunk_output_block1` .. `trunk_output_block4` (the stages; torch's block `block1-0` is
`block1_0` inside) and `fc` (the head). Every block is torchvision's ResBottleneckBlock: 1x1,
grouped 3x3 (strided in a stage's first block), squeeze-excitation in the Y models, 1x1, with a
projection shortcut where the shape changes. `FAMILY` registers the family
(tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.family import HEAD, Entry, Family, bn_entries, check_create_args, conv_entries, linear_entries
from tl_jax.models.layers import BatchNorm
from tl_jax.models.resnet import torch_linear_init


@dataclasses.dataclass(frozen=True)
class RegNetSpec:
  """Per-stage settings, as torchvision's BlockParams.from_init_params computes them for each arch
  (its quantised widths written out: the formula runs in torch's float32 and is not re-derived
  here). The bottleneck multiplier is 1 in every torchvision RegNet: a block's inner width is its
  output width."""
  depths: tuple[int, ...]
  widths: tuple[int, ...]
  group_widths: tuple[int, ...]
  se: bool                          # the Y models: squeeze-excitation in every block

  @property
  def num_features(self) -> int:
    return self.widths[-1]


ARCHS: dict[str, RegNetSpec] = {
    'regnet_y_400mf': RegNetSpec((1, 3, 6, 6), (48, 104, 208, 440), (8, 8, 8, 8), True),
    'regnet_y_800mf': RegNetSpec((1, 3, 8, 2), (64, 144, 320, 784), (16, 16, 16, 16), True),
    'regnet_y_1_6gf': RegNetSpec((2, 6, 17, 2), (48, 120, 336, 888), (24, 24, 24, 24), True),
    'regnet_y_3_2gf': RegNetSpec((2, 5, 13, 1), (72, 216, 576, 1512), (24, 24, 24, 24), True),
    'regnet_y_8gf': RegNetSpec((2, 4, 10, 1), (224, 448, 896, 2016), (56, 56, 56, 56), True),
    'regnet_y_16gf': RegNetSpec((2, 4, 11, 1), (224, 448, 1232, 3024), (112, 112, 112, 112), True),
    'regnet_y_32gf': RegNetSpec((2, 5, 12, 1), (232, 696, 1392, 3712), (232, 232, 232, 232), True),
    'regnet_y_128gf': RegNetSpec((2, 7, 17, 1), (528, 1056, 2904, 7392), (264, 264, 264, 264), True),
    'regnet_x_400mf': RegNetSpec((1, 2, 7, 12), (32, 64, 160, 400), (16, 16, 16, 16), False),
    'regnet_x_800mf': RegNetSpec((1, 3, 7, 5), (64, 128, 288, 672), (16, 16, 16, 16), False),
    'regnet_x_1_6gf': RegNetSpec((2, 4, 10, 2), (72, 168, 408, 912), (24, 24, 24, 24), False),
    'regnet_x_3_2gf': RegNetSpec((2, 6, 15, 2), (96, 192, 432, 1008), (48, 48, 48, 48), False),
    # The first stage's group width is capped at its 80 channels (torchvision's min(g, w)).
    'regnet_x_8gf': RegNetSpec((2, 5, 15, 1), (80, 240, 720, 1920), (80, 120, 120, 120), False),
    'regnet_x_16gf': RegNetSpec((2, 6, 13, 1), (256, 512, 896, 2048), (128, 128, 128, 128), False),
    'regnet_x_32gf': RegNetSpec((2, 7, 13, 1), (336, 672, 1344, 2520), (168, 168, 168, 168), False),
}

STEM_WIDTH = 32
SE_RATIO = 0.25          # squeeze width relative to the block's *input* width (torchvision's se_ratio)
STAGES = ('stem', 'trunk_output.block1', 'trunk_output.block2', 'trunk_output.block3', 'trunk_output.block4')

# torchvision's RegNet init: conv weights N(0, sqrt(2 / (k * k * out_channels))) -- fan_out, not
# divided by the groups, as Flax's fan_out of an HWIO kernel is too.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _conv(features: int, kernel: int, stride: int = 1, groups: int = 1, dtype: Any = None,
          name: Optional[str] = None) -> nn.Conv:
  """torchvision's Conv2dNormActivation conv: padding (k - 1) // 2 on each side, no bias."""
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 feature_group_count=groups, use_bias=False, kernel_init=_conv_init, dtype=dtype, name=name)


def _bn(name: Optional[str] = None) -> BatchNorm:
  # torchvision's _regnet passes BatchNorm2d(eps=1e-5, momentum=0.1) explicitly.
  return BatchNorm(momentum=0.1, epsilon=1e-5, name=name)


class SqueezeExcitation(nn.Module):
  """torchvision.ops.SqueezeExcitation: mean over pixels, 1x1 conv, ReLU, 1x1 conv, sigmoid, scale."""
  channels: int
  squeeze_channels: int
  dtype: Any = None

  def setup(self):
    # Conv2d's own bias init (U(+-1/sqrt(fan_in))); torchvision re-initialises only the weights.
    self.fc1 = nn.Conv(self.squeeze_channels, (1, 1), kernel_init=_conv_init,
                       bias_init=torch_linear_init(self.channels), dtype=self.dtype)
    self.fc2 = nn.Conv(self.channels, (1, 1), kernel_init=_conv_init,
                       bias_init=torch_linear_init(self.squeeze_channels), dtype=self.dtype)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    scale = jnp.mean(x_bhwc, axis=(1, 2), keepdims=True)
    scale = nn.sigmoid(self.fc2(nn.relu(self.fc1(scale))))
    return scale * x_bhwc


class ResBottleneckBlock(nn.Module):
  """relu(shortcut(x) + c(se(b(a(x))))): a 1x1, b grouped 3x3 (carrying the stride), c 1x1
  without ReLU; the shortcut a strided 1x1 conv + BN where the shape changes."""
  width_in: int
  width_out: int
  stride: int
  group_width: int
  use_se: bool
  dtype: Any = None

  def setup(self):
    groups = self.width_out // self.group_width
    if self.has_proj:
      self.proj_conv = _conv(self.width_out, 1, self.stride, dtype=self.dtype)
      self.proj_bn = _bn()
    self.a_conv = _conv(self.width_out, 1, dtype=self.dtype)
    self.a_bn = _bn()
    self.b_conv = _conv(self.width_out, 3, self.stride, groups, dtype=self.dtype)
    self.b_bn = _bn()
    if self.use_se:
      self.se = SqueezeExcitation(self.width_out, int(round(SE_RATIO * self.width_in)), self.dtype)
    self.c_conv = _conv(self.width_out, 1, dtype=self.dtype)
    self.c_bn = _bn()

  @property
  def has_proj(self) -> bool:
    return self.width_in != self.width_out or self.stride != 1

  def __call__(self, x_bhwc: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    y = nn.relu(self.a_bn(self.a_conv(x_bhwc), train, mask_b))
    y = nn.relu(self.b_bn(self.b_conv(y), train, mask_b))
    if self.use_se:
      y = self.se(y)
    y = self.c_bn(self.c_conv(y), train, mask_b)
    shortcut = self.proj_bn(self.proj_conv(x_bhwc), train, mask_b) if self.has_proj else x_bhwc
    return nn.relu(shortcut + y)


class AnyStage(nn.Module):
  """torch's `trunk_output.block{s}`: its blocks `block{s}-{i}` named `block{s}_{i}`; the first
  one strides by 2 and changes the width."""
  stage: int
  width_in: int
  width_out: int
  depth: int
  group_width: int
  use_se: bool
  dtype: Any = None

  def setup(self):
    self.blocks = [ResBottleneckBlock(self.width_in if i == 0 else self.width_out, self.width_out, 2 if i == 0 else 1,
                                      self.group_width, self.use_se, self.dtype, name=f'block{self.stage}_{i}')
                   for i in range(self.depth)]

  def __call__(self, x_bhwc: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    for block in self.blocks:
      x_bhwc = block(x_bhwc, train, mask_b)
    return x_bhwc


class Stem(nn.Module):
  """torch's `stem` (SimpleStemIN): 3x3 stride-2 conv, BN, ReLU."""
  dtype: Any = None

  def setup(self):
    self.conv = _conv(STEM_WIDTH, 3, 2, dtype=self.dtype)
    self.bn = _bn()

  def __call__(self, x_bhwc: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    return nn.relu(self.bn(self.conv(x_bhwc), train, mask_b))


class RegNet(nn.Module):
  """torchvision RegNet: `features` is stem + trunk + average pool (B, C), `from_features` the `fc`.

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `fc`.
    dtype: compute dtype of convs and `fc` (e.g. jnp.bfloat16); params, BatchNorm statistics and
      the logits stay float32. None: the inputs' and params' dtype.
  """
  arch: str = 'regnet_y_400mf'
  num_classes: int = 1000
  dtype: Any = None

  def setup(self):
    spec = ARCHS[self.arch]
    self.stem = Stem(self.dtype)
    width_in, stages = STEM_WIDTH, []
    for s, (depth, width, group_width) in enumerate(zip(spec.depths, spec.widths, spec.group_widths), start=1):
      stages.append(AnyStage(s, width_in, width, depth, group_width, spec.se, self.dtype,
                             name=f'trunk_output_block{s}'))
      width_in = width
    self.trunk_output = stages
    # Drawn as a fresh nn.Linear(C, K), the layer a new task puts in place of fc.
    self.fc = nn.Dense(self.num_classes, kernel_init=torch_linear_init(spec.num_features),
                       bias_init=torch_linear_init(spec.num_features), dtype=self.dtype)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> pooled features (B, C); `train` drives BatchNorm."""
    x = self.stem(x_bhwc, train, mask_b)
    for stage in self.trunk_output:
      x = stage(x, train, mask_b)
    return jnp.mean(_at_least_f32(x), axis=(1, 2))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """What the model computes after `features`: `fc` alone (no dropout)."""
    del train
    # The loss is computed from float32 logits whatever the compute dtype.
    return _at_least_f32(self.fc(features_bd))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits; a RegNet has no dropout, so `train` only means train-mode BatchNorm (unless `bn_train`)."""
    return self.from_features(self.features(x_bhwc, train if bn_train is None else bn_train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> RegNet:
  """RegNet for `arch` (one of ARCHS) with a `num_classes`-way `fc`, computing in `dtype`."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return RegNet(arch=arch, num_classes=num_classes, dtype=dtype)


_TRUNK = {f'trunk_output_block{s}': f'trunk_output.block{s}' for s in range(1, 5)}


def stage_of(module_name: str) -> Optional[str]:
  """stem -> 'stem', trunk_output_block3 -> 'trunk_output.block3', fc -> 'head'; None for another
  family's name."""
  if module_name == 'stem':
    return 'stem'
  if module_name == 'fc':
    return HEAD
  return _TRUNK.get(module_name)


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's `arch`, in its state dict's order, with its place in Flax."""
  spec = ARCHS[arch]
  table = conv_entries('stem.0', ('stem', 'conv')) + bn_entries('stem.1', ('stem', 'bn'))
  for s, depth in enumerate(spec.depths, start=1):
    for i in range(depth):
      t, f = f'trunk_output.block{s}.block{s}-{i}', (f'trunk_output_block{s}', f'block{s}_{i}')
      if i == 0:   # every stage's first block strides by 2: always a projection
        table += conv_entries(f'{t}.proj.0', f + ('proj_conv',)) + bn_entries(f'{t}.proj.1', f + ('proj_bn',))
      for part in ('a', 'b'):
        table += conv_entries(f'{t}.f.{part}.0', f + (f'{part}_conv',))
        table += bn_entries(f'{t}.f.{part}.1', f + (f'{part}_bn',))
      if spec.se:
        table += conv_entries(f'{t}.f.se.fc1', f + ('se', 'fc1'), bias=True)
        table += conv_entries(f'{t}.f.se.fc2', f + ('se', 'fc2'), bias=True)
      table += conv_entries(f'{t}.f.c.0', f + ('c_conv',)) + bn_entries(f'{t}.f.c.1', f + ('c_bn',))
  if include_head:
    table += linear_entries('fc', 'fc')
  return table


FAMILY = Family(
    name='regnet',
    archs={
        'regnet_y_400mf': 'regnet_y_400mf-c65dace8.pth', 'regnet_y_800mf': 'regnet_y_800mf-1b27b58c.pth',
        'regnet_y_1_6gf': 'regnet_y_1_6gf-b11a554e.pth', 'regnet_y_3_2gf': 'regnet_y_3_2gf-b5a9779c.pth',
        'regnet_y_8gf': 'regnet_y_8gf-d0d0e4a8.pth', 'regnet_y_16gf': 'regnet_y_16gf-9e6ed7dd.pth',
        'regnet_y_32gf': 'regnet_y_32gf-4dee3f7a.pth',
        # No IMAGENET1K_V1 weights: torchvision's DEFAULT (SWAG, end-to-end at 384 px).
        'regnet_y_128gf': 'regnet_y_128gf_swag-c8ce3e52.pth',
        'regnet_x_400mf': 'regnet_x_400mf-adf1edd5.pth', 'regnet_x_800mf': 'regnet_x_800mf-ad17e45c.pth',
        'regnet_x_1_6gf': 'regnet_x_1_6gf-e3633e7f.pth', 'regnet_x_3_2gf': 'regnet_x_3_2gf-f342aeae.pth',
        'regnet_x_8gf': 'regnet_x_8gf-03ceed89.pth', 'regnet_x_16gf': 'regnet_x_16gf-2007eb11.pth',
        'regnet_x_32gf': 'regnet_x_32gf-9d47f8d0.pth',
    },
    create=create_model,
    stages=STAGES,
    head='fc', head_torch='fc', head_stages=(HEAD,),
    stage_of=stage_of,
    num_features=lambda arch: ARCHS[arch].num_features,
    features_have_batch_norm=lambda arch: True,
    name_table=torch_name_table,
)
