"""torchvision Swin Transformers, V1 (swin_t/s/b) and V2 (swin_v2_t/s/b), in Flax, NHWC.

Top-level modules are torchvision's children with '.' -> '_': `features_0` (patch embedding),
`features_1/3/5/7` (stages of Swin blocks, each block named by its index as in torch's
Sequential), `features_2/4/6` (patch merging), `norm` and `head`. Each is a stage for freezing,
named as torch names it ('features.3', 'norm', 'head').

Two buffers of torch's state dict, `relative_position_index` (V1 and V2) and
`relative_coords_table` (V2), live in the 'batch_stats' collection, the variables that are
loaded and saved but never trained; the attention reads them from there as torch reads its
buffers. `FAMILY` registers the family (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.models.family import HEAD as HEAD_STAGE, Entry, Family, check_create_args
from tl_jax.models.resnet import torch_linear_init


@dataclasses.dataclass(frozen=True)
class SwinSpec:
  """torchvision's SwinTransformer(...) arguments; `v2` picks SwinTransformerBlockV2 and PatchMergingV2."""
  patch_size: tuple[int, int]
  embed_dim: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: tuple[int, int]
  stochastic_depth_prob: float
  v2: bool = False
  mlp_ratio: float = 4.0

  @property
  def num_features(self) -> int:
    return self.embed_dim * 2 ** (len(self.depths) - 1)


ARCHS: dict[str, SwinSpec] = {
    'swin_t': SwinSpec((4, 4), 96, (2, 2, 6, 2), (3, 6, 12, 24), (7, 7), 0.2),
    'swin_s': SwinSpec((4, 4), 96, (2, 2, 18, 2), (3, 6, 12, 24), (7, 7), 0.3),
    'swin_b': SwinSpec((4, 4), 128, (2, 2, 18, 2), (4, 8, 16, 32), (7, 7), 0.5),
    'swin_v2_t': SwinSpec((4, 4), 96, (2, 2, 6, 2), (3, 6, 12, 24), (8, 8), 0.2, v2=True),
    'swin_v2_s': SwinSpec((4, 4), 96, (2, 2, 18, 2), (3, 6, 12, 24), (8, 8), 0.3, v2=True),
    'swin_v2_b': SwinSpec((4, 4), 128, (2, 2, 18, 2), (4, 8, 16, 32), (8, 8), 0.5, v2=True),
}

# Every arch has 4 stages: patch embedding, then blocks and patch merging alternating.
STAGES = tuple(f'features.{i}' for i in range(8)) + ('norm',)
HEAD = 'head'
LN_EPS = 1e-5           # torchvision: partial(nn.LayerNorm, eps=1e-5)
CPB_HIDDEN = 512        # V2's cpb_mlp: Linear(2, 512), ReLU, Linear(512, heads)
MASK_VALUE = -100.0     # torch's shifted-window mask adds -100, not -inf
MAX_LOGIT_SCALE = math.log(100.0)

# torchvision re-initialises every nn.Linear with trunc_normal_(std=0.02), truncated at +-2 (absolute,
# i.e. 100 standard deviations): a plain normal. Biases are zero.
_linear_init = nn.initializers.normal(0.02)


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _layer_norm(name: Optional[str] = None) -> nn.LayerNorm:
  """torch's nn.LayerNorm(eps=1e-5): the variance as mean((x - mean)^2), not E[x^2] - mean^2."""
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


def _linear(features: int, dtype: Any, use_bias: bool = True, name: Optional[str] = None) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=_linear_init,
                  bias_init=nn.initializers.zeros, name=name)


def stochastic_depth(module: nn.Module, x: jax.Array, p: float, train: bool) -> jax.Array:
  """torchvision.ops.stochastic_depth(x, p, 'row'): each sample's branch kept with 1 - p, scaled by 1 / (1 - p)."""
  if not train or p == 0.0:
    return x
  survival = 1.0 - p
  keep = jax.random.bernoulli(module.make_rng('dropout'), survival, (x.shape[0],) + (1,) * (x.ndim - 1))
  noise = keep.astype(x.dtype)
  if survival > 0.0:
    noise = noise / survival
  return x * noise


def relative_position_index(window_size: tuple[int, int]) -> np.ndarray:
  """(N*N,) index into the (2Wh-1)(2Ww-1) relative offsets of every token pair of a window (torch's buffer)."""
  wh, ww = window_size
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij')).reshape(2, -1)
  relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  relative[:, :, 0] += wh - 1
  relative[:, :, 1] += ww - 1
  relative[:, :, 0] *= 2 * ww - 1
  return relative.sum(-1).reshape(-1)


def relative_coords_table(window_size: tuple[int, int]) -> np.ndarray:
  """V2's (1, 2Wh-1, 2Ww-1, 2) log-spaced relative offsets, in torch's float32 steps."""
  wh, ww = window_size
  rh = np.arange(-(wh - 1), wh, dtype=np.float32)
  rw = np.arange(-(ww - 1), ww, dtype=np.float32)
  table = np.stack(np.meshgrid(rh, rw, indexing='ij')).transpose(1, 2, 0)[None].copy()
  table[..., 0] /= np.float32(wh - 1)
  table[..., 1] /= np.float32(ww - 1)
  table *= np.float32(8)
  return (np.sign(table) * np.log2(np.abs(table) + np.float32(1)) / np.float32(3)).astype(np.float32)


def shifted_window_mask(pad_hw: tuple[int, int], window_size: tuple[int, int],
                        shift_size: tuple[int, int]) -> np.ndarray:
  """(num_windows, N, N) additive mask: -100 between tokens that the cyclic shift brought from apart.

  The regions are torch's slices verbatim, -0 included: an axis that is not shifted gets a last
  slice that covers it whole, so only the other axis splits regions."""
  (ph, pw), (wh, ww), (sh, sw) = pad_hw, window_size, shift_size
  regions = np.zeros((ph, pw), np.float32)
  count = 0
  for h0, h1 in ((0, -wh), (-wh, -sh), (-sh, None)):
    for w0, w1 in ((0, -ww), (-ww, -sw), (-sw, None)):
      regions[h0:h1, w0:w1] = count
      count += 1
  regions = regions.reshape(ph // wh, wh, pw // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
  diff = regions[:, None, :] - regions[:, :, None]
  return np.where(diff != 0, np.float32(MASK_VALUE), np.float32(0.0))


class QKVLinear(nn.Module):
  """torch's attn.qkv nn.Linear; V2's attention zeroes the key third of its bias at every call."""
  features: int
  zero_key_bias: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _linear_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    if self.zero_key_bias:
      third = self.features // 3
      bias = jnp.asarray(bias).at[third:2 * third].set(0.0)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.matmul(x, kernel) + bias


class ShiftedWindowAttention(nn.Module):
  """torchvision's shifted_window_attention with V1's bias table or V2's cosine attention and cpb_mlp."""
  dim: int
  num_heads: int
  window_size: tuple[int, int]
  shift_size: tuple[int, int]
  v2: bool = False
  attention_dropout: float = 0.0
  dropout: float = 0.0
  dtype: Any = None

  def setup(self):
    wh, ww = self.window_size
    self.qkv = QKVLinear(3 * self.dim, zero_key_bias=self.v2, dtype=self.dtype)
    self.proj = _linear(self.dim, self.dtype)
    self.relative_position_index = self.variable(
        'batch_stats', 'relative_position_index', lambda: jnp.asarray(relative_position_index(self.window_size)))
    if self.v2:
      self.logit_scale = self.param('logit_scale', lambda key, shape: jnp.full(shape, math.log(10.0), jnp.float32),
                                    (self.num_heads, 1, 1))
      self.cpb_mlp_0 = _linear(CPB_HIDDEN, self.dtype)
      self.cpb_mlp_2 = _linear(self.num_heads, self.dtype, use_bias=False)
      self.relative_coords_table = self.variable(
          'batch_stats', 'relative_coords_table', lambda: jnp.asarray(relative_coords_table(self.window_size)))
    else:
      self.relative_position_bias_table = self.param(
          'relative_position_bias_table', _linear_init, ((2 * wh - 1) * (2 * ww - 1), self.num_heads), jnp.float32)
    self.attn_drop = nn.Dropout(self.attention_dropout)
    self.proj_drop = nn.Dropout(self.dropout)

  def relative_position_bias(self) -> jax.Array:
    """(1, heads, N, N) bias: V1's table, or V2's 16 * sigmoid(cpb_mlp(coords table)), gathered by the index."""
    n = self.window_size[0] * self.window_size[1]
    if self.v2:
      hidden = nn.relu(self.cpb_mlp_0(self.relative_coords_table.value))
      table = _at_least_f32(self.cpb_mlp_2(hidden)).reshape(-1, self.num_heads)
    else:
      table = self.relative_position_bias_table
    bias = table[self.relative_position_index.value].reshape(n, n, self.num_heads)
    bias = jnp.transpose(bias, (2, 0, 1))[None]
    return 16.0 * jax.nn.sigmoid(bias) if self.v2 else bias

  def __call__(self, x_bhwc: jax.Array, train: bool = False) -> jax.Array:
    b, h, w, c = x_bhwc.shape
    (wh, ww), (sh, sw) = self.window_size, self.shift_size
    # Zeros at the bottom and right up to whole windows; they take part in the attention as in torch.
    pad_b, pad_r = (wh - h % wh) % wh, (ww - w % ww) % ww
    x = jnp.pad(x_bhwc, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    ph, pw = h + pad_b, w + pad_r
    # A window as large as the (padded) map sees all of it: torch does not shift that axis.
    sh, sw = (0 if wh >= ph else sh), (0 if ww >= pw else sw)
    shifted = sh + sw > 0
    if shifted:
      x = jnp.roll(x, (-sh, -sw), axis=(1, 2))
    nh, nw = ph // wh, pw // ww
    num_windows, n, head_dim = nh * nw, wh * ww, c // self.num_heads
    x = x.reshape(b, nh, wh, nw, ww, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * num_windows, n, c)

    qkv = self.qkv(x).reshape(b * num_windows, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if self.v2:
      # Scaled cosine attention: F.normalize (eps 1e-12) and exp(logit_scale) clamped at 100.
      q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
      k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
      attn = jnp.matmul(q, jnp.swapaxes(k, -2, -1))
      # torch.clamp(max=...) passes the gradient up to and including the bound; jnp.minimum would halve it there.
      scale = jnp.where(self.logit_scale > MAX_LOGIT_SCALE, MAX_LOGIT_SCALE, self.logit_scale)
      attn = attn * jnp.exp(scale)
    else:
      attn = jnp.matmul(q * head_dim ** -0.5, jnp.swapaxes(k, -2, -1))
    attn = _at_least_f32(attn) + self.relative_position_bias()
    if shifted:
      mask = jnp.asarray(shifted_window_mask((ph, pw), self.window_size, (sh, sw)))
      attn = attn.reshape(b, num_windows, self.num_heads, n, n) + mask[None, :, None]
      attn = attn.reshape(b * num_windows, self.num_heads, n, n)
    attn = jax.nn.softmax(attn, axis=-1)
    attn = self.attn_drop(attn, deterministic=not train)

    x = jnp.matmul(attn.astype(v.dtype), v).transpose(0, 2, 1, 3).reshape(b * num_windows, n, c)
    x = self.proj_drop(self.proj(x), deterministic=not train)
    x = x.reshape(b, nh, nw, wh, ww, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if shifted:
      x = jnp.roll(x, (sh, sw), axis=(1, 2))
    return x[:, :h, :w]


class SwinBlock(nn.Module):
  """SwinTransformerBlock (V1: pre-norm residuals) or SwinTransformerBlockV2 (post-norm residuals)."""
  dim: int
  num_heads: int
  window_size: tuple[int, int]
  shift_size: tuple[int, int]
  v2: bool = False
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  attention_dropout: float = 0.0
  stochastic_depth_prob: float = 0.0
  dtype: Any = None

  def setup(self):
    self.norm1 = _layer_norm()
    self.attn = ShiftedWindowAttention(self.dim, self.num_heads, self.window_size, self.shift_size, self.v2,
                                       self.attention_dropout, self.dropout, self.dtype)
    self.norm2 = _layer_norm()
    # torchvision's MLP: Linear, GELU, Dropout, Linear, Dropout (indices 0..4).
    self.mlp_0 = _linear(int(self.dim * self.mlp_ratio), self.dtype)
    self.mlp_3 = _linear(self.dim, self.dtype)
    self.mlp_drop = nn.Dropout(self.dropout)

  def mlp(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.mlp_drop(nn.gelu(self.mlp_0(x), approximate=False), deterministic=not train)
    return self.mlp_drop(self.mlp_3(x), deterministic=not train)

  def __call__(self, x_bhwc: jax.Array, train: bool = False) -> jax.Array:
    p = self.stochastic_depth_prob
    x = x_bhwc
    if self.v2:
      x = x + stochastic_depth(self, self.norm1(self.attn(x, train)), p, train)
      return x + stochastic_depth(self, self.norm2(self.mlp(x, train)), p, train)
    x = x + stochastic_depth(self, self.attn(self.norm1(x), train), p, train)
    return x + stochastic_depth(self, self.mlp(self.norm2(x), train), p, train)


class PatchEmbedding(nn.Module):
  """torch's features[0]: Conv2d(3, C, patch, stride=patch), Permute to NHWC, LayerNorm (indices 0..2)."""
  embed_dim: int
  patch_size: tuple[int, int]
  dtype: Any = None

  def setup(self):
    # nn.Conv2d's default init: U(+-1/sqrt(fan_in)) for weight and bias.
    fan_in = 3 * self.patch_size[0] * self.patch_size[1]
    self.conv = nn.Conv(self.embed_dim, self.patch_size, strides=self.patch_size, padding='VALID',
                        kernel_init=torch_linear_init(fan_in), bias_init=torch_linear_init(fan_in),
                        dtype=self.dtype, name='0')
    self.norm = _layer_norm(name='2')

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    # VALID drops the rows and columns past the last whole patch, as torch's unpadded conv does.
    return self.norm(self.conv(x_bhwc))


class PatchMerging(nn.Module):
  """PatchMerging (V1: norm over 4C, then reduction) or PatchMergingV2 (reduction, then norm over 2C)."""
  dim: int
  v2: bool = False
  dtype: Any = None

  def setup(self):
    self.reduction = _linear(2 * self.dim, self.dtype, use_bias=False)
    self.norm = _layer_norm()

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    _, h, w, _ = x_bhwc.shape
    # An odd map gets a zero row / column at the bottom / right first (torch's _patch_merging_pad).
    x = jnp.pad(x_bhwc, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    if self.v2:
      return self.norm(self.reduction(x))
    return self.reduction(self.norm(x))


class SwinStage(nn.Module):
  """One of torch's features[1, 3, 5, 7]: a Sequential of blocks, shifted every second one by half a window."""
  dim: int
  depth: int
  num_heads: int
  window_size: tuple[int, int]
  stochastic_depth_probs: tuple[float, ...]
  v2: bool = False
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Any = None

  def setup(self):
    self.blocks = [
        SwinBlock(self.dim, self.num_heads, self.window_size,
                  (0, 0) if i % 2 == 0 else tuple(w // 2 for w in self.window_size), self.v2, self.mlp_ratio,
                  self.dropout, self.attention_dropout, self.stochastic_depth_probs[i], self.dtype, name=str(i))
        for i in range(self.depth)]

  def __call__(self, x_bhwc: jax.Array, train: bool = False) -> jax.Array:
    for block in self.blocks:
      x_bhwc = block(x_bhwc, train)
    return x_bhwc


class SwinTransformer(nn.Module):
  """torchvision SwinTransformer: `features` is features + norm + average pool (B, num_features), then `head`.

  Attributes:
    arch: one of ARCHS; `spec`, when given, replaces its hyper-parameters (any SwinTransformer(...)).
    num_classes: outputs of `head`.
    dtype: compute dtype of convs and matmuls (e.g. jnp.bfloat16); params, LayerNorm and logits stay
      float32. None: the dtype of the inputs and params.
    stochastic_depth_prob: the last block's drop rate (blocks rise linearly from 0); None: the arch's
      torchvision value. Active only with `train=True`, drawing from the 'dropout' rng.
    dropout, attention_dropout: torchvision's SwinTransformer(dropout=..., attention_dropout=...), 0 there.
  """
  arch: str = 'swin_t'
  num_classes: int = 1000
  dtype: Any = None
  stochastic_depth_prob: Optional[float] = None
  dropout: float = 0.0
  attention_dropout: float = 0.0
  spec: Optional[SwinSpec] = None

  @property
  def config(self) -> SwinSpec:
    return self.spec if self.spec is not None else ARCHS[self.arch]

  def setup(self):
    spec = self.config
    p = spec.stochastic_depth_prob if self.stochastic_depth_prob is None else self.stochastic_depth_prob
    total = sum(spec.depths)
    # torchvision: block k of all `total` gets p * k / (total - 1).
    probs = [p * float(k) / (total - 1) for k in range(total)]
    self.features_0 = PatchEmbedding(spec.embed_dim, spec.patch_size, self.dtype)
    first = 0
    for s, (depth, heads) in enumerate(zip(spec.depths, spec.num_heads)):
      dim = spec.embed_dim * 2 ** s
      setattr(self, f'features_{2 * s + 1}',
              SwinStage(dim, depth, heads, spec.window_size, tuple(probs[first:first + depth]), spec.v2,
                        spec.mlp_ratio, self.dropout, self.attention_dropout, self.dtype))
      first += depth
      if s < len(spec.depths) - 1:
        setattr(self, f'features_{2 * s + 2}', PatchMerging(dim, spec.v2, self.dtype))
    self.norm = _layer_norm()
    # Drawn as a fresh nn.Linear(num_features, K), the layer the material puts in place of `head`.
    self.head = nn.Dense(self.num_classes, kernel_init=torch_linear_init(spec.num_features),
                         bias_init=torch_linear_init(spec.num_features), dtype=self.dtype)

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> (B, num_features); `train` turns on stochastic depth and dropout."""
    del mask_b   # no BatchNorm: every row is computed on its own
    spec = self.config
    x = self.features_0(x_bhwc)
    for s in range(len(spec.depths)):
      x = getattr(self, f'features_{2 * s + 1}')(x, train)
      if s < len(spec.depths) - 1:
        x = getattr(self, f'features_{2 * s + 2}')(x)
    return jnp.mean(_at_least_f32(self.norm(x)), axis=(1, 2))

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """`head` on the pooled features; float32 logits whatever the compute dtype."""
    del train   # no dropout after the pooling
    return _at_least_f32(self.head(features_bd))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits; `train` turns on stochastic depth (no BatchNorm here for `bn_train` to drive)."""
    del bn_train
    return self.from_features(self.features(x_bhwc, train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None,
                 fast_backward: Optional[bool] = None) -> SwinTransformer:
  """Swin for `arch` (one of ARCHS) with a `num_classes`-way `head`."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return SwinTransformer(arch=arch, num_classes=num_classes, dtype=dtype)


def stage_of(module_name: str) -> Optional[str]:
  """features_3 -> 'features.3', norm -> 'norm', head -> 'head'; None for another family's name."""
  if module_name == HEAD:
    return HEAD_STAGE
  if module_name == 'norm':
    return 'norm'
  index = module_name[len('features_'):]
  if module_name.startswith('features_') and index.isdigit():
    return f'features.{index}'
  return None


def _linear_entries(torch_prefix: str, path: tuple[str, ...], bias: bool = True) -> list[Entry]:
  entries = [Entry(f'{torch_prefix}.weight', 'params', path + ('kernel',), 'linear_w')]
  if bias:
    entries.append(Entry(f'{torch_prefix}.bias', 'params', path + ('bias',), 'copy'))
  return entries


def _norm_entries(torch_prefix: str, path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f'{torch_prefix}.weight', 'params', path + ('scale',), 'copy'),
          Entry(f'{torch_prefix}.bias', 'params', path + ('bias',), 'copy')]


def _block_entries(prefix: str, path: tuple[str, ...], v2: bool) -> list[Entry]:
  """One block, in torch's state-dict order."""
  attn, attn_path = f'{prefix}.attn', path + ('attn',)
  table = _norm_entries(f'{prefix}.norm1', path + ('norm1',))
  if v2:
    table += [Entry(f'{attn}.logit_scale', 'params', attn_path + ('logit_scale',), 'copy'),
              Entry(f'{attn}.relative_coords_table', 'batch_stats', attn_path + ('relative_coords_table',), 'copy')]
  else:
    table.append(Entry(f'{attn}.relative_position_bias_table', 'params',
                       attn_path + ('relative_position_bias_table',), 'copy'))
  table.append(Entry(f'{attn}.relative_position_index', 'batch_stats', attn_path + ('relative_position_index',),
                     'copy'))
  table += _linear_entries(f'{attn}.qkv', attn_path + ('qkv',)) + _linear_entries(f'{attn}.proj', attn_path + ('proj',))
  if v2:
    table += (_linear_entries(f'{attn}.cpb_mlp.0', attn_path + ('cpb_mlp_0',))
              + _linear_entries(f'{attn}.cpb_mlp.2', attn_path + ('cpb_mlp_2',), bias=False))
  table += _norm_entries(f'{prefix}.norm2', path + ('norm2',))
  return table + _linear_entries(f'{prefix}.mlp.0', path + ('mlp_0',)) + _linear_entries(f'{prefix}.mlp.3',
                                                                                        path + ('mlp_3',))


def spec_name_table(spec: SwinSpec, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's SwinTransformer with `spec`'s arguments, buffers included."""
  table = [Entry('features.0.0.weight', 'params', ('features_0', '0', 'kernel'), 'conv'),
           Entry('features.0.0.bias', 'params', ('features_0', '0', 'bias'), 'copy')]
  table += _norm_entries('features.0.2', ('features_0', '2'))
  for s, depth in enumerate(spec.depths):
    stage = 2 * s + 1
    for i in range(depth):
      table += _block_entries(f'features.{stage}.{i}', (f'features_{stage}', str(i)), spec.v2)
    if s < len(spec.depths) - 1:
      table += _linear_entries(f'features.{stage + 1}.reduction', (f'features_{stage + 1}', 'reduction'), bias=False)
      table += _norm_entries(f'features.{stage + 1}.norm', (f'features_{stage + 1}', 'norm'))
  table += _norm_entries('norm', ('norm',))
  if include_head:
    table += _linear_entries('head', (HEAD,))
  return table


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  return spec_name_table(ARCHS[arch], include_head)


FAMILY = Family(
    name='swin',
    archs={'swin_t': 'swin_t-704ceda3.pth', 'swin_s': 'swin_s-5e29d889.pth', 'swin_b': 'swin_b-68c6b09e.pth',
           'swin_v2_t': 'swin_v2_t-b137f0e2.pth', 'swin_v2_s': 'swin_v2_s-637d8ceb.pth',
           'swin_v2_b': 'swin_v2_b-781e5279.pth'},
    create=create_model,
    stages=STAGES,
    head=HEAD, head_torch='head', head_stages=(HEAD_STAGE,),
    stage_of=stage_of,
    num_features=lambda arch: ARCHS[arch].num_features,
    features_have_batch_norm=lambda arch: False,
    features_are_random=lambda arch: True,   # stochastic depth in train mode
    name_table=torch_name_table,
    init_size=lambda arch: 32,
)
