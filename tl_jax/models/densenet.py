"""torchvision DenseNet-121/161/169/201 in Flax, NHWC.

Top-level modules are torch's paths under `features` with '.' -> '_': `features_conv0` and
`features_norm0` (stage 'stem', with relu0 and pool0), `features_denseblock{1..4}` (stages
'denseblock1'..), `features_transition{1..3}` ('transition1'..), `features_norm5` ('norm5') and
`classifier` (the head).

The torch name table lists the names of torchvision's `model.state_dict()`
(`features.denseblock1.denselayer1.norm1.weight`). torchvision's ImageNet files predate them and
say `...denselayer1.norm.1.weight`; torchvision renames them when it loads one, and so does
`modern_state_dict_names` here. `FAMILY` registers the family (tl_jax.models.registry).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.family import HEAD, Entry, Family, bn_entries, check_create_args, conv_entries, linear_entries
from tl_jax.models.layers import BatchNorm, max_pool
from tl_jax.models.resnet import torch_linear_init


@dataclasses.dataclass(frozen=True)
class DenseNetSpec:
  growth_rate: int
  block_config: tuple[int, int, int, int]
  num_init_features: int
  bn_size: int = 4

  @property
  def num_features(self) -> int:
    """Channels of norm5: every block adds growth_rate per layer, every transition halves."""
    channels = self.num_init_features
    for b, num_layers in enumerate(self.block_config):
      channels += num_layers * self.growth_rate
      if b < len(self.block_config) - 1:
        channels //= 2
    return channels


ARCHS: dict[str, DenseNetSpec] = {
    'densenet121': DenseNetSpec(32, (6, 12, 24, 16), 64),
    'densenet161': DenseNetSpec(48, (6, 12, 36, 24), 96),
    'densenet169': DenseNetSpec(32, (6, 12, 32, 32), 64),
    'densenet201': DenseNetSpec(32, (6, 12, 48, 32), 64),
}

STAGES = ('stem', 'denseblock1', 'transition1', 'denseblock2', 'transition2', 'denseblock3', 'transition3',
          'denseblock4', 'norm5')
DROP_RATE = 0.0   # torchvision's default: no dropout after the dense layers

# torchvision's DenseNet init: kaiming_normal_ (fan_in, gain sqrt(2), not truncated) for every conv.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0, dtype: Any = None,
          name: Optional[str] = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, name=name)


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (to bn_size * growth) then BN-ReLU-3x3 conv (to growth) on all earlier features."""
  growth_rate: int
  bn_size: int
  drop_rate: float = DROP_RATE
  dtype: Any = None

  def setup(self):
    self.norm1 = BatchNorm()
    self.conv1 = _conv(self.bn_size * self.growth_rate, 1, dtype=self.dtype)
    self.norm2 = BatchNorm()
    self.conv2 = _conv(self.growth_rate, 3, padding=1, dtype=self.dtype)
    self.dropout = nn.Dropout(self.drop_rate)

  def __call__(self, x_bhwc: jax.Array, bn_train: bool, dropout_train: bool,
               mask_b: Optional[jax.Array] = None) -> jax.Array:
    """The `growth_rate` new channels computed from `x_bhwc`, the concatenation of the block so far."""
    x = self.conv1(nn.relu(self.norm1(x_bhwc, bn_train, mask_b)))
    x = self.conv2(nn.relu(self.norm2(x, bn_train, mask_b)))
    return self.dropout(x, deterministic=not dropout_train) if self.drop_rate > 0 else x


class DenseBlock(nn.Module):
  """`num_layers` DenseLayers (`denselayer1`..), each adding its channels after all earlier ones."""
  num_layers: int
  growth_rate: int
  bn_size: int
  drop_rate: float = DROP_RATE
  dtype: Any = None

  def setup(self):
    self.layers = [DenseLayer(self.growth_rate, self.bn_size, self.drop_rate, self.dtype, name=f'denselayer{i}')
                   for i in range(1, self.num_layers + 1)]

  def __call__(self, x_bhwc: jax.Array, bn_train: bool, dropout_train: bool,
               mask_b: Optional[jax.Array] = None) -> jax.Array:
    for layer in self.layers:
      # torch concatenates the list of all earlier outputs in order: the same channels as appending.
      x_bhwc = jnp.concatenate([x_bhwc, layer(x_bhwc, bn_train, dropout_train, mask_b)], axis=-1)
    return x_bhwc


class Transition(nn.Module):
  """BN-ReLU-1x1 conv (halving the channels), then AvgPool2d(2, 2)."""
  out_channels: int
  dtype: Any = None

  def setup(self):
    self.norm = BatchNorm()
    self.conv = _conv(self.out_channels, 1, dtype=self.dtype)

  def __call__(self, x_bhwc: jax.Array, bn_train: bool, mask_b: Optional[jax.Array] = None) -> jax.Array:
    x = self.conv(nn.relu(self.norm(x_bhwc, bn_train, mask_b)))
    # No padding, floor mode: an odd last row/column is dropped, as VALID does.
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """torchvision DenseNet-BC: `features` is everything up to the pooled vector, `from_features` the classifier.

  Attributes:
    arch: one of ARCHS.
    num_classes: outputs of `classifier`.
    dtype: compute dtype of convs and the classifier (None: that of inputs and params); params,
      BatchNorm statistics, features and logits stay at least float32.
    drop_rate: torchvision's `drop_rate`, dropout on each dense layer's new channels (0: none);
      active only with `train=True`, where it draws from the 'dropout' rng.
  """
  arch: str = 'densenet121'
  num_classes: int = 1000
  dtype: Any = None
  drop_rate: float = DROP_RATE

  def setup(self):
    spec = ARCHS[self.arch]
    self.features_conv0 = _conv(spec.num_init_features, 7, 2, 3, dtype=self.dtype)
    self.features_norm0 = BatchNorm()
    blocks, transitions = [], []
    channels = spec.num_init_features
    for b, num_layers in enumerate(spec.block_config, start=1):
      blocks.append(DenseBlock(num_layers, spec.growth_rate, spec.bn_size, self.drop_rate, self.dtype,
                               name=f'features_denseblock{b}'))
      channels += num_layers * spec.growth_rate
      if b < len(spec.block_config):
        channels //= 2
        transitions.append(Transition(channels, self.dtype, name=f'features_transition{b}'))
    self.blocks, self.transitions = blocks, transitions
    self.features_norm5 = BatchNorm()
    # Drawn as a fresh nn.Linear(C, K), the layer the material puts in place of `classifier`.
    self.classifier = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_linear_init(channels),
                               bias_init=torch_linear_init(channels))

  def _features(self, x_bhwc: jax.Array, bn_train: bool, dropout_train: bool,
                mask_b: Optional[jax.Array]) -> jax.Array:
    x = nn.relu(self.features_norm0(self.features_conv0(x_bhwc), bn_train, mask_b))
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for b, block in enumerate(self.blocks):
      x = block(x, bn_train, dropout_train, mask_b)
      if b < len(self.transitions):
        x = self.transitions[b](x, bn_train, mask_b)
    # DenseNet.forward: relu after norm5, then the global average pool.
    x = nn.relu(self.features_norm5(x, bn_train, mask_b))
    return jnp.mean(_at_least_f32(x), axis=(1, 2))

  def features(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Images (NHWC, normalised) -> (B, num_features): relu(norm5) averaged over H and W."""
    return self._features(x_bhwc, train, train, mask_b)

  def from_features(self, features_bd: jax.Array, train: bool = False) -> jax.Array:
    """`classifier` (DenseNet has no dropout before it)."""
    del train
    return _at_least_f32(self.classifier(features_bd))

  def __call__(self, x_bhwc: jax.Array, train: bool = False, mask_b: Optional[jax.Array] = None,
               bn_train: Optional[bool] = None) -> jax.Array:
    """Logits; `bn_train` (default `train`) drives BatchNorm, `train` the dense layers' dropout."""
    bn_train = train if bn_train is None else bn_train
    return self.from_features(self._features(x_bhwc, bn_train, train, mask_b), train)


def create_model(arch: str, num_classes: int, dtype: Any = None, fast_backward: Optional[bool] = None) -> DenseNet:
  """DenseNet `arch` (one of ARCHS) with a `num_classes`-way `classifier`, computing in `dtype` (None: float32)."""
  check_create_args(arch, ARCHS, num_classes, fast_backward)
  return DenseNet(arch=arch, num_classes=num_classes, dtype=dtype)


_TOP_LEVEL = {'features_conv0': 'stem', 'features_norm0': 'stem', 'features_norm5': 'norm5', 'classifier': HEAD}
_TOP_LEVEL.update({f'features_denseblock{b}': f'denseblock{b}' for b in range(1, 5)})
_TOP_LEVEL.update({f'features_transition{t}': f'transition{t}' for t in range(1, 4)})


def stage_of(module_name: str) -> Optional[str]:
  """features_conv0/_norm0 -> 'stem', features_denseblock2 -> 'denseblock2', features_transition1 ->
  'transition1', features_norm5 -> 'norm5', classifier -> 'head'; None for another family's name."""
  return _TOP_LEVEL.get(module_name)


def torch_name_table(arch: str, include_head: bool = True) -> list[Entry]:
  """Every tensor of torchvision's `arch` (its current state-dict names), in order, with its place in Flax."""
  spec = ARCHS[arch]
  table = conv_entries('features.conv0', ('features_conv0',)) + bn_entries('features.norm0', ('features_norm0',))
  for b, num_layers in enumerate(spec.block_config, start=1):
    for i in range(1, num_layers + 1):
      t, f = f'features.denseblock{b}.denselayer{i}', (f'features_denseblock{b}', f'denselayer{i}')
      table += bn_entries(f'{t}.norm1', f + ('norm1',)) + conv_entries(f'{t}.conv1', f + ('conv1',))
      table += bn_entries(f'{t}.norm2', f + ('norm2',)) + conv_entries(f'{t}.conv2', f + ('conv2',))
    if b < len(spec.block_config):
      t, f = f'features.transition{b}', (f'features_transition{b}',)
      table += bn_entries(f'{t}.norm', f + ('norm',)) + conv_entries(f'{t}.conv', f + ('conv',))
  table += bn_entries('features.norm5', ('features_norm5',))
  if include_head:
    table += linear_entries('classifier', 'classifier')
  return table


# torchvision's _load_state_dict pattern: 'denselayerN.norm.1.weight' is today's 'denselayerN.norm1.weight'.
_LEGACY_NAME = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$')

T = TypeVar('T')


def modern_state_dict_names(state_dict: Mapping[str, T]) -> dict[str, T]:
  """A state dict with the old dotted dense-layer names of torchvision's ImageNet files renamed as
  torchvision renames them on loading; other names (and already modern ones) are kept."""
  out = {}
  for name, value in state_dict.items():
    match = _LEGACY_NAME.match(name)
    out[match.group(1) + match.group(2) if match else name] = value
  return out


FAMILY = Family(
    name='densenet',
    archs={'densenet121': 'densenet121-a639ec97.pth', 'densenet161': 'densenet161-8d451a50.pth',
           'densenet169': 'densenet169-b2777c0a.pth', 'densenet201': 'densenet201-c1103571.pth'},
    create=create_model,
    stages=STAGES,
    head='classifier', head_torch='classifier', head_stages=(HEAD,),
    stage_of=stage_of,
    num_features=lambda arch: ARCHS[arch].num_features,
    features_have_batch_norm=lambda arch: True,
    name_table=torch_name_table,
    modern_names=modern_state_dict_names,
)
