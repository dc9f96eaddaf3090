"""torchvision VGG11/13/16/19, plain and with BatchNorm, in Flax, NHWC.

Top-level modules carry their stage in their name so that freezing can name them:
`block{b}_conv{i}` / `block{b}_bn{i}` are the convs (and BNs) between max-pool b-1 and b
(torch's `features.N`, see `torch_name_table`), `classifier_0` / `classifier_3` the two
4096-wide Linear layers and `classifier_6` the last one (the head the material replaces).
`FAMILY` registers the family (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tl_jax.models import winograd
from tl_jax.models.family import HEAD as HEAD_STAGE, Entry, Family, bn_entries, conv_entries, linear_entries
from tl_jax.models.layers import BatchNorm
from tl_jax.models.resnet import torch_linear_init

# Output channels of each conv, one tuple per block; a max-pool ends every block (torchvision's cfgs A, B, D, E).
_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    'A': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'B': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    'D': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    'E': ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


@dataclasses.dataclass(frozen=True)
class VGGSpec:
  cfg: str
  batch_norm: bool

  @property
  def blocks(self) -> tuple[tuple[int, ...], ...]:
    return _CFGS[self.cfg]


ARCHS: dict[str, VGGSpec] = {
    f'vgg{depth}{"_bn" if bn else ""}': VGGSpec(cfg, bn)
    for depth, cfg in ((11, 'A'), (13, 'B'), (16, 'D'), (19, 'E')) for bn in (False, True)
}

STAGES = ('block1', 'block2', 'block3', 'block4', 'block5', 'classifier')
POOL_SIZE = 7                      # AdaptiveAvgPool2d((7, 7))
NUM_FEATURES = 512 * POOL_SIZE * POOL_SIZE
HIDDEN = 4096
DROPOUT = 0.5
HEAD = 'classifier_6'

# torchvision's VGG init: convs kaiming_normal_(fan_out, relu) with zero bias, Linear N(0, 0.01) with zero bias.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_linear_init = nn.initializers.normal(0.01)


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) averaging weights of torch's adaptive_avg_pool: bin i covers floor(i*in/out) .. ceil((i+1)*in/out)."""
  weights = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(x_bhwc: jax.Array, out_size: int) -> jax.Array:
  """torch's AdaptiveAvgPool2d((out_size, out_size)) on NHWC; bins may overlap when the size does not divide."""
  _, h, w, _ = x_bhwc.shape
  if h == out_size and w == out_size:
    return x_bhwc   # torch's bins are single pixels then: the identity (224 px inputs)
  pool_h = jnp.asarray(adaptive_pool_matrix(h, out_size), x_bhwc.dtype)
  pool_w = jnp.asarray(adaptive_pool_matrix(w, out_size), x_bhwc.dtype)
  return jnp.einsum('oh,bhwc,pw->bopc', pool_h, x_bhwc, pool_w)


# Winograd where the policy says (tl_jax.models.winograd), lax's own convolution elsewhere, as before.
_WINOGRAD_CONV = functools.partial(winograd.conv_general_dilated, fallback=lax.conv_general_dilated)


class VGG(nn.Module):
  """torchvision VGG: `features` is convs + avgpool + flatten (B, 25088), `head` the classifier.

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `classifier_6`.
    dropout_rate: torch's Dropout(p) in the classifier (0.5); active only with `train=True`,
      where it draws from the 'dropout' rng.
  """
  arch: str = 'vgg16'
  num_classes: int = 1000
  dropout_rate: float = DROPOUT
  # True: 3x3 convs as Winograd on CPU where the measured policy says it is faster (tl_jax.models.winograd).
  winograd: bool = False

  def setup(self):
    spec = ARCHS[self.arch]
    convs, bns = [], []
    for b, widths in enumerate(spec.blocks, start=1):
      # torch pads every 3x3 conv by 1 on each side; 'SAME' is the same for stride 1, written out anyway.
      convs.append([nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_conv_init,
                            bias_init=nn.initializers.zeros, name=f'block{b}_conv{i}',
                            conv_general_dilated=_WINOGRAD_CONV if self.winograd else None)
                    for i, width in enumerate(widths, start=1)])
      bns.append([BatchNorm(name=f'block{b}_bn{i}') for i in range(1, len(widths) + 1)]
                 if spec.batch_norm else [])
    self.convs, self.bns = convs, bns
    self.classifier_0 = nn.Dense(HIDDEN, kernel_init=_linear_init, bias_init=nn.initializers.zeros)
    self.classifier_3 = nn.Dense(HIDDEN, kernel_init=_linear_init, bias_init=nn.initializers.zeros)
    # Drawn as a fresh nn.Linear(4096, K), the layer the material puts in place of classifier[6].
    self.classifier_6 = nn.Dense(self.num_classes, kernel_init=torch_linear_init(HIDDEN),
                                 bias_init=torch_linear_init(HIDDEN))
    self.dropout = nn.Dropout(self.dropout_rate)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               return_stages: bool = False) -> Any:
    """Convolutional base: images (NHWC, normalised) -> (B, 25088) in torch's flatten order.

    With `return_stages`, also returns {'block1'..'block5'} activations after each max-pool (NHWC)."""
    stages = {}
    x = x_bhwc
    for b, (convs, bns) in enumerate(zip(self.convs, self.bns), start=1):
      for i, conv in enumerate(convs):
        x = conv(x)
        if bns:
          x = bns[i](x, train, mask_b)
        x = nn.relu(x)
      # Even inputs never need padding here; an odd size drops the last row/column as torch's floor does.
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      stages[f'block{b}'] = x
    x = adaptive_avg_pool(x, POOL_SIZE)
    # torch flattens (C, H, W): transposing here keeps classifier_0's kernel a plain transpose of
    # torch's weight, so converted weights and any Flax head see the same feature order as torch.
    flat = jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))
    return (flat, stages) if return_stages else flat

  def head(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's classifier: Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear."""
    x = self.dropout(nn.relu(self.classifier_0(features_bd)), deterministic=not train)
    x = self.dropout(nn.relu(self.classifier_3(x)), deterministic=not train)
    return self.classifier_6(x)

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """What the model computes after `features` (the models' common name; see tl_jax.feature_cache)."""
    return self.head(features_bd, train)

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits. `train` turns on dropout and (unless `bn_train` says otherwise) train-mode BatchNorm."""
    bn_train = train if bn_train is None else bn_train
    return self.head(self.features(x_bhwc, bn_train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None,
                 winograd: Optional[bool] = None) -> VGG:
  """VGG for `arch` (one of ARCHS) with a `num_classes`-way `classifier_6`; float32 only. `winograd`
  (None: True): the 3x3 convs the measured policy marks run as Winograd on CPU (see resnet.create_model)."""
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(ARCHS)}')
  if dtype is not None:
    raise ValueError(f'--dtype {jnp.dtype(dtype).name} is built for the ResNets; {arch} computes in float32 '
                     '(leave --dtype out)')
  if fast_backward:
    raise ValueError(f'fast_backward is built for the ResNets, not {arch}')
  return VGG(arch=arch, num_classes=num_classes, winograd=True if winograd is None else winograd)


def stage_of(module_name: str) -> Optional[str]:
  """block5_conv2 / block5_bn2 -> 'block5', classifier_0/_3 -> 'classifier', classifier_6 -> 'head';
  None for another family's name."""
  if module_name == HEAD:
    return HEAD_STAGE
  if module_name.startswith('block') and module_name[5:6].isdigit():
    return module_name.split('_')[0]
  if module_name.startswith('classifier_'):
    return 'classifier'
  return None


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """torch's `features` is one Sequential: conv, [bn,] relu per conv and a max-pool per block."""
  spec = ARCHS[arch]
  table, index = [], 0
  for b, widths in enumerate(spec.blocks, start=1):
    for i in range(1, len(widths) + 1):
      table += conv_entries(f'features.{index}', (f'block{b}_conv{i}',), bias=True)
      index += 1
      if spec.batch_norm:
        table += bn_entries(f'features.{index}', (f'block{b}_bn{i}',))
        index += 1
      index += 1   # ReLU
    index += 1     # MaxPool2d
  # classifier: 0 Linear, 1 ReLU, 2 Dropout, 3 Linear, 4 ReLU, 5 Dropout, 6 Linear (the head).
  table += linear_entries('classifier.0', 'classifier_0') + linear_entries('classifier.3', 'classifier_3')
  if include_head:
    table += linear_entries('classifier.6', HEAD)
  return table


FAMILY = Family(
    name='vgg',
    archs={'vgg11': 'vgg11-8a719046.pth', 'vgg11_bn': 'vgg11_bn-6002323d.pth',
           'vgg13': 'vgg13-19584684.pth', 'vgg13_bn': 'vgg13_bn-abd245e5.pth',
           'vgg16': 'vgg16-397923af.pth', 'vgg16_bn': 'vgg16_bn-6c64b313.pth',
           'vgg19': 'vgg19-dcbb9e9d.pth', 'vgg19_bn': 'vgg19_bn-c79401a0.pth'},
    create=create_model,
    stages=STAGES,
    head=HEAD, head_torch='classifier.6', head_stages=('classifier', HEAD_STAGE),
    stage_of=stage_of,
    num_features=lambda arch: NUM_FEATURES,
    features_have_batch_norm=lambda arch: ARCHS[arch].batch_norm,
    name_table=torch_name_table,
)
