"""torchvision ConvNeXt Tiny/Small/Base/Large in Flax, NHWC.

Top-level modules are torchvision's `features.N` and `classifier.N` with '.' -> '_':
`features_0` the 4x4 patchify stem, `features_1/3/5/7` the stages of CNBlocks, `features_2/4/6`
the downsampling layers, `classifier_0` the LayerNorm after the pooling and `classifier_2` the
last Linear (the head). `features` ends at the pooled vector, as torch's `avgpool` does, so the
classifier's LayerNorm belongs to `from_features` (stage 'classifier'). `FAMILY` registers the
family (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models import fast_conv
from tl_jax.models.family import HEAD as HEAD_STAGE, Entry, Family, check_create_args, conv_entries, linear_entries
from tl_jax.models.resnet import torch_linear_init


@dataclasses.dataclass(frozen=True)
class ConvNeXtSpec:
  widths: tuple[int, ...]            # channels of each stage
  depths: tuple[int, ...]            # CNBlocks per stage
  stochastic_depth_prob: float       # torchvision's default rate of the last block

  @property
  def num_features(self) -> int:
    return self.widths[-1]


ARCHS: dict[str, ConvNeXtSpec] = {
    'convnext_tiny': ConvNeXtSpec((96, 192, 384, 768), (3, 3, 9, 3), 0.1),
    'convnext_small': ConvNeXtSpec((96, 192, 384, 768), (3, 3, 27, 3), 0.4),
    'convnext_base': ConvNeXtSpec((128, 256, 512, 1024), (3, 3, 27, 3), 0.5),
    'convnext_large': ConvNeXtSpec((192, 384, 768, 1536), (3, 3, 27, 3), 0.5),
}

STAGES = tuple(f'features.{i}' for i in range(8)) + ('classifier',)
HEAD = 'classifier_2'
LAYER_NORM_EPS = 1e-6    # torchvision's LayerNorm2d and the CNBlocks' LayerNorm
LAYER_SCALE = 1e-6       # initial value of each block's layer_scale

# torchvision's ConvNeXt init: every Conv2d and Linear weight trunc_normal_(std=0.02), biases zero.
_weight_init = nn.initializers.truncated_normal(0.02)


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis (LayerNorm2d's channels, in NHWC): biased variance.

  Written out rather than Flax's LayerNorm, whose default variance is E[x^2] - E[x]^2 (not
  torch's E[(x - mean)^2], which keeps its precision when the mean is large).
  """
  epsilon: float = LAYER_NORM_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dtype = x.dtype
    x = _at_least_f32(x)   # statistics in float32 at least, whatever the compute dtype
    num_channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (num_channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (num_channels,), jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(in_dtype)


class StochasticDepth(nn.Module):
  """torchvision.ops.stochastic_depth in 'row' mode: each sample's branch kept with probability
  1 - rate and then scaled by 1 / (1 - rate); the identity when deterministic."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    survival = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng('dropout'), survival, (x.shape[0],) + (1,) * (x.ndim - 1))
    noise = keep.astype(x.dtype)
    # torch divides the 0/1 noise, not the input, and skips the division when nothing survives.
    if survival > 0.0:
      noise = noise / survival
    return x * noise


class CNBlock(nn.Module):
  """7x7 depthwise conv, LayerNorm, Linear 4x, exact GELU, Linear, layer scale; residual."""
  dim: int
  stochastic_depth_prob: float
  dtype: Any = None

  def setup(self):
    self.dwconv = nn.Conv(self.dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=self.dim,
                          # XLA:CPU-friendly (depthwise: shifted taps; plain: fast_conv.conv2d)
                          conv_general_dilated=fast_conv.conv_general_dilated,
                          kernel_init=_weight_init, dtype=self.dtype)
    self.norm = LayerNorm()
    self.fc1 = nn.Dense(4 * self.dim, kernel_init=_weight_init, dtype=self.dtype)
    self.fc2 = nn.Dense(self.dim, kernel_init=_weight_init, dtype=self.dtype)
    # torch's (C, 1, 1) shape, broadcast over NCHW there; used flattened over NHWC's last axis here.
    self.layer_scale = self.param('layer_scale', nn.initializers.constant(LAYER_SCALE), (self.dim, 1, 1),
                                  jnp.float32)
    self.stochastic_depth = StochasticDepth(self.stochastic_depth_prob)

  def __call__(self, x_bhwc: jax.Array, train: bool) -> jax.Array:
    y = self.norm(self.dwconv(x_bhwc))
    y = self.fc2(nn.gelu(self.fc1(y), approximate=False))
    y = self.layer_scale.reshape(-1) * y
    return self.stochastic_depth(y, deterministic=not train) + x_bhwc


class CNStage(nn.Module):
  """torch's `features.{1,3,5,7}`: CNBlocks named by their index, as in torch's Sequential."""
  dim: int
  rates: tuple[float, ...]     # stochastic depth rate of each block
  dtype: Any = None

  def setup(self):
    self.blocks = [CNBlock(self.dim, rate, self.dtype, name=str(i)) for i, rate in enumerate(self.rates)]

  def __call__(self, x_bhwc: jax.Array, train: bool) -> jax.Array:
    for block in self.blocks:
      x_bhwc = block(x_bhwc, train)
    return x_bhwc


class Stem(nn.Module):
  """torch's `features.0`: a 4x4 stride-4 conv (with bias), then LayerNorm2d."""
  dim: int
  dtype: Any = None

  def setup(self):
    self.conv = nn.Conv(self.dim, (4, 4), strides=(4, 4), padding=((0, 0), (0, 0)), kernel_init=_weight_init,
                        dtype=self.dtype)
    self.norm = LayerNorm()

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    return self.norm(self.conv(x_bhwc))


class Downsample(nn.Module):
  """torch's `features.{2,4,6}`: LayerNorm2d, then a 2x2 stride-2 conv (with bias)."""
  dim: int
  dtype: Any = None

  def setup(self):
    self.norm = LayerNorm()
    # No padding: an odd size drops the last row/column, as torch's floor does.
    self.conv = nn.Conv(self.dim, (2, 2), strides=(2, 2), padding=((0, 0), (0, 0)), kernel_init=_weight_init,
                        dtype=self.dtype)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    return self.conv(self.norm(x_bhwc))


def block_rates(arch: str, stochastic_depth_prob: float) -> list[tuple[float, ...]]:
  """Per stage, each block's stochastic depth rate: torchvision's linear ramp from 0 (first block)
  to `stochastic_depth_prob` (last block) over the whole network."""
  depths = ARCHS[arch].depths
  total = sum(depths)
  rates, block_id = [], 0
  for depth in depths:
    rates.append(tuple(stochastic_depth_prob * (block_id + i) / (total - 1.0) for i in range(depth)))
    block_id += depth
  return rates


class ConvNeXt(nn.Module):
  """torchvision ConvNeXt: `features` is everything up to the pooled vector (B, C),
  `from_features` the classifier (LayerNorm, then the head `classifier_2`).

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `classifier_2`.
    dtype: compute dtype of convs and Linear layers (e.g. jnp.bfloat16); params, LayerNorm
      statistics and the logits stay float32. None: the inputs' and params' dtype.
    stochastic_depth_prob: rate of the last block (the others ramp up to it linearly); None:
      torchvision's default for `arch`. Active only with `train=True`, drawing from the
      'dropout' rng.
  """
  arch: str = 'convnext_tiny'
  num_classes: int = 1000
  dtype: Any = None
  stochastic_depth_prob: Optional[float] = None

  def setup(self):
    spec = ARCHS[self.arch]
    rate = spec.stochastic_depth_prob if self.stochastic_depth_prob is None else self.stochastic_depth_prob
    layers = [Stem(spec.widths[0], self.dtype, name='features_0')]
    for s, (width, rates) in enumerate(zip(spec.widths, block_rates(self.arch, rate))):
      layers.append(CNStage(width, rates, self.dtype, name=f'features_{2 * s + 1}'))
      if s + 1 < len(spec.widths):
        layers.append(Downsample(spec.widths[s + 1], self.dtype, name=f'features_{2 * s + 2}'))
    self.layers = layers
    self.classifier_0 = LayerNorm()
    # Drawn as a fresh nn.Linear(C, K), the layer a new task puts in place of classifier[2].
    self.classifier_2 = nn.Dense(self.num_classes, kernel_init=torch_linear_init(spec.num_features),
                                 bias_init=torch_linear_init(spec.num_features), dtype=self.dtype)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> pooled features (B, C). `train` turns on stochastic depth;
    `mask_b` is accepted for the common signature (no BatchNorm here)."""
    del mask_b
    x = x_bhwc
    for layer in self.layers:
      x = layer(x, train) if isinstance(layer, CNStage) else layer(x)
    return jnp.mean(_at_least_f32(x), axis=(1, 2))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """torch's classifier: LayerNorm2d (over the channels of the 1x1 map), Flatten, Linear."""
    del train   # no dropout in the classifier
    # The loss is computed from float32 logits whatever the compute dtype.
    return _at_least_f32(self.classifier_2(self.classifier_0(features_bd)))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits. `train` turns on stochastic depth; `bn_train` has nothing to drive (no BatchNorm)."""
    del bn_train
    return self.from_features(self.features(x_bhwc, train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> ConvNeXt:
  """ConvNeXt for `arch` (one of ARCHS) with a `num_classes`-way `classifier_2`, computing in `dtype`."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return ConvNeXt(arch=arch, num_classes=num_classes, dtype=dtype)


_FEATURE_NAMES = frozenset(f'features_{i}' for i in range(8))


def stage_of(module_name: str) -> Optional[str]:
  """features_3 -> 'features.3', classifier_0 -> 'classifier', classifier_2 -> 'head';
  None for another family's name."""
  if module_name == HEAD:
    return HEAD_STAGE
  if module_name == 'classifier_0':
    return 'classifier'
  if module_name in _FEATURE_NAMES:
    return module_name.replace('_', '.')
  return None


def _layer_norm_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f'{torch_prefix}.weight', 'params', flax_path + ('scale',), 'copy'),
          Entry(f'{torch_prefix}.bias', 'params', flax_path + ('bias',), 'copy')]


def _dense_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f'{torch_prefix}.weight', 'params', flax_path + ('kernel',), 'linear_w'),
          Entry(f'{torch_prefix}.bias', 'params', flax_path + ('bias',), 'copy')]


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's `arch`, in its state dict's order, with its place in Flax."""
  spec = ARCHS[arch]
  table = conv_entries('features.0.0', ('features_0', 'conv'), bias=True)
  table += _layer_norm_entries('features.0.1', ('features_0', 'norm'))
  for s, depth in enumerate(spec.depths):
    index = 2 * s + 1
    for i in range(depth):
      t, f = f'features.{index}.{i}', (f'features_{index}', str(i))
      # A CNBlock: its own parameter first, then `block`: 0 dwconv, 1 Permute, 2 LayerNorm, 3 Linear,
      # 4 GELU, 5 Linear, 6 Permute.
      table.append(Entry(f'{t}.layer_scale', 'params', f + ('layer_scale',), 'copy'))
      table += conv_entries(f'{t}.block.0', f + ('dwconv',), bias=True)
      table += _layer_norm_entries(f'{t}.block.2', f + ('norm',))
      table += _dense_entries(f'{t}.block.3', f + ('fc1',)) + _dense_entries(f'{t}.block.5', f + ('fc2',))
    if s + 1 < len(spec.depths):
      table += _layer_norm_entries(f'features.{index + 1}.0', (f'features_{index + 1}', 'norm'))
      table += conv_entries(f'features.{index + 1}.1', (f'features_{index + 1}', 'conv'), bias=True)
  # classifier: 0 LayerNorm2d, 1 Flatten, 2 Linear (the head).
  table += _layer_norm_entries('classifier.0', ('classifier_0',))
  if include_head:
    table += linear_entries('classifier.2', HEAD)
  return table


FAMILY = Family(
    name='convnext',
    archs={'convnext_tiny': 'convnext_tiny-983f1562.pth', 'convnext_small': 'convnext_small-0c510722.pth',
           'convnext_base': 'convnext_base-6075fbad.pth', 'convnext_large': 'convnext_large-ea097f82.pth'},
    create=create_model,
    stages=STAGES,
    head=HEAD, head_torch='classifier.2', head_stages=('classifier', HEAD_STAGE),
    stage_of=stage_of,
    num_features=lambda arch: ARCHS[arch].num_features,
    features_have_batch_norm=lambda arch: False,
    features_are_random=lambda arch: True,   # stochastic depth in train mode
    name_table=torch_name_table,
)
