"""torchvision's Inception v3 in Flax, NHWC, with its auxiliary classifier.

Submodules carry torchvision's names (torch's `Mixed_6e.branch7x7_2.conv` is the Flax path
('Mixed_6e', 'branch7x7_2', 'conv')), so every top-level module is a stage for freezing and the
name table reads one to one. `AuxLogits` sits on `Mixed_6e` as in torch: computed only for a
train-mode call that asks for it (`with_aux`), its loss weighted 0.4 (`FAMILY.aux_loss_weights`).
Its last Linear, `AuxLogits.fc`, has `num_classes` outputs like `fc`: a new task replaces both
(`AUX_HEADS`). `FAMILY` registers the family (tl_jax.models.registry).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.family import (HEAD as HEAD_STAGE, Entry, Family, bn_entries,
                                  check_create_args, conv_entries, linear_entries)
from tl_jax.models.layers import BatchNorm, max_pool
from tl_jax.models.resnet import torch_linear_init

ARCHS = ('inception_v3',)
HEAD = 'fc'
AUX = 'AuxLogits'
# Flax params paths of the auxiliary heads' last Linear layers, the num_classes-wide layers a new
# task replaces together with `fc` (torch: `model.AuxLogits.fc = nn.Linear(768, K)`).
AUX_HEADS: tuple[tuple[str, ...], ...] = ((AUX, 'fc'),)
AUX_LOSS_WEIGHTS = (0.4,)
NUM_FEATURES = 2048
AUX_IN_CHANNELS = 768
AUX_MIN_SIZE = 17        # Mixed_6e's 17x17 at 299 px, the smallest map the aux head's 5x5/3 pool and 5x5 conv fit
DROPOUT = 0.5
BN_EPS = 1e-3            # BasicConv2d's BatchNorm2d(eps=0.001); momentum is torch's default 0.1

# (torch name, out channels, kernel (h, w), stride, padding (h, w)) of each BasicConv2d, in torch's
# definition order, which is its state dict's order; the mixed blocks' out channels depend on their
# arguments (InceptionA's pool_features, InceptionC's channels_7x7).
STEM = (('Conv2d_1a_3x3', 32, (3, 3), 2, (0, 0)),
        ('Conv2d_2a_3x3', 32, (3, 3), 1, (0, 0)),
        ('Conv2d_2b_3x3', 64, (3, 3), 1, (1, 1)),
        ('Conv2d_3b_1x1', 80, (1, 1), 1, (0, 0)),
        ('Conv2d_4a_3x3', 192, (3, 3), 1, (0, 0)))


def _block_a(pool_features: int):
  return (('branch1x1', 64, (1, 1), 1, (0, 0)),
          ('branch5x5_1', 48, (1, 1), 1, (0, 0)), ('branch5x5_2', 64, (5, 5), 1, (2, 2)),
          ('branch3x3dbl_1', 64, (1, 1), 1, (0, 0)), ('branch3x3dbl_2', 96, (3, 3), 1, (1, 1)),
          ('branch3x3dbl_3', 96, (3, 3), 1, (1, 1)),
          ('branch_pool', pool_features, (1, 1), 1, (0, 0)))


def _block_b(_):
  return (('branch3x3', 384, (3, 3), 2, (0, 0)),
          ('branch3x3dbl_1', 64, (1, 1), 1, (0, 0)), ('branch3x3dbl_2', 96, (3, 3), 1, (1, 1)),
          ('branch3x3dbl_3', 96, (3, 3), 2, (0, 0)))


def _block_c(c7: int):
  return (('branch1x1', 192, (1, 1), 1, (0, 0)),
          ('branch7x7_1', c7, (1, 1), 1, (0, 0)), ('branch7x7_2', c7, (1, 7), 1, (0, 3)),
          ('branch7x7_3', 192, (7, 1), 1, (3, 0)),
          ('branch7x7dbl_1', c7, (1, 1), 1, (0, 0)), ('branch7x7dbl_2', c7, (7, 1), 1, (3, 0)),
          ('branch7x7dbl_3', c7, (1, 7), 1, (0, 3)), ('branch7x7dbl_4', c7, (7, 1), 1, (3, 0)),
          ('branch7x7dbl_5', 192, (1, 7), 1, (0, 3)),
          ('branch_pool', 192, (1, 1), 1, (0, 0)))


def _block_d(_):
  return (('branch3x3_1', 192, (1, 1), 1, (0, 0)), ('branch3x3_2', 320, (3, 3), 2, (0, 0)),
          ('branch7x7x3_1', 192, (1, 1), 1, (0, 0)), ('branch7x7x3_2', 192, (1, 7), 1, (0, 3)),
          ('branch7x7x3_3', 192, (7, 1), 1, (3, 0)), ('branch7x7x3_4', 192, (3, 3), 2, (0, 0)))


def _block_e(_):
  return (('branch1x1', 320, (1, 1), 1, (0, 0)),
          ('branch3x3_1', 384, (1, 1), 1, (0, 0)), ('branch3x3_2a', 384, (1, 3), 1, (0, 1)),
          ('branch3x3_2b', 384, (3, 1), 1, (1, 0)),
          ('branch3x3dbl_1', 448, (1, 1), 1, (0, 0)), ('branch3x3dbl_2', 384, (3, 3), 1, (1, 1)),
          ('branch3x3dbl_3a', 384, (1, 3), 1, (0, 1)), ('branch3x3dbl_3b', 384, (3, 1), 1, (1, 0)),
          ('branch_pool', 192, (1, 1), 1, (0, 0)))


_BLOCK_CONVS = {'A': _block_a, 'B': _block_b, 'C': _block_c, 'D': _block_d, 'E': _block_e}

# (torch name, block type, its argument), input to output.
MIXED = (('Mixed_5b', 'A', 32), ('Mixed_5c', 'A', 64), ('Mixed_5d', 'A', 64),
         ('Mixed_6a', 'B', None),
         ('Mixed_6b', 'C', 128), ('Mixed_6c', 'C', 160), ('Mixed_6d', 'C', 160), ('Mixed_6e', 'C', 192),
         ('Mixed_7a', 'D', None), ('Mixed_7b', 'E', None), ('Mixed_7c', 'E', None))

AUX_CONVS = (('conv0', 128, (1, 1), 1, (0, 0)), ('conv1', 768, (5, 5), 1, (0, 0)))

# The backbone's stages, input to output: each top-level module of torch's, the aux head last.
STAGES = tuple(name for name, *_ in STEM) + tuple(name for name, *_ in MIXED) + (AUX,)


def _trunc_normal(stddev: float):
  """torch's trunc_normal_(std=stddev, a=-2, b=2): the bounds are absolute, not in stddevs."""
  return nn.initializers.truncated_normal(stddev, lower=-2.0 / stddev, upper=2.0 / stddev)


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def avg_pool(x_bhwc: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  """torch's F.avg_pool2d with count_include_pad=True (its default): zero padding counts, every
  window divides by window**2."""
  return nn.avg_pool(x_bhwc, (window, window), (stride, stride), ((padding, padding), (padding, padding)),
                     count_include_pad=True)


def transform_input(x_bhwc: jax.Array) -> jax.Array:
  """torchvision's `_transform_input`: ImageNet-normalised inputs -> the (x - 0.5) / 0.5 inputs
  the ported Google weights were trained on."""
  scale = jnp.asarray([0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5], x_bhwc.dtype)
  shift = jnp.asarray([(0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5], x_bhwc.dtype)
  return x_bhwc * scale + shift


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU, torchvision's BasicConv2d."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  stddev: float = 0.1    # torchvision's init: trunc_normal_(std=0.1), the aux head's conv1 0.01
  dtype: Any = None

  def setup(self):
    (ph, pw), s = self.padding, self.stride
    self.conv = nn.Conv(self.features, self.kernel, strides=(s, s), padding=((ph, ph), (pw, pw)),
                        use_bias=False, kernel_init=_trunc_normal(self.stddev), dtype=self.dtype)
    self.bn = BatchNorm(momentum=0.1, epsilon=BN_EPS)

  def __call__(self, x_bhwc: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    return nn.relu(self.bn(self.conv(x_bhwc), train, mask_b))


def _basic_convs(specs, dtype, stddevs=None) -> dict[str, BasicConv2d]:
  stddevs = stddevs or {}
  return {name: BasicConv2d(out, kernel, stride, padding, stddevs.get(name, 0.1), dtype, name=name)
          for name, out, kernel, stride, padding in specs}


class Mixed(nn.Module):
  """One of torchvision's InceptionA..E blocks: branches concatenated on the channels."""
  kind: str          # 'A' | 'B' | 'C' | 'D' | 'E'
  arg: Optional[int] = None
  dtype: Any = None

  def setup(self):
    self.convs = _basic_convs(_BLOCK_CONVS[self.kind](self.arg), self.dtype)

  def __call__(self, x: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    c = lambda name, y: self.convs[name](y, train, mask_b)
    if self.kind == 'A':
      branches = [c('branch1x1', x),
                  c('branch5x5_2', c('branch5x5_1', x)),
                  c('branch3x3dbl_3', c('branch3x3dbl_2', c('branch3x3dbl_1', x))),
                  c('branch_pool', avg_pool(x, 3, 1, 1))]
    elif self.kind == 'B':
      branches = [c('branch3x3', x),
                  c('branch3x3dbl_3', c('branch3x3dbl_2', c('branch3x3dbl_1', x))),
                  max_pool(x, (3, 3), (2, 2), ((0, 0), (0, 0)))]
    elif self.kind == 'C':
      branches = [c('branch1x1', x),
                  c('branch7x7_3', c('branch7x7_2', c('branch7x7_1', x))),
                  c('branch7x7dbl_5', c('branch7x7dbl_4', c('branch7x7dbl_3', c('branch7x7dbl_2',
                                                                                  c('branch7x7dbl_1', x))))),
                  c('branch_pool', avg_pool(x, 3, 1, 1))]
    elif self.kind == 'D':
      branches = [c('branch3x3_2', c('branch3x3_1', x)),
                  c('branch7x7x3_4', c('branch7x7x3_3', c('branch7x7x3_2', c('branch7x7x3_1', x)))),
                  max_pool(x, (3, 3), (2, 2), ((0, 0), (0, 0)))]
    else:
      b3 = c('branch3x3_1', x)
      b3dbl = c('branch3x3dbl_2', c('branch3x3dbl_1', x))
      branches = [c('branch1x1', x),
                  c('branch3x3_2a', b3), c('branch3x3_2b', b3),
                  c('branch3x3dbl_3a', b3dbl), c('branch3x3dbl_3b', b3dbl),
                  c('branch_pool', avg_pool(x, 3, 1, 1))]
    return jnp.concatenate(branches, axis=-1)


class InceptionAux(nn.Module):
  """torchvision's InceptionAux: 5x5/3 avg-pool, 1x1 and 5x5 convs, global pool, Linear."""
  num_classes: int
  dtype: Any = None

  def setup(self):
    self.convs = _basic_convs(AUX_CONVS, self.dtype, stddevs={'conv1': 0.01})
    # A fresh nn.Linear(768, K), as a new task puts in place of AuxLogits.fc.
    self.fc = nn.Dense(self.num_classes, kernel_init=torch_linear_init(AUX_IN_CHANNELS),
                       bias_init=torch_linear_init(AUX_IN_CHANNELS), dtype=self.dtype)

  def __call__(self, x_bhwc: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    x = avg_pool(x_bhwc, 5, 3, 0)
    x = self.convs['conv1'](self.convs['conv0'](x, train, mask_b), train, mask_b)
    return _at_least_f32(self.fc(jnp.mean(_at_least_f32(x), axis=(1, 2))))


class Inception3(nn.Module):
  """torchvision's Inception3 (with its AuxLogits).

  Attributes:
    arch: 'inception_v3'.
    num_classes: outputs of `fc` and of `AuxLogits.fc`.
    dtype: compute dtype of convs and Linears (None: the inputs'); params, BatchNorm statistics and
      logits stay float32.
    dropout_rate: torch's Dropout(0.5) before `fc`, on with `train` (the 'dropout' rng).
    transform_input: torchvision's `transform_input`, which it turns on whenever it builds the model
      with ImageNet weights (the ported Google weights expect inputs in [-1, 1]): the ImageNet-
      normalised input is mapped to those first.
  """
  arch: str = 'inception_v3'
  num_classes: int = 1000
  dtype: Any = None
  dropout_rate: float = DROPOUT
  transform_input: bool = True

  def setup(self):
    self.stem = _basic_convs(STEM, self.dtype)
    self.mixed = {name: Mixed(kind, arg, self.dtype, name=name) for name, kind, arg in MIXED}
    self.AuxLogits = InceptionAux(self.num_classes, self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.fc = nn.Dense(self.num_classes, kernel_init=torch_linear_init(NUM_FEATURES),
                       bias_init=torch_linear_init(NUM_FEATURES), dtype=self.dtype)

  def _backbone(self, x_bhwc, train: bool, mask_b) -> tuple[jax.Array, jax.Array]:
    """(pooled features, Mixed_6e's output: the aux head's input)."""
    x = transform_input(x_bhwc) if self.transform_input else x_bhwc
    for name, *_ in STEM:
      x = self.stem[name](x, train, mask_b)
      if name in ('Conv2d_2b_3x3', 'Conv2d_4a_3x3'):   # maxpool1, maxpool2
        x = max_pool(x, (3, 3), (2, 2), ((0, 0), (0, 0)))
    aux_input = None
    for name, *_ in MIXED:
      x = self.mixed[name](x, train, mask_b)
      if name == 'Mixed_6e':
        aux_input = x
    return jnp.mean(_at_least_f32(x), axis=(1, 2)), aux_input

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, ImageNet-normalised) -> (B, 2048) pooled features."""
    return self._backbone(x_bhwc, train, mask_b)[0]

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's dropout and `fc` after the pooling."""
    return _at_least_f32(self.fc(self.dropout(features_bd, deterministic=not train)))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None, with_aux: bool = False) -> Any:
    """Logits; with `train` and `with_aux`, torch's train-mode InceptionOutputs: (logits, (aux,)).

    `with_aux` also runs the aux head's BatchNorms (running statistics update as torch's do in
    train mode); without it a train-mode call skips the aux head."""
    bn_train = train if bn_train is None else bn_train
    features, aux_input = self._backbone(x_bhwc, bn_train, mask_b)
    logits = self.from_features(features, train)
    if train and with_aux:
      if min(aux_input.shape[1:3]) < AUX_MIN_SIZE:
        raise ValueError(f'{self.arch} trains its aux head (torchvision\'s loss: main + 0.4 aux) from 299-px inputs '
                         f'(Mixed_6e {AUX_MIN_SIZE}x{AUX_MIN_SIZE}); the train batches are {x_bhwc.shape[1]}x'
                         f'{x_bhwc.shape[2]}: crop to 299 px (e.g. RandomResizedCrop: {{size: 299}}, as the '
                         'ImageNet weights\' preprocessing does)')
      return logits, (self.AuxLogits(aux_input, bn_train, mask_b),)
    if self.is_initializing():
      # The aux head's parameters exist whatever the call; any input small enough to leave
      # Mixed_6e below 17x17 would not fit its 5x5 pool and conv, so it gets a stand-in.
      self.AuxLogits(jnp.zeros((1, AUX_MIN_SIZE, AUX_MIN_SIZE, AUX_IN_CHANNELS), aux_input.dtype), False)
    return logits


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> Inception3:
  """Inception v3 with `num_classes`-way `fc` and `AuxLogits.fc`, computing in `dtype` (None: float32)."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return Inception3(arch=arch, num_classes=num_classes, dtype=dtype)


def stage_of(module_name: str) -> Optional[str]:
  """Conv2d_1a_3x3 .. Mixed_7c and AuxLogits are stages of their own, fc the head; None otherwise."""
  if module_name == HEAD:
    return HEAD_STAGE
  return module_name if module_name in STAGES else None


def basic_conv_entries(torch_prefix: str, path: tuple[str, ...]) -> list[Entry]:
  """A BasicConv2d's tensors (its conv, its BatchNorm); GoogLeNet's are the same module."""
  return conv_entries(f'{torch_prefix}.conv', path + ('conv',)) + bn_entries(f'{torch_prefix}.bn', path + ('bn',))


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's state dict (built with aux_logits=True, as the weight file is), in
  its order. Without the head, `AuxLogits.fc` is left out too: both are num_classes wide."""
  del arch
  table = []
  for name, *_ in STEM:
    table += basic_conv_entries(name, (name,))
  for name, kind, arg in MIXED:
    for conv, *_ in _BLOCK_CONVS[kind](arg):
      table += basic_conv_entries(f'{name}.{conv}', (name, conv))
    if name == 'Mixed_6e':   # torch defines AuxLogits between Mixed_6e and Mixed_7a
      for conv, *_ in AUX_CONVS:
        table += basic_conv_entries(f'{AUX}.{conv}', (AUX, conv))
      if include_head:
        table += [Entry(e.torch_name, e.collection, (AUX,) + e.path, e.kind)
                  for e in linear_entries(f'{AUX}.fc', 'fc')]
  if include_head:
    table += linear_entries('fc', HEAD)
  return table


FAMILY = Family(
    name='inception',
    archs={'inception_v3': 'inception_v3_google-0cc3c7bd.pth'},
    create=create_model,
    stages=STAGES,
    head=HEAD, head_torch='fc', head_stages=(HEAD_STAGE,),
    stage_of=stage_of,
    num_features=lambda arch: NUM_FEATURES,
    features_have_batch_norm=lambda arch: True,
    name_table=torch_name_table,
    # torchvision's min_size: 75 px is the smallest input Mixed_7a's stride-2 convs leave a pixel of.
    init_size=lambda arch: 75,
    aux_loss_weights=lambda arch: AUX_LOSS_WEIGHTS,
    aux_heads=lambda arch: AUX_HEADS,
)
