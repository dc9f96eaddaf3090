"""What tl_jax knows of a model family, in one record each family file fills in and registers once
(`tl_jax.models.registry`): its Flax module, its archs, its stages for freezing, its head, its
feature width, its torch name table and its torchvision weight files.

The torch name table lists every tensor of torchvision's state dict with where it lives in the
Flax variables and how it is laid out (`Entry.kind`); `tl_jax.convert` applies it both ways.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Union

import flax.linen as nn

HEAD = 'head'   # the stage of the replaceable last layer, in every family


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_name: str            # e.g. 'layer1.0.bn1.running_var'
  collection: str            # 'params' | 'batch_stats'
  path: tuple[str, ...]      # e.g. ('layer1_0', 'bn1', 'var')
  kind: str                  # 'conv' (OIHW <-> HWIO) | 'linear_w' (transposed) | 'copy'


def conv_entries(torch_prefix: str, flax_path: tuple[str, ...], bias: bool = False) -> list[Entry]:
  entries = [Entry(f'{torch_prefix}.weight', 'params', flax_path + ('kernel',), 'conv')]
  if bias:
    entries.append(Entry(f'{torch_prefix}.bias', 'params', flax_path + ('bias',), 'copy'))
  return entries


def linear_entries(torch_prefix: str, flax_name: str) -> list[Entry]:
  return [Entry(f'{torch_prefix}.weight', 'params', (flax_name, 'kernel'), 'linear_w'),
          Entry(f'{torch_prefix}.bias', 'params', (flax_name, 'bias'), 'copy')]


def bn_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  return [
      Entry(f'{torch_prefix}.weight', 'params', flax_path + ('scale',), 'copy'),
      Entry(f'{torch_prefix}.bias', 'params', flax_path + ('bias',), 'copy'),
      Entry(f'{torch_prefix}.running_mean', 'batch_stats', flax_path + ('mean',), 'copy'),
      Entry(f'{torch_prefix}.running_var', 'batch_stats', flax_path + ('var',), 'copy'),
  ]


def check_create_args(arch: str, archs: Mapping, num_classes: int, fast_backward: Optional[bool]) -> None:
  """The checks every family's `create` makes: a known arch, a class count, no ResNet-only option."""
  if arch not in archs:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(archs)}')
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  if fast_backward:
    raise ValueError(f'fast_backward is built for the ResNets, not {arch}')


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  Attributes:
    name: e.g. 'resnet'.
    archs: arch name -> torchvision's IMAGENET1K_V1 file name (its SHA-256 prefix in the name).
    create: (arch, num_classes, dtype, fast_backward) -> the Flax module; refuses options the
      family does not have.
    stages: the backbone's stages for freezing, input to output (the head not included); a
      tuple for the whole family, or arch -> tuple where archs differ (EfficientNet V2-S has no
      features.8).
    head: the top-level module the head swap replaces (torch's `fc`, `classifier[-1]`, ...).
    head_torch: its torch name, e.g. 'fc' or 'classifier.6'.
    head_stages: the stages `from_features` computes from the pooled features, HEAD last.
    stage_of: top-level module name -> stage, or None when the name is not this family's.
    num_features: arch -> width of the pooled, flattened features.
    features_have_batch_norm: arch -> whether the backbone holds BatchNorm layers.
    name_table: (arch, include_head) -> every tensor of torchvision's state dict as Entries.
    init_size: arch -> an input size (pixels) `init` accepts, small for speed; models whose
      parameters depend on the size (ViT's position embedding) give their native size.
    aux_loss_weights: arch -> the weight of each auxiliary output in the training loss
      (torchvision's Inception v3: (0.4,), GoogLeNet: (0.3, 0.3)); () for most. A family with
      auxiliary heads returns `(logits, (aux, ...))` from `__call__(..., with_aux=True)` in train mode.
    features_are_random: arch -> whether the backbone draws at random in train mode (stochastic
      depth, dropout), so that train-phase features cannot be cached even when it is frozen.
    modern_names: a state dict -> the same with the names torchvision's current model uses (its
      DenseNet files hold older names that torchvision renames when loading them); identity for most.
    sized_by_input: the parameters depend on the input size (ViT's position embedding): `create`
      takes `image_size` and the module has `spec.image_size`.
    aux_heads: arch -> the Flax paths of the auxiliary heads' last layers (e.g. ('AuxLogits',
      'fc')), which a new task replaces along with the head.

  The module every `create` returns has torchvision's computation split in two:
    features(x_bhwc, train=False, mask_b=None) -> (B, num_features): pooled, flattened features;
    from_features(features_bd, train=False) -> logits: everything after (dropout, classifier);
    __call__(x_bhwc, train=False, mask_b=None, bn_train=None) -> logits, `bn_train` (default:
      `train`) driving BatchNorm and `train` dropout / stochastic depth (the 'dropout' rng).
  Inputs are NHWC, normalised; `mask_b` marks padded batch rows (0) that BatchNorm's batch
  statistics leave out. Top-level module and parameter names are torchvision's with '.' -> '_'
  and map to stages through `stage_of`.
  """
  name: str
  archs: Mapping[str, str]
  create: Callable[..., nn.Module]
  stages: Union[tuple[str, ...], Callable[[str], tuple[str, ...]]]
  head: str
  head_torch: str
  head_stages: tuple[str, ...]
  stage_of: Callable[[str], Optional[str]]
  num_features: Callable[[str], int]
  features_have_batch_norm: Callable[[str], bool]
  name_table: Callable[[str, bool], list[Entry]]
  init_size: Callable[[str], int] = lambda arch: 32
  aux_loss_weights: Callable[[str], tuple[float, ...]] = lambda arch: ()
  aux_heads: Callable[[str], tuple[tuple[str, ...], ...]] = lambda arch: ()
  features_are_random: Callable[[str], bool] = lambda arch: False
  sized_by_input: bool = False
  modern_names: Callable[[Mapping], Mapping] = lambda state_dict: state_dict

  def stages_of(self, arch: str) -> tuple[str, ...]:
    """`arch`'s backbone stages, input to output."""
    return self.stages(arch) if callable(self.stages) else self.stages
