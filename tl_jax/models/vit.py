"""torchvision Vision Transformers (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14) in Flax, NHWC.

The model is torchvision's `VisionTransformer`: a strided conv cuts the image into patches, a class
token is prepended, a learned position embedding added, and pre-norm encoder blocks (torch's
nn.MultiheadAttention and a GELU MLP) run before a final LayerNorm; the class token's output is the
feature vector and `heads.head` the classifier. Top-level names are torchvision's paths with '.' ->
'_' (`encoder_layers_encoder_layer_3` is `encoder.layers.encoder_layer_3`); the attention keeps
torch's packed `in_proj_weight` (3D, D) as it is, so the name table copies it unchanged.

The position embedding has one row per patch of the arch's native image size (518 px for vit_h_14,
whose only weights are SWAG's; 224 px for the others), so, as in torchvision, only that size runs.
`FAMILY` registers the family (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.family import HEAD, Entry, Family, check_create_args, conv_entries, linear_entries
from tl_jax.models.resnet import torch_linear_init

LAYER_NORM_EPS = 1e-6   # torchvision's partial(nn.LayerNorm, eps=1e-6)


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """The hyper-parameters torchvision's `VisionTransformer` takes (its `conv_stem_configs` and
  `representation_size` are not used by any of its named archs)."""
  image_size: int
  patch_size: int
  num_layers: int
  num_heads: int
  hidden_dim: int
  mlp_dim: int

  @property
  def seq_length(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1   # patches and the class token


ARCHS: dict[str, ViTSpec] = {
    'vit_b_16': ViTSpec(224, 16, 12, 12, 768, 3072),
    'vit_b_32': ViTSpec(224, 32, 12, 12, 768, 3072),
    'vit_l_16': ViTSpec(224, 16, 24, 16, 1024, 4096),
    'vit_l_32': ViTSpec(224, 32, 24, 16, 1024, 4096),
    # torchvision builds vit_h_14 at 224 without weights, but its DEFAULT (SWAG E2E) weights at 518.
    'vit_h_14': ViTSpec(518, 14, 32, 16, 1280, 5120),
}

STEM = 'conv_proj'
EMBEDDINGS = ('class_token', 'encoder_pos_embedding')   # top-level params, staged with the stem
LAYER_PREFIX = 'encoder_layers_encoder_layer_'
FINAL_NORM = 'encoder_ln'
HEAD_NAME = 'heads_head'


def layer_stage(index: int) -> str:
  return f'encoder.layers.encoder_layer_{index}'


def arch_stages(arch: str) -> tuple[str, ...]:
  """The patch embedding, each encoder layer (12, 24 or 32 of them) and the final LayerNorm."""
  spec = ARCHS[arch]
  return (STEM,) + tuple(layer_stage(i) for i in range(spec.num_layers)) + ('encoder.ln',)


def _xavier_uniform_torch_layout(key, shape, dtype=jnp.float32):
  """xavier_uniform_ of a torch (out, in) weight, as nn.MultiheadAttention draws in_proj_weight."""
  fan_out, fan_in = shape
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _layer_norm(name: Optional[str] = None) -> nn.LayerNorm:
  # Variance as torch computes it, mean((x - mean)^2); Flax's default E[x^2] - mean^2 loses digits.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name=name)


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class MultiheadSelfAttention(nn.Module):
  """torch's nn.MultiheadAttention(D, H, batch_first=True) called as attn(x, x, x).

  `in_proj_weight` (3D, D) and `in_proj_bias` (3D,) are torch's tensors unchanged: rows 0..D-1 make
  q, D..2D-1 k, 2D..3D-1 v, and head h owns features h*D/H .. (h+1)*D/H - 1 of each; the scores are
  q k^T / sqrt(D/H) and the dropout falls on the softmax weights, as in torch.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x_bld: jax.Array, train: bool = False) -> jax.Array:
    b, length, dim = x_bld.shape
    head_dim = dim // self.num_heads
    in_proj_weight = self.param('in_proj_weight', _xavier_uniform_torch_layout, (3 * dim, dim))
    in_proj_bias = self.param('in_proj_bias', nn.initializers.zeros, (3 * dim,))
    dtype = self.dtype or jnp.result_type(x_bld, in_proj_weight)
    qkv_ble = (jnp.einsum('bld,ed->ble', x_bld.astype(dtype), in_proj_weight.astype(dtype))
               + in_proj_bias.astype(dtype))
    q_blhk, k_blhk, v_blhk = (t.reshape(b, length, self.num_heads, head_dim)
                              for t in jnp.split(qkv_ble, 3, axis=-1))
    scores_bhlm = jnp.einsum('blhk,bmhk->bhlm', q_blhk * (1.0 / math.sqrt(head_dim)), k_blhk)
    weights_bhlm = jax.nn.softmax(_at_least_f32(scores_bhlm), axis=-1).astype(dtype)
    weights_bhlm = nn.Dropout(self.dropout_rate)(weights_bhlm, deterministic=not train)
    out_blhk = jnp.einsum('bhlm,bmhk->blhk', weights_bhlm, v_blhk)
    # torch's out_proj: NonDynamicallyQuantizableLinear's init, its bias zeroed by MultiheadAttention.
    out_proj = nn.Dense(dim, kernel_init=torch_linear_init(dim), bias_init=nn.initializers.zeros, dtype=self.dtype,
                        name='out_proj')
    return out_proj(out_blhk.reshape(b, length, dim))


class EncoderBlock(nn.Module):
  """torchvision's EncoderBlock: x + drop(attn(ln_1(x))), then + mlp(ln_2(.)) (pre-norm)."""
  features: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = None

  def setup(self):
    self.ln_1 = _layer_norm()
    self.self_attention = MultiheadSelfAttention(self.num_heads, self.attention_dropout_rate, self.dtype)
    self.ln_2 = _layer_norm()
    # MLPBlock's init: xavier_uniform_ weights, N(0, 1e-6) biases.
    self.mlp_0 = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform(),
                          bias_init=nn.initializers.normal(1e-6), dtype=self.dtype)
    self.mlp_3 = nn.Dense(self.features, kernel_init=nn.initializers.xavier_uniform(),
                          bias_init=nn.initializers.normal(1e-6), dtype=self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, input_bld: jax.Array, train: bool = False) -> jax.Array:
    x = self.dropout(self.self_attention(self.ln_1(input_bld), train), deterministic=not train)
    x = _at_least_f32(x) + input_bld
    # MLP (torchvision.ops.MLP): Linear, GELU, Dropout, Linear, Dropout.
    y = self.dropout(nn.gelu(self.mlp_0(self.ln_2(x)), approximate=False), deterministic=not train)
    return x + _at_least_f32(self.dropout(self.mlp_3(y), deterministic=not train))


class VisionTransformer(nn.Module):
  """torchvision VisionTransformer: `features` is the class token after `encoder.ln` (B, D),
  `from_features` is `heads.head`.

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `heads_head`.
    dtype: compute dtype of the convolution and matmuls (e.g. jnp.bfloat16); params, LayerNorm
      statistics, softmax, the residual stream and the logits stay float32 (None: the inputs').
    dropout_rate: torchvision's `dropout` (after the embedding, the attention and in the MLP), 0.0.
    attention_dropout_rate: torchvision's `attention_dropout` (on the softmax weights), 0.0.
    spec: hyper-parameters in place of ARCHS[arch] (a smaller model of the same layers).
  """
  arch: str = 'vit_b_16'
  num_classes: int = 1000
  dtype: Any = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  spec: Optional[ViTSpec] = None

  def setup(self):
    spec = self.spec or ARCHS[self.arch]
    if spec.image_size % spec.patch_size:
      raise ValueError(f'image size {spec.image_size} is not a multiple of the patch size {spec.patch_size}')
    p, dim = spec.patch_size, spec.hidden_dim
    # torch: trunc_normal_(std=sqrt(1 / fan_in)) truncated at +-2 (absolute, about 55 std): a normal.
    self.conv_proj = nn.Conv(dim, (p, p), strides=(p, p), padding=((0, 0), (0, 0)),
                             kernel_init=nn.initializers.normal(math.sqrt(1.0 / (3 * p * p))),
                             bias_init=nn.initializers.zeros, dtype=self.dtype)
    # Torch's shapes (1, 1, D) and (1, N + 1, D), so the name table copies them unchanged.
    self.class_token = self.param('class_token', nn.initializers.zeros, (1, 1, dim))
    self.encoder_pos_embedding = self.param('encoder_pos_embedding', nn.initializers.normal(0.02),
                                            (1, spec.seq_length, dim))
    self.encoder_dropout = nn.Dropout(self.dropout_rate)
    self.layers = [EncoderBlock(dim, spec.num_heads, spec.mlp_dim, self.dropout_rate, self.attention_dropout_rate,
                                self.dtype, name=f'{LAYER_PREFIX}{i}') for i in range(spec.num_layers)]
    self.encoder_ln = _layer_norm()
    # Drawn as a fresh nn.Linear(D, K), the layer a new task puts in place of heads.head
    # (torchvision itself zeroes it).
    self.heads_head = nn.Dense(self.num_classes, kernel_init=torch_linear_init(dim),
                               bias_init=torch_linear_init(dim), dtype=self.dtype)
    self.image_size = spec.image_size

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised, the arch's native size) -> the class token's output (B, D)."""
    del mask_b   # no BatchNorm: every row is normalised on its own
    b, h, w, _ = x_bhwc.shape
    if (h, w) != (self.image_size, self.image_size):
      # torchvision asserts the same: the position embedding has one row per patch of that size.
      raise ValueError(f'{self.arch} takes {self.image_size}x{self.image_size} images, got {h}x{w}')
    x = self.conv_proj(x_bhwc)
    # Row-major patches, torch's reshape (n, D, n_h * n_w) then permute to (n, n_h * n_w, D).
    x_bld = _at_least_f32(x.reshape(b, -1, x.shape[-1]))
    token_b1d = jnp.broadcast_to(self.class_token, (b, 1, x_bld.shape[-1])).astype(x_bld.dtype)
    x_bld = jnp.concatenate([token_b1d, x_bld], axis=1) + self.encoder_pos_embedding
    x_bld = self.encoder_dropout(x_bld, deterministic=not train)
    for layer in self.layers:
      x_bld = layer(x_bld, train)
    return self.encoder_ln(x_bld)[:, 0]

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """heads.head on the class token's features (torchvision has no dropout there)."""
    del train
    return _at_least_f32(self.heads_head(features_bd))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits. `train` turns dropout on (no BatchNorm, so `bn_train` changes nothing)."""
    del bn_train
    return self.from_features(self.features(x_bhwc, train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None,
                 image_size: Optional[int] = None) -> VisionTransformer:
  """VisionTransformer for `arch` (one of ARCHS) with a `num_classes`-way head, for `image_size`
  inputs (None: the arch's native size; the SWAG weights fix 384 or 518, as torchvision's
  builder sets `image_size` from the weights)."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  spec = None if image_size is None else dataclasses.replace(ARCHS[arch], image_size=image_size)
  return VisionTransformer(arch=arch, num_classes=num_classes, dtype=dtype, spec=spec)


def stage_of(module_name: str) -> Optional[str]:
  """conv_proj / class_token / encoder_pos_embedding -> 'conv_proj' (the patch embedding),
  encoder_layers_encoder_layer_3 -> 'encoder.layers.encoder_layer_3', encoder_ln -> 'encoder.ln',
  heads_head -> 'head'; None for another family's name."""
  if module_name == STEM or module_name in EMBEDDINGS:
    return STEM
  if module_name.startswith(LAYER_PREFIX) and module_name[len(LAYER_PREFIX):].isdigit():
    return layer_stage(int(module_name[len(LAYER_PREFIX):]))
  if module_name == FINAL_NORM:
    return 'encoder.ln'
  if module_name == HEAD_NAME:
    return HEAD
  return None


def _ln_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f'{torch_prefix}.weight', 'params', flax_path + ('scale',), 'copy'),
          Entry(f'{torch_prefix}.bias', 'params', flax_path + ('bias',), 'copy')]


def spec_name_table(spec: ViTSpec, include_head: bool = True) -> list[Entry]:
  """Every tensor of a torchvision VisionTransformer with `spec`'s depth, in its state dict's order."""
  table = [Entry('class_token', 'params', ('class_token',), 'copy')]
  table += conv_entries('conv_proj', ('conv_proj',), bias=True)
  table.append(Entry('encoder.pos_embedding', 'params', ('encoder_pos_embedding',), 'copy'))
  for i in range(spec.num_layers):
    t, f = f'encoder.layers.encoder_layer_{i}', f'{LAYER_PREFIX}{i}'
    table += _ln_entries(f'{t}.ln_1', (f, 'ln_1'))
    attn_t, attn_f = f'{t}.self_attention', (f, 'self_attention')
    table += [Entry(f'{attn_t}.in_proj_weight', 'params', attn_f + ('in_proj_weight',), 'copy'),
              Entry(f'{attn_t}.in_proj_bias', 'params', attn_f + ('in_proj_bias',), 'copy'),
              Entry(f'{attn_t}.out_proj.weight', 'params', attn_f + ('out_proj', 'kernel'), 'linear_w'),
              Entry(f'{attn_t}.out_proj.bias', 'params', attn_f + ('out_proj', 'bias'), 'copy')]
    table += _ln_entries(f'{t}.ln_2', (f, 'ln_2'))
    for index in (0, 3):   # mlp: 0 Linear, 1 GELU, 2 Dropout, 3 Linear, 4 Dropout
      table += [Entry(f'{t}.mlp.{index}.weight', 'params', (f, f'mlp_{index}', 'kernel'), 'linear_w'),
                Entry(f'{t}.mlp.{index}.bias', 'params', (f, f'mlp_{index}', 'bias'), 'copy')]
  table += _ln_entries('encoder.ln', (FINAL_NORM,))
  if include_head:
    table += linear_entries('heads.head', HEAD_NAME)
  return table


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's `arch`, in its state dict's order, with its place in Flax."""
  return spec_name_table(ARCHS[arch], include_head)


FAMILY = Family(
    name='vit',
    archs={'vit_b_16': 'vit_b_16-c867db91.pth', 'vit_b_32': 'vit_b_32-d86f8d99.pth',
           'vit_l_16': 'vit_l_16-852ce7e3.pth', 'vit_l_32': 'vit_l_32-c7638314.pth',
           'vit_h_14': 'vit_h_14_swag-80465313.pth'},   # vit_h_14 has no IMAGENET1K_V1: its DEFAULT
    create=create_model,
    stages=arch_stages,
    head=HEAD_NAME, head_torch='heads.head', head_stages=(HEAD,),
    stage_of=stage_of,
    num_features=lambda arch: ARCHS[arch].hidden_dim,
    features_have_batch_norm=lambda arch: False,
    name_table=torch_name_table,
    init_size=lambda arch: ARCHS[arch].image_size,
    sized_by_input=True,
)
