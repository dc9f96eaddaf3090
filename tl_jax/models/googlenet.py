"""torchvision's GoogLeNet (Inception v1 with BatchNorm) in Flax, NHWC, with its two auxiliary classifiers.

Submodules carry torchvision's names (torch's `inception4a.branch2.1.conv` is the Flax path
('inception4a', 'branch2_1', 'conv')), so every top-level module is a stage for freezing and the
name table reads one to one. `aux1` (on inception4a) and `aux2` (on inception4d) are computed only
for a train-mode call that asks for them (`with_aux`), each loss weighted 0.3
(`FAMILY.aux_loss_weights`); their last Linears `aux1.fc2` and `aux2.fc2` have `num_classes`
outputs like `fc`, and a new task replaces all three (`AUX_HEADS`). `FAMILY` registers the family
(tl_jax.models.registry).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.family import HEAD as HEAD_STAGE, Entry, Family, check_create_args, linear_entries
from tl_jax.models.inception import BasicConv2d, basic_conv_entries, transform_input
from tl_jax.models.layers import max_pool
from tl_jax.models.resnet import torch_linear_init
from tl_jax.models.vgg import adaptive_avg_pool

ARCHS = ('googlenet',)
HEAD = 'fc'
AUX_NAMES = ('aux1', 'aux2')
# Flax params paths of the auxiliary heads' last Linear layers, the num_classes-wide layers a new
# task replaces together with `fc` (torch: `model.aux1.fc2 = nn.Linear(1024, K)`, the same for aux2).
AUX_HEADS: tuple[tuple[str, ...], ...] = (('aux1', 'fc2'), ('aux2', 'fc2'))
AUX_LOSS_WEIGHTS = (0.3, 0.3)
NUM_FEATURES = 1024
DROPOUT = 0.2
DROPOUT_AUX = 0.7
AUX_POOL = 4             # the aux heads' AdaptiveAvgPool2d((4, 4))
AUX_HIDDEN = 1024

# torch's Inception(in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) arguments
# after in_channels (which Flax infers), input to output.
INCEPTIONS = (('inception3a', (64, 96, 128, 16, 32, 32)), ('inception3b', (128, 128, 192, 32, 96, 64)),
              ('inception4a', (192, 96, 208, 16, 48, 64)), ('inception4b', (160, 112, 224, 24, 64, 64)),
              ('inception4c', (128, 128, 256, 24, 64, 64)), ('inception4d', (112, 144, 288, 32, 64, 64)),
              ('inception4e', (256, 160, 320, 32, 128, 128)),
              ('inception5a', (256, 160, 320, 32, 128, 128)), ('inception5b', (384, 192, 384, 48, 128, 128)))
# Which block's output each aux head reads, and the ceil-mode max-pools after blocks (window, stride).
AUX_AFTER = {'inception4a': 'aux1', 'inception4d': 'aux2'}
POOL_AFTER = {'inception3b': (3, 2), 'inception4e': (2, 2)}

STEM = ('conv1', 'conv2', 'conv3')
# The backbone's stages, input to output: torch's top-level modules with parameters, the aux heads last.
STAGES = STEM + tuple(name for name, _ in INCEPTIONS) + AUX_NAMES

# torchvision's init: trunc_normal_(std=0.01, a=-2, b=2) for every conv and Linear.
_INIT_STD = 0.01
_trunc_normal = nn.initializers.truncated_normal(_INIT_STD, lower=-2.0 / _INIT_STD, upper=2.0 / _INIT_STD)


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def ceil_mode_padding(size: int, window: int, stride: int, padding: int = 0) -> tuple[int, int]:
  """(low, high) padding under which a floor-mode pool gives torch's ceil_mode=True output size:
  one more window where the last would be partial, unless it would start in the right padding."""
  out = -(-(size + 2 * padding - window) // stride) + 1
  if (out - 1) * stride >= size + padding:
    out -= 1
  return padding, (out - 1) * stride + window - size - padding


def ceil_max_pool(x_bhwc: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """torch's MaxPool2d(window, stride, padding, ceil_mode=True); padding is -inf, as torch's."""
  pads = tuple(ceil_mode_padding(n, window, stride, padding) for n in x_bhwc.shape[1:3])
  return max_pool(x_bhwc, (window, window), (stride, stride), pads)


def _basic_conv(features: int, kernel: int, stride: int = 1, padding: int = 0, dtype: Any = None,
                name: Optional[str] = None) -> BasicConv2d:
  return BasicConv2d(features, (kernel, kernel), stride, (padding, padding), _INIT_STD, dtype, name=name)


class Inception(nn.Module):
  """torchvision's GoogLeNet Inception block: 1x1, 1x1->3x3, 1x1->3x3 and maxpool->1x1 branches.

  (torchvision's "5x5" branch has a 3x3 kernel, as its weights were trained with.)"""
  channels: tuple[int, int, int, int, int, int]   # ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj
  dtype: Any = None

  def setup(self):
    ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj = self.channels
    self.branch1 = _basic_conv(ch1x1, 1, dtype=self.dtype)
    self.branch2_0 = _basic_conv(ch3x3red, 1, dtype=self.dtype)
    self.branch2_1 = _basic_conv(ch3x3, 3, padding=1, dtype=self.dtype)
    self.branch3_0 = _basic_conv(ch5x5red, 1, dtype=self.dtype)
    self.branch3_1 = _basic_conv(ch5x5, 3, padding=1, dtype=self.dtype)
    self.branch4_1 = _basic_conv(pool_proj, 1, dtype=self.dtype)   # branch4.0 is the max-pool

  def __call__(self, x: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    return jnp.concatenate([
        self.branch1(x, train, mask_b),
        self.branch2_1(self.branch2_0(x, train, mask_b), train, mask_b),
        self.branch3_1(self.branch3_0(x, train, mask_b), train, mask_b),
        self.branch4_1(ceil_max_pool(x, 3, 1, 1), train, mask_b),
    ], axis=-1)


class InceptionAux(nn.Module):
  """torchvision's GoogLeNet InceptionAux: 4x4 adaptive avg-pool, 1x1 conv, fc1, ReLU, dropout, fc2."""
  num_classes: int
  dropout_rate: float = DROPOUT_AUX
  dtype: Any = None

  def setup(self):
    self.conv = _basic_conv(128, 1, dtype=self.dtype)
    self.fc1 = nn.Dense(AUX_HIDDEN, kernel_init=_trunc_normal, bias_init=nn.initializers.zeros, dtype=self.dtype)
    # A fresh nn.Linear(1024, K), as a new task puts in place of fc2.
    self.fc2 = nn.Dense(self.num_classes, kernel_init=torch_linear_init(AUX_HIDDEN),
                        bias_init=torch_linear_init(AUX_HIDDEN), dtype=self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, x_bhwc: jax.Array, train: bool, bn_train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    x = self.conv(adaptive_avg_pool(x_bhwc, AUX_POOL), bn_train, mask_b)
    # torch flattens (C, H, W): so fc1's kernel is a plain transpose of torch's weight.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))
    x = self.dropout(nn.relu(self.fc1(x)), deterministic=not train)
    return _at_least_f32(self.fc2(x))


class GoogLeNet(nn.Module):
  """torchvision's GoogLeNet (with aux1 and aux2).

  Attributes:
    arch: 'googlenet'.
    num_classes: outputs of `fc` and of the aux heads' `fc2`.
    dtype: compute dtype of convs and Linears (None: the inputs'); params, BatchNorm statistics and
      logits stay float32.
    dropout_rate: torch's Dropout(0.2) before `fc`; dropout_aux_rate: the aux heads' Dropout(0.7).
      Both on with `train` (the 'dropout' rng).
    transform_input: torchvision's `transform_input`, which it turns on whenever it builds the model
      with ImageNet weights (the ported weights expect inputs in [-1, 1]): the ImageNet-normalised
      input is mapped to those first.
  """
  arch: str = 'googlenet'
  num_classes: int = 1000
  dtype: Any = None
  dropout_rate: float = DROPOUT
  dropout_aux_rate: float = DROPOUT_AUX
  transform_input: bool = True

  def setup(self):
    self.conv1 = _basic_conv(64, 7, 2, 3, dtype=self.dtype)
    self.conv2 = _basic_conv(64, 1, dtype=self.dtype)
    self.conv3 = _basic_conv(192, 3, padding=1, dtype=self.dtype)
    self.inceptions = {name: Inception(channels, self.dtype, name=name) for name, channels in INCEPTIONS}
    self.aux1 = InceptionAux(self.num_classes, self.dropout_aux_rate, self.dtype)
    self.aux2 = InceptionAux(self.num_classes, self.dropout_aux_rate, self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.fc = nn.Dense(self.num_classes, kernel_init=torch_linear_init(NUM_FEATURES),
                       bias_init=torch_linear_init(NUM_FEATURES), dtype=self.dtype)

  def _backbone(self, x_bhwc, train: bool, mask_b) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(pooled features, {aux head: its input})."""
    x = transform_input(x_bhwc) if self.transform_input else x_bhwc
    x = ceil_max_pool(self.conv1(x, train, mask_b), 3, 2)
    x = ceil_max_pool(self.conv3(self.conv2(x, train, mask_b), train, mask_b), 3, 2)
    aux_inputs = {}
    for name, _ in INCEPTIONS:
      x = self.inceptions[name](x, train, mask_b)
      if name in AUX_AFTER:
        aux_inputs[AUX_AFTER[name]] = x
      if name in POOL_AFTER:
        x = ceil_max_pool(x, *POOL_AFTER[name])
    return jnp.mean(_at_least_f32(x), axis=(1, 2)), aux_inputs

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, ImageNet-normalised) -> (B, 1024) pooled features."""
    return self._backbone(x_bhwc, train, mask_b)[0]

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's dropout and `fc` after the pooling."""
    return _at_least_f32(self.fc(self.dropout(features_bd, deterministic=not train)))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None, with_aux: bool = False) -> Any:
    """Logits; with `train` and `with_aux`, torch's train-mode GoogLeNetOutputs order:
    (logits, (aux2, aux1)) (aux_logits2 before aux_logits1).

    `with_aux` also runs the aux heads' BatchNorms (running statistics update as torch's do in
    train mode); without it a train-mode call skips the aux heads."""
    bn_train = train if bn_train is None else bn_train
    features, aux_inputs = self._backbone(x_bhwc, bn_train, mask_b)
    logits = self.from_features(features, train)
    if train and with_aux:
      aux1 = self.aux1(aux_inputs['aux1'], train, bn_train, mask_b)
      aux2 = self.aux2(aux_inputs['aux2'], train, bn_train, mask_b)
      return logits, (aux2, aux1)
    if self.is_initializing():
      for name in AUX_NAMES:   # the aux heads' parameters exist whatever the call
        getattr(self, name)(aux_inputs[name], False, False)
    return logits


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> GoogLeNet:
  """GoogLeNet with `num_classes`-way `fc`, `aux1.fc2` and `aux2.fc2`, computing in `dtype` (None: float32)."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return GoogLeNet(arch=arch, num_classes=num_classes, dtype=dtype)


def stage_of(module_name: str) -> Optional[str]:
  """conv1 .. inception5b, aux1 and aux2 are stages of their own, fc the head; None otherwise."""
  if module_name == HEAD:
    return HEAD_STAGE
  return module_name if module_name in STAGES else None


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's state dict (built with aux_logits=True, as the weight file is), in
  its order. Without the head, `aux1.fc2` and `aux2.fc2` are left out too: all are num_classes wide."""
  del arch
  table = []
  for name in STEM:
    table += basic_conv_entries(name, (name,))
  for name, _ in INCEPTIONS:
    for branch in ('branch1', 'branch2.0', 'branch2.1', 'branch3.0', 'branch3.1', 'branch4.1'):
      table += basic_conv_entries(f'{name}.{branch}', (name, branch.replace('.', '_')))
  for aux in AUX_NAMES:
    table += basic_conv_entries(f'{aux}.conv', (aux, 'conv'))
    layers = ('fc1', 'fc2') if include_head else ('fc1',)
    for layer in layers:
      table += [Entry(e.torch_name, e.collection, (aux,) + e.path, e.kind)
                for e in linear_entries(f'{aux}.{layer}', layer)]
  if include_head:
    table += linear_entries('fc', HEAD)
  return table


FAMILY = Family(
    name='googlenet',
    archs={'googlenet': 'googlenet-1378be20.pth'},
    create=create_model,
    stages=STAGES,
    head=HEAD, head_torch='fc', head_stages=(HEAD_STAGE,),
    stage_of=stage_of,
    num_features=lambda arch: NUM_FEATURES,
    features_have_batch_norm=lambda arch: True,
    name_table=torch_name_table,
    aux_loss_weights=lambda arch: AUX_LOSS_WEIGHTS,
    aux_heads=lambda arch: AUX_HEADS,
)
