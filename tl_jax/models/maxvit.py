"""torchvision MaxViT (maxvit_t) in Flax, NHWC.

Each MaxVit layer is an MBConv (BatchNorm pre-norm, expand, depthwise, squeeze-excitation,
project) followed by two relative-position-biased attention layers: over 7x7 windows ('window')
and over a dilated 7x7 grid spanning the map ('grid'). Top-level names are torchvision's with
'.' -> '_' (`stem_0`, `blocks_2`, `classifier_3`); below them the names follow torch's modules
(`blocks_2/layers_1/window_attention/attn_layer_1/to_qkv`). Each attention's
`relative_position_index` is a buffer in torch's state dict, so it is kept, unchanged, in the
non-trainable 'batch_stats' collection and the bias is gathered through it as torch does.
`FAMILY` registers the family (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.models import fast_conv
from tl_jax.models.family import HEAD, Entry, Family, bn_entries, check_create_args, conv_entries, linear_entries
from tl_jax.models.layers import BatchNorm
from tl_jax.models.resnet import torch_linear_init

# MaxVit's default norm_layer: partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01) (the MBConvs and stem).
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
LAYER_NORM_EPS = 1e-5   # the attention, MLP and classifier LayerNorms are nn.LayerNorm's defaults


@dataclasses.dataclass(frozen=True)
class MaxViTSpec:
  """torchvision MaxVit's hyper-parameters (its `input_size` aside: the grid follows the input)."""
  stem_channels: int
  block_channels: tuple[int, ...]
  block_layers: tuple[int, ...]
  head_dim: int
  partition_size: int
  stochastic_depth_prob: float
  squeeze_ratio: float = 0.25
  expansion_ratio: float = 4
  mlp_ratio: int = 4


ARCHS: dict[str, MaxViTSpec] = {
    'maxvit_t': MaxViTSpec(64, (64, 128, 256, 512), (2, 2, 5, 2), head_dim=32, partition_size=7,
                           stochastic_depth_prob=0.2),
}

HEAD_NAME = 'classifier_5'
CLASSIFIER = ('classifier_2', 'classifier_3')   # LayerNorm, Linear (+ Tanh): computed by from_features

_conv_init = nn.initializers.normal(0.02)        # MaxVit._init_weights: Conv2d and Linear N(0, 0.02), zero bias
_dense_init = nn.initializers.normal(0.02)


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _layer_norm(name: Optional[str] = None) -> nn.LayerNorm:
  # Variance as torch computes it, mean((x - mean)^2); Flax's default E[x^2] - mean^2 loses digits.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name=name)


def relative_position_index(size: int) -> np.ndarray:
  """torchvision's _get_relative_position_index(size, size): (size^2, size^2) indices into the bias table."""
  coords = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing='ij')).reshape(2, -1)
  relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (size - 1)
  return relative[:, :, 0] * (2 * size - 1) + relative[:, :, 1]


class StochasticDepth(nn.Module):
  """torchvision.ops.StochasticDepth(p, 'row'): each sample's branch kept with probability 1 - p and
  scaled by 1 / (1 - p) in training (the 'dropout' rng), the identity in eval or at p = 0."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    survival = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng('dropout'), survival, (x.shape[0],) + (1,) * (x.ndim - 1))
    scale = keep.astype(x.dtype) / survival if survival > 0.0 else keep.astype(x.dtype)
    return x * scale


class ConvNormAct(nn.Module):
  """torchvision's Conv2dNormActivation: conv (padding (k-1)//2), then BatchNorm and GELU when asked."""
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  norm: bool = True
  activation: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    pad = (self.kernel - 1) // 2
    # Conv2dNormActivation's bias=None means a bias only without a norm layer.
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
                # XLA:CPU-friendly (depthwise: shifted taps; plain: fast_conv.conv2d)
                conv_general_dilated=fast_conv.conv_general_dilated, use_bias=not self.norm,
                kernel_init=_conv_init, bias_init=nn.initializers.zeros, dtype=self.dtype, name='conv')(x_bhwc)
    if self.norm:
      x = BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, name='bn')(x, train, mask_b)
    return nn.gelu(x, approximate=False) if self.activation else x


def avg_pool_3x3_s2(x_bhwc: jax.Array) -> jax.Array:
  """nn.AvgPool2d(3, stride=2, padding=1): zero padding counted in the divisor (count_include_pad)."""
  return nn.avg_pool(x_bhwc, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)


class SqueezeExcitation(nn.Module):
  """torchvision.ops.SqueezeExcitation with SiLU: x * sigmoid(fc2(silu(fc1(mean_hw(x)))))."""
  squeeze_channels: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    scale = jnp.mean(_at_least_f32(x_bhwc), axis=(1, 2), keepdims=True).astype(x_bhwc.dtype)
    scale = nn.Conv(self.squeeze_channels, (1, 1), kernel_init=_conv_init, dtype=self.dtype, name='fc1')(scale)
    scale = nn.Conv(x_bhwc.shape[-1], (1, 1), kernel_init=_conv_init, dtype=self.dtype,
                    name='fc2')(nn.silu(scale))
    return nn.sigmoid(scale) * x_bhwc


class MBConv(nn.Module):
  """torchvision MaxViT's MBConv: proj(x) + stochastic_depth(conv_c(se(conv_b(conv_a(pre_norm(x))))))."""
  out_channels: int
  stride: int
  expansion_ratio: float
  squeeze_ratio: float
  stochastic_depth_rate: float
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, train: bool, bn_train: bool,
               mask_b: Optional[jax.Array] = None) -> jax.Array:
    mid = int(self.out_channels * self.expansion_ratio)
    res = x_bhwc
    if self.stride != 1 or x_bhwc.shape[-1] != self.out_channels:
      if self.stride == 2:
        res = avg_pool_3x3_s2(res)
      res = nn.Conv(self.out_channels, (1, 1), kernel_init=_conv_init, dtype=self.dtype, name='proj')(res)
    x = BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, name='pre_norm')(x_bhwc, bn_train, mask_b)
    x = ConvNormAct(mid, 1, dtype=self.dtype, name='conv_a')(x, bn_train, mask_b)
    x = ConvNormAct(mid, 3, self.stride, groups=mid, dtype=self.dtype, name='conv_b')(x, bn_train, mask_b)
    x = SqueezeExcitation(int(self.out_channels * self.squeeze_ratio), self.dtype, name='squeeze_excitation')(x)
    x = nn.Conv(self.out_channels, (1, 1), kernel_init=_conv_init, dtype=self.dtype, name='conv_c')(x)
    return _at_least_f32(res) + _at_least_f32(StochasticDepth(self.stochastic_depth_rate)(x, train))


class RelativePositionalMultiHeadAttention(nn.Module):
  """torchvision's RelativePositionalMultiHeadAttention over (B, G, P, D) partitions.

  torchvision scales k by feat_dim ** -0.5 (the width D, not the head's): kept, the weights expect it.
  `relative_position_bias_table` ((2s-1)^2, heads) is torch's tensor; the bias of query i and key j is
  table[relative_position_index[i, j]].
  """
  head_dim: int
  partition_size: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bgpd: jax.Array) -> jax.Array:
    b, g, p, dim = x_bgpd.shape
    heads = dim // self.head_dim
    if dim % self.head_dim:
      raise ValueError(f'feat_dim: {dim} must be divisible by head_dim: {self.head_dim}')
    size = self.partition_size
    table = self.param('relative_position_bias_table', nn.initializers.truncated_normal(0.02),
                       ((2 * size - 1) ** 2, heads))
    index = self.variable('batch_stats', 'relative_position_index',
                          lambda: jnp.asarray(relative_position_index(size))).value
    qkv = nn.Dense(3 * heads * self.head_dim, kernel_init=_dense_init, dtype=self.dtype, name='to_qkv')(x_bgpd)
    q, k, v = (t.reshape(b, g, p, heads, self.head_dim) for t in jnp.split(qkv, 3, axis=-1))
    k = k * dim ** -0.5
    scores_bghij = jnp.einsum('bgihd,bgjhd->bghij', q, k)
    bias_hij = jnp.transpose(table[index.reshape(-1)].reshape(size * size, size * size, heads), (2, 0, 1))
    weights_bghij = jax.nn.softmax(_at_least_f32(scores_bghij) + bias_hij, axis=-1).astype(v.dtype)
    out = jnp.einsum('bghij,bgjhd->bgihd', weights_bghij, v).reshape(b, g, p, dim)
    return nn.Dense(dim, kernel_init=_dense_init, dtype=self.dtype, name='merge')(out)


def window_partition(x_bhwc: jax.Array, p: int) -> jax.Array:
  """torchvision's WindowPartition on NHWC: (B, H, W, C) -> (B, H/p * W/p, p * p, C), windows row-major."""
  b, h, w, c = x_bhwc.shape
  x = x_bhwc.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p, c)


def window_departition(x_bgpc: jax.Array, p: int, h_partitions: int, w_partitions: int) -> jax.Array:
  """torchvision's WindowDepartition, back to (B, H, W, C)."""
  b, _, _, c = x_bgpc.shape
  x = x_bgpc.reshape(b, h_partitions, w_partitions, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h_partitions * p, w_partitions * p, c)


class PartitionAttentionLayer(nn.Module):
  """torchvision's PartitionAttentionLayer: attention within 'window' partitions (p = partition_size) or
  across the 'grid' (p = H // partition_size, then the two middle axes swapped), each followed by an
  MLP, both residual with stochastic depth.

  torch fixes the grid at construction (MaxVit's `input_size`); here it is the input's, which is
  the same computation at that size and torch's model built for any other size.
  """
  channels: int
  partition_type: str
  head_dim: int
  partition_size: int
  mlp_ratio: int
  attention_dropout_rate: float
  mlp_dropout_rate: float
  stochastic_depth_rate: float
  dtype: Any = None

  def setup(self):
    if self.partition_type not in ('grid', 'window'):
      raise ValueError("partition_type must be either 'grid' or 'window'")
    self.attn_layer_0 = _layer_norm()
    self.attn_layer_1 = RelativePositionalMultiHeadAttention(self.head_dim, self.partition_size, self.dtype)
    self.attn_dropout = nn.Dropout(self.attention_dropout_rate)
    self.mlp_layer_0 = _layer_norm()
    self.mlp_layer_1 = nn.Dense(self.channels * self.mlp_ratio, kernel_init=_dense_init, dtype=self.dtype)
    self.mlp_layer_3 = nn.Dense(self.channels, kernel_init=_dense_init, dtype=self.dtype)
    self.mlp_dropout = nn.Dropout(self.mlp_dropout_rate)
    self.stochastic_dropout = StochasticDepth(self.stochastic_depth_rate)

  def __call__(self, x_bhwc: jax.Array, train: bool) -> jax.Array:
    _, h, w, _ = x_bhwc.shape
    # torch takes the number of grid partitions from the height for both axes (square maps).
    p = self.partition_size if self.partition_type == 'window' else h // self.partition_size
    if h % p or w % p:
      raise ValueError(f'Grid size must be divisible by partition size. Got grid size of {(h, w)} and '
                       f'partition size of {p}')
    x = window_partition(x_bhwc, p)
    if self.partition_type == 'grid':
      x = jnp.swapaxes(x, 1, 2)
    x = _at_least_f32(x)
    attn = self.attn_dropout(self.attn_layer_1(self.attn_layer_0(x)), deterministic=not train)
    x = x + _at_least_f32(self.stochastic_dropout(attn, train))
    y = nn.gelu(self.mlp_layer_1(self.mlp_layer_0(x)), approximate=False)
    y = self.mlp_dropout(self.mlp_layer_3(y), deterministic=not train)
    x = x + _at_least_f32(self.stochastic_dropout(y, train))
    if self.partition_type == 'grid':
      x = jnp.swapaxes(x, 1, 2)
    return window_departition(x, p, h // p, w // p)


class MaxVitLayer(nn.Module):
  """torchvision's MaxVitLayer: MBConv, window attention, grid attention."""
  out_channels: int
  stride: int
  spec: MaxViTSpec
  stochastic_depth_rate: float
  attention_dropout_rate: float
  mlp_dropout_rate: float
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, train: bool, bn_train: bool,
               mask_b: Optional[jax.Array] = None) -> jax.Array:
    spec = self.spec
    x = MBConv(self.out_channels, self.stride, spec.expansion_ratio, spec.squeeze_ratio,
               self.stochastic_depth_rate, self.dtype, name='MBconv')(x_bhwc, train, bn_train, mask_b)
    for partition_type in ('window', 'grid'):
      attention = PartitionAttentionLayer(
          self.out_channels, partition_type, spec.head_dim, spec.partition_size, spec.mlp_ratio,
          self.attention_dropout_rate, self.mlp_dropout_rate, self.stochastic_depth_rate, self.dtype,
          name=f'{partition_type}_attention')
      x = attention(x, train)
    return x


class MaxVitBlock(nn.Module):
  """torchvision's MaxVitBlock: its layers, the first with stride 2."""
  out_channels: int
  spec: MaxViTSpec
  stochastic_depth_rates: tuple[float, ...]
  attention_dropout_rate: float
  mlp_dropout_rate: float
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, train: bool, bn_train: bool,
               mask_b: Optional[jax.Array] = None) -> jax.Array:
    for index, rate in enumerate(self.stochastic_depth_rates):
      layer = MaxVitLayer(self.out_channels, 2 if index == 0 else 1, self.spec, rate, self.attention_dropout_rate,
                          self.mlp_dropout_rate, self.dtype, name=f'layers_{index}')
      x_bhwc = layer(x_bhwc, train, bn_train, mask_b)
    return x_bhwc


def _conv_output_size(size: int) -> int:
  return (size - 3 + 2) // 2 + 1   # kernel 3, stride 2, padding 1


def block_input_sizes(image_size: int, num_blocks: int) -> list[int]:
  """The map size each block attends over (after its stride-2 MBConv), as torchvision's
  _make_block_input_shapes computes it."""
  sizes, size = [], _conv_output_size(image_size)
  for _ in range(num_blocks):
    size = _conv_output_size(size)
    sizes.append(size)
  return sizes


def stochastic_depth_rates(spec: MaxViTSpec, prob: float) -> list[float]:
  """Each layer's stochastic-depth rate, torchvision's np.linspace(0, prob, number of layers)."""
  return np.linspace(0, prob, sum(spec.block_layers)).tolist()


class MaxVit(nn.Module):
  """torchvision MaxVit: `features` is stem, blocks and the average pool (B, C); `from_features` the
  classifier's LayerNorm, Linear, Tanh and the head `classifier_5` (a Linear without bias).

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `classifier_5`.
    dtype: compute dtype of convs and matmuls (e.g. jnp.bfloat16); params, norm statistics, softmax,
      the residual stream and the logits stay float32 (None: the inputs').
    stochastic_depth_prob: the last layer's stochastic-depth rate (torchvision: 0.2 for maxvit_t),
      rising linearly from 0 over the layers; active only with `train=True` (the 'dropout' rng).
    attention_dropout_rate, mlp_dropout_rate: torchvision's `attention_dropout` / `mlp_dropout`, 0.0.
    spec: hyper-parameters in place of ARCHS[arch] (a smaller model of the same layers).
  """
  arch: str = 'maxvit_t'
  num_classes: int = 1000
  dtype: Any = None
  stochastic_depth_prob: Optional[float] = None   # None: the spec's (torchvision's 0.2)
  attention_dropout_rate: float = 0.0
  mlp_dropout_rate: float = 0.0
  spec: Optional[MaxViTSpec] = None

  def setup(self):
    spec = self.spec or ARCHS[self.arch]
    prob = spec.stochastic_depth_prob if self.stochastic_depth_prob is None else self.stochastic_depth_prob
    rates = stochastic_depth_rates(spec, prob)
    self.stem_0 = ConvNormAct(spec.stem_channels, 3, 2, dtype=self.dtype)
    self.stem_1 = ConvNormAct(spec.stem_channels, 3, 1, norm=False, activation=False, dtype=self.dtype)
    blocks, start = [], 0
    for b, (channels, layers) in enumerate(zip(spec.block_channels, spec.block_layers)):
      blocks.append(MaxVitBlock(channels, spec, tuple(rates[start:start + layers]), self.attention_dropout_rate,
                                self.mlp_dropout_rate, self.dtype, name=f'blocks_{b}'))
      start += layers
    self.blocks = blocks
    width = spec.block_channels[-1]
    self.classifier_2 = _layer_norm()
    self.classifier_3 = nn.Dense(width, kernel_init=_dense_init, dtype=self.dtype)
    # Drawn as a fresh nn.Linear(C, K, bias=False), the layer a new task puts in place of classifier[5].
    self.classifier_5 = nn.Dense(self.num_classes, use_bias=False, kernel_init=torch_linear_init(width),
                                 dtype=self.dtype)
    self.partition_size = spec.partition_size
    self.num_blocks = len(spec.block_channels)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Images (NHWC, normalised) -> average-pooled last block output (B, C). `train` drives stochastic
    depth and dropout and, unless `bn_train` says otherwise, BatchNorm."""
    bn_train = train if bn_train is None else bn_train
    h, w = x_bhwc.shape[1:3]
    sizes = list(zip(block_input_sizes(h, self.num_blocks), block_input_sizes(w, self.num_blocks)))
    for index, size in enumerate(sizes):
      if size[0] % self.partition_size or size[1] % self.partition_size:
        # torchvision refuses the same sizes when the model is built (MaxVit's input_size).
        raise ValueError(f'Input size {size} of block {index} is not divisible by partition size '
                         f'{self.partition_size} (block input sizes {sizes} for {h}x{w} images)')
    x = self.stem_1(self.stem_0(x_bhwc, bn_train, mask_b), bn_train, mask_b)
    for block in self.blocks:
      x = block(x, train, bn_train, mask_b)
    return jnp.mean(_at_least_f32(x), axis=(1, 2))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """classifier[2:]: LayerNorm, Linear, Tanh, Linear (no dropout there)."""
    del train
    return _at_least_f32(self.classifier_5(jnp.tanh(self.classifier_3(self.classifier_2(features_bd)))))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits. `train` turns on stochastic depth and dropout and (unless `bn_train` says otherwise)
    train-mode BatchNorm."""
    return self.from_features(self.features(x_bhwc, train, mask_b, bn_train), train)


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> MaxVit:
  """MaxVit for `arch` (one of ARCHS) with a `num_classes`-way `classifier_5`."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return MaxVit(arch=arch, num_classes=num_classes, dtype=dtype)


def stage_of(module_name: str) -> Optional[str]:
  """stem_0 / stem_1 -> 'stem', blocks_2 -> 'blocks.2', classifier_2 / classifier_3 -> 'classifier',
  classifier_5 -> 'head'; None for another family's name."""
  if module_name in ('stem_0', 'stem_1'):
    return 'stem'
  if module_name.startswith('blocks_') and module_name[7:].isdigit():
    return f'blocks.{module_name[7:]}'
  if module_name in CLASSIFIER:
    return 'classifier'
  if module_name == HEAD_NAME:
    return HEAD
  return None


def _ln_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f'{torch_prefix}.weight', 'params', flax_path + ('scale',), 'copy'),
          Entry(f'{torch_prefix}.bias', 'params', flax_path + ('bias',), 'copy')]


def _dense_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f'{torch_prefix}.weight', 'params', flax_path + ('kernel',), 'linear_w'),
          Entry(f'{torch_prefix}.bias', 'params', flax_path + ('bias',), 'copy')]


def _attention_entries(t: str, f: tuple[str, ...]) -> list[Entry]:
  """One PartitionAttentionLayer, torch prefix `t`, Flax path `f`."""
  attn = f + ('attn_layer_1',)
  return (_ln_entries(f'{t}.attn_layer.0', f + ('attn_layer_0',))
          + [Entry(f'{t}.attn_layer.1.relative_position_bias_table', 'params',
                   attn + ('relative_position_bias_table',), 'copy'),
             Entry(f'{t}.attn_layer.1.relative_position_index', 'batch_stats', attn + ('relative_position_index',),
                   'copy')]
          + _dense_entries(f'{t}.attn_layer.1.to_qkv', attn + ('to_qkv',))
          + _dense_entries(f'{t}.attn_layer.1.merge', attn + ('merge',))
          + _ln_entries(f'{t}.mlp_layer.0', f + ('mlp_layer_0',))
          + _dense_entries(f'{t}.mlp_layer.1', f + ('mlp_layer_1',))
          + _dense_entries(f'{t}.mlp_layer.3', f + ('mlp_layer_3',)))


def spec_name_table(spec: MaxViTSpec, include_head: bool = True) -> list[Entry]:
  """Every tensor of a torchvision MaxVit built with `spec`, in its state dict's order."""
  table = conv_entries('stem.0.0', ('stem_0', 'conv')) + bn_entries('stem.0.1', ('stem_0', 'bn'))
  table += conv_entries('stem.1.0', ('stem_1', 'conv'), bias=True)
  in_channels = spec.stem_channels
  for b, (channels, num_layers) in enumerate(zip(spec.block_channels, spec.block_layers)):
    for index in range(num_layers):
      t, f = f'blocks.{b}.layers.{index}.layers', (f'blocks_{b}', f'layers_{index}')
      mb_t, mb_f = f'{t}.MBconv', f + ('MBconv',)
      stride = 2 if index == 0 else 1
      if stride != 1 or in_channels != channels:
        # proj is [AvgPool2d, Conv2d] with stride 2, [Conv2d] otherwise.
        table += conv_entries(f'{mb_t}.proj.{1 if stride == 2 else 0}', mb_f + ('proj',), bias=True)
      table += bn_entries(f'{mb_t}.layers.pre_norm', mb_f + ('pre_norm',))
      for conv in ('conv_a', 'conv_b'):
        table += conv_entries(f'{mb_t}.layers.{conv}.0', mb_f + (conv, 'conv'))
        table += bn_entries(f'{mb_t}.layers.{conv}.1', mb_f + (conv, 'bn'))
      for fc in ('fc1', 'fc2'):
        table += conv_entries(f'{mb_t}.layers.squeeze_excitation.{fc}', mb_f + ('squeeze_excitation', fc),
                              bias=True)
      table += conv_entries(f'{mb_t}.layers.conv_c', mb_f + ('conv_c',), bias=True)
      for partition_type in ('window', 'grid'):
        table += _attention_entries(f'{t}.{partition_type}_attention', f + (f'{partition_type}_attention',))
      in_channels = channels
  table += _ln_entries('classifier.2', ('classifier_2',)) + linear_entries('classifier.3', 'classifier_3')
  if include_head:
    table.append(Entry('classifier.5.weight', 'params', (HEAD_NAME, 'kernel'), 'linear_w'))   # no bias
  return table


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's `arch`, in its state dict's order, with its place in Flax."""
  return spec_name_table(ARCHS[arch], include_head)


FAMILY = Family(
    name='maxvit',
    archs={'maxvit_t': 'maxvit_t-bc5ab103.pth'},
    create=create_model,
    stages=('stem', 'blocks.0', 'blocks.1', 'blocks.2', 'blocks.3', 'classifier'),
    head=HEAD_NAME, head_torch='classifier.5', head_stages=('classifier', HEAD),
    stage_of=stage_of,
    num_features=lambda arch: ARCHS[arch].block_channels[-1],
    features_have_batch_norm=lambda arch: True,
    features_are_random=lambda arch: True,   # stochastic depth in train mode
    name_table=torch_name_table,
    # Every block's map must divide by the partition size (7): 224 px is the smallest such input.
    init_size=lambda arch: 224,
)
