"""Flax modules that compute what torchvision's models compute, and what each arch's stages are.

Per-arch knowledge lives in each family's file (its `FAMILY` record, see `family.py`), registered
once in `registry.py`; the functions here answer for any arch from it: which architectures exist
(`ARCHS`), how to build one (`create_model`), which top-level module is the replaceable head
(`head_name`), and which stage every top-level module belongs to (`stage_of`, `stage_tree`), so
the optimizer can freeze by stage without knowing any architecture.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models.backbone import Backbone, TransferModel, num_features
from tl_jax.models.family import HEAD, Family
from tl_jax.models.layers import BatchNorm
from tl_jax.models.registry import ARCHS, FAMILIES, family_of
from tl_jax.models.resnet import ResNet
from tl_jax.models.vgg import VGG


# Stage groups a strategy may name besides single stages.
FEATURES = 'features'


# The families whose create takes `winograd` (3x3 stride-1 convs as Winograd on CPU where measured faster).
WINOGRAD_FAMILIES = ('resnet', 'vgg')


def create_model(arch: str, num_classes: int, dtype=None, fast_backward: Optional[bool] = None,
                 image_size: Optional[int] = None, winograd: Optional[bool] = None) -> nn.Module:
  """torchvision's `arch` (one of ARCHS) with a `num_classes`-way last layer.

  `image_size`: the input size, for the families whose parameters depend on it (ViT: the
  weights' crop size, as torchvision's builder takes it from the weights); None: the arch's
  native size. The other families take any size and ignore it.

  `winograd` (ResNets and VGG; None: on): 3x3 stride-1 convolutions as Winograd on CPU where
  `benchmarks/bench_winograd.py` measured it faster (tl_jax.models.winograd); False: direct.

  Options a family has (the ResNets: `dtype`, the compute dtype of convolutions and matmuls,
  e.g. jnp.bfloat16, None: float32; `fast_backward`, XLA:CPU-friendly conv gradients, None:
  the family's default) are refused by the others with a clear message.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  family = family_of(arch)
  extra = {}
  if family.sized_by_input and image_size is not None:
    extra['image_size'] = image_size
  # `winograd` False / None is every family's default; True is refused where there is no Winograd.
  if family.name in WINOGRAD_FAMILIES:
    extra['winograd'] = winograd
  elif winograd:
    raise ValueError(f'winograd convolutions are built for the ResNets and VGG, not {arch}')
  return family.create(arch, num_classes, dtype=dtype, fast_backward=fast_backward, **extra)


def init_variables(model: nn.Module, rng: jax.Array, image_size: Optional[int] = None) -> dict:
  """Random {'params', 'batch_stats'} for `model` (torchvision's init distributions).

  'batch_stats' is {} for models without BatchNorm (VGG11..19 plain), so every caller can
  treat both kinds alike. `image_size` None: the smallest size the family's parameters allow
  (its `init_size`), which is cheap and gives the same parameter shapes as any other."""
  if image_size is None:
    image_size = init_size(model)
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(rng)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def aux_loss_weights(model: nn.Module) -> tuple[float, ...]:
  """The weights of `model`'s auxiliary outputs in the training loss (its family's; () for a
  TransferModel, whose base has no auxiliary heads)."""
  if isinstance(model, TransferModel):
    return ()
  return family_of(model.arch).aux_loss_weights(model.arch)


def init_size(model: nn.Module) -> int:
  """An input size `model.init` accepts: the model's own where its parameters depend on it (a ViT
  built for 384 px), else its family's small one."""
  family = family_of(model.arch)
  spec = getattr(model, 'spec', None)
  if family.sized_by_input and spec is not None:
    return spec.image_size
  return family.init_size(model.arch)


def head_name(arch: str) -> str:
  """The top-level module a new task replaces: ResNet's `fc`, VGG's `classifier_6` (classifier[-1])."""
  return family_of(arch).head


def arch_stages(arch: str) -> tuple[str, ...]:
  """Stages of `arch` from input to output, the head last."""
  return family_of(arch).stages_of(arch) + (HEAD,)


def head_stages(arch: str) -> tuple[str, ...]:
  """Stages of `arch` computed after `features` (by `from_features`): ResNet's head; VGG's classifier and head."""
  return family_of(arch).head_stages


def features_have_batch_norm(arch: str) -> bool:
  """Whether `features` holds BatchNorm layers (every ResNet, the VGG *_bn variants)."""
  return family_of(arch).features_have_batch_norm(arch)


def features_are_random(arch: str) -> bool:
  """Whether `features` draws at random in train mode (stochastic depth in ConvNeXt, EfficientNet,
  Swin, MaxViT), as torch's model.train() does even with the backbone frozen."""
  return family_of(arch).features_are_random(arch)


def stage_of(module_name: str, arch: Optional[str] = None) -> str:
  """Stage of a top-level module: ResNet's layer3_1 -> 'layer3', VGG's classifier_6 -> 'head'.

  With `arch`, its family's `stage_of`; without, the one stage every family that knows the name
  agrees on (names such as `classifier_3` mean different stages in different families)."""
  families = (family_of(arch),) if arch is not None else FAMILIES
  stages = {s for s in (f.stage_of(module_name) for f in families) if s is not None}
  if len(stages) != 1:
    what = 'no stage' if not stages else f'stages {sorted(stages)} (depending on the family)'
    raise ValueError(f'{what} known for module {module_name!r}' + ('' if arch is None else f' of {arch}'))
  return stages.pop()


def family_of_names(names) -> Family:
  """The family whose `stage_of` knows every top-level module name in `names` (the first such
  family when several do and agree on every stage)."""
  names = list(names)
  candidates = [f for f in FAMILIES if all(f.stage_of(n) is not None for n in names)]
  if not candidates:
    raise ValueError(f'no model family has all of the top-level modules {sorted(names)}')
  maps = {tuple(f.stage_of(n) for n in names) for f in candidates}
  if len(maps) > 1:
    raise ValueError(f'the top-level modules {sorted(names)} fit the families '
                     f'{[f.name for f in candidates]}, which stage them differently')
  return candidates[0]


StageTree = Union[str, Mapping[str, 'StageTree']]


def stage_tree(params: Mapping) -> dict:
  """A prefix of `params`' tree with a stage name at each top-level module.

  ResNet/VGG: {'conv1': 'stem', ..., 'fc': 'head'}. The last layers of auxiliary heads belong to
  `head` one level down (Inception: {'AuxLogits': {'conv0': 'AuxLogits', ..., 'fc': 'head'}}), as
  PyTorch's recipe replaces and trains `AuxLogits.fc` along with `fc`. TransferModel:
  {'backbone': {...the backbone's stages...}, 'head': {'xmin': 'xmin', ...}}: each top-level
  submodule of the user's head is a stage named after it (a head with no submodules is one stage,
  'head').
  """
  if 'backbone' in params and 'head' in params and len(params) == 2:
    family = family_of_names(params['backbone'])
    backbone = {name: family.stage_of(name) for name in params['backbone']}
    head = params['head']
    if all(isinstance(v, Mapping) for v in head.values()):
      clashes = sorted(set(head) & (set(backbone.values()) | {FEATURES}))
      if clashes:
        raise ValueError(f'head submodules {clashes} share a name with a backbone stage; rename them')
      return {'backbone': backbone, 'head': {name: name for name in head}}
    return {'backbone': backbone, 'head': HEAD}
  family = family_of_names(params)
  tree = {name: family.stage_of(name) for name in params}
  for path in {p for arch in family.archs for p in family.aux_heads(arch)}:
    if len(path) == 2 and path[0] in params and path[1] in params[path[0]]:
      tree[path[0]] = {**({k: tree[path[0]] for k in params[path[0]]} if isinstance(tree[path[0]], str)
                          else tree[path[0]]), path[1]: HEAD}
  return tree


def _stage_values(tree: Mapping) -> list[str]:
  """Every stage name in a (nested) stage tree, in order."""
  return [s for v in tree.values() for s in (_stage_values(v) if isinstance(v, Mapping) else [v])]


def stage_groups(tree: Mapping) -> dict[str, tuple[str, ...]]:
  """Names a strategy may use -> the stages they select: every stage, plus 'features' (the
  backbone's stages up to the pooled features) and 'head' (every head stage)."""
  if 'backbone' in tree and 'head' in tree:
    backbone = tuple(dict.fromkeys(_stage_values(tree['backbone'])))   # a Backbone has no head parameters
    head = tuple(tree['head'].values()) if isinstance(tree['head'], Mapping) else (HEAD,)
  else:
    stages = tuple(dict.fromkeys(_stage_values(tree)))
    backbone = tuple(s for s in stages if s != HEAD)
    head = (HEAD,) if HEAD in stages else ()
  groups = {s: (s,) for s in backbone + head}
  # What `features` computes: the backbone stages that no family computes after the pooled features.
  after_features = {s for family in FAMILIES for s in family.head_stages}
  groups[FEATURES] = tuple(s for s in backbone if s not in after_features)
  groups[HEAD] = head
  return groups


__all__ = ['ARCHS', 'FAMILIES', 'HEAD', 'Backbone', 'BatchNorm', 'ResNet', 'TransferModel', 'VGG', 'arch_stages',
           'aux_loss_weights', 'create_model', 'family_of', 'family_of_names', 'features_are_random',
           'features_have_batch_norm', 'head_name', 'head_stages', 'init_size', 'init_variables', 'num_features',
           'stage_groups', 'stage_of', 'stage_tree']
