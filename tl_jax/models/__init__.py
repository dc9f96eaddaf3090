"""Flax modules that compute what torchvision's models compute, and what each arch's stages are.

Per-arch knowledge lives here: which architectures exist (`ARCHS`), how to build one
(`create_model`), which top-level module is the replaceable head (`head_name`), and which
stage every top-level module belongs to (`stage_of`, `stage_tree`), so the optimizer can
freeze by stage without knowing any architecture.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from tl_jax.models import resnet, vgg
from tl_jax.models.backbone import Backbone, TransferModel, model_class, num_features
from tl_jax.models.layers import BatchNorm
from tl_jax.models.resnet import ResNet
from tl_jax.models.vgg import VGG

# Every supported architecture name (the config validates `arch` against it).
ARCHS: tuple[str, ...] = tuple(resnet.ARCHS) + tuple(vgg.ARCHS)
STAGES = resnet.STAGES   # ResNet's, kept for existing callers; see arch_stages for any arch
HEAD = 'head'

# Stage groups a strategy may name besides single stages.
FEATURES = 'features'


def create_model(arch: str, num_classes: int, dtype=None, fast_backward: Optional[bool] = None) -> nn.Module:
  """torchvision's `arch` (one of ARCHS) with a `num_classes`-way last layer.

  ResNet options (see resnet.create_model): `dtype`, the compute dtype of convolutions and
  matmuls (e.g. jnp.bfloat16; None: float32); `fast_backward`, XLA:CPU-friendly conv
  gradients (None: the ResNets' default, on).
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  if arch in resnet.ARCHS:
    return resnet.create_model(arch, num_classes, dtype=dtype,
                               fast_backward=True if fast_backward is None else fast_backward)
  if dtype is not None:
    raise ValueError(f'--dtype {jnp.dtype(dtype).name} is built for the ResNets; {arch} computes in float32 '
                     '(leave --dtype out)')
  if fast_backward:
    raise ValueError(f'fast_backward is built for the ResNets, not {arch}')
  return model_class(arch)(arch=arch, num_classes=num_classes)


def init_variables(model: nn.Module, rng: jax.Array, image_size: int = 224) -> dict:
  """Random {'params', 'batch_stats'} for `model` (torchvision's init distributions).

  'batch_stats' is {} for models without BatchNorm (VGG11..19 plain), so every caller can
  treat both kinds alike."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(rng)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def head_name(arch: str) -> str:
  """The top-level module a new task replaces: ResNet's `fc`, VGG's `classifier_6` (classifier[-1])."""
  model_class(arch)
  return 'fc' if arch in resnet.ARCHS else vgg.HEAD


def arch_stages(arch: str) -> tuple[str, ...]:
  """Stages of `arch` from input to output, the head last."""
  model_class(arch)
  return (resnet.STAGES if arch in resnet.ARCHS else vgg.STAGES) + (HEAD,)


def head_stages(arch: str) -> tuple[str, ...]:
  """Stages of `arch` computed after `features` (by `from_features`): ResNet's head; VGG's classifier and head."""
  model_class(arch)
  return (HEAD,) if arch in resnet.ARCHS else ('classifier', HEAD)


def features_have_batch_norm(arch: str) -> bool:
  """Whether `features` holds BatchNorm layers (every ResNet, the VGG *_bn variants)."""
  model_class(arch)
  return arch in resnet.ARCHS or vgg.ARCHS[arch].batch_norm


def stage_of(module_name: str) -> str:
  """Stage of a top-level module of a ResNet or VGG.

  ResNet: conv1/bn1 -> 'stem', layer3_1 -> 'layer3', fc -> 'head'.
  VGG: block5_conv2 / block5_bn2 -> 'block5', classifier_0/_3 -> 'classifier', classifier_6 -> 'head'.
  """
  if module_name in ('conv1', 'bn1'):
    return 'stem'
  if module_name in ('fc', vgg.HEAD):
    return HEAD
  if module_name.startswith('layer') or module_name.startswith('block'):
    return module_name.split('_')[0]
  if module_name.startswith('classifier_'):
    return 'classifier'
  raise ValueError(f'no stage known for module {module_name!r}')


StageTree = Union[str, Mapping[str, 'StageTree']]


def stage_tree(params: Mapping) -> dict:
  """A prefix of `params`' tree with a stage name at each top-level module.

  ResNet/VGG: {'conv1': 'stem', ..., 'fc': 'head'}. TransferModel: {'backbone': {...the
  backbone's stages...}, 'head': {'xmin': 'xmin', ...}}: each top-level submodule of the
  user's head is a stage named after it (a head with no submodules is one stage, 'head').
  """
  if 'backbone' in params and 'head' in params and len(params) == 2:
    backbone = {name: stage_of(name) for name in params['backbone']}
    head = params['head']
    if all(isinstance(v, Mapping) for v in head.values()):
      clashes = sorted(set(head) & (set(backbone.values()) | {FEATURES}))
      if clashes:
        raise ValueError(f'head submodules {clashes} share a name with a backbone stage; rename them')
      return {'backbone': backbone, 'head': {name: name for name in head}}
    return {'backbone': backbone, 'head': HEAD}
  return {name: stage_of(name) for name in params}


def stage_groups(tree: Mapping) -> dict[str, tuple[str, ...]]:
  """Names a strategy may use -> the stages they select: every stage, plus 'features' (the
  backbone's stages up to the pooled features) and 'head' (every head stage)."""
  if 'backbone' in tree and 'head' in tree:
    backbone = tuple(dict.fromkeys(tree['backbone'].values()))   # a Backbone has no head parameters
    head = tuple(tree['head'].values()) if isinstance(tree['head'], Mapping) else (HEAD,)
  else:
    stages = tuple(dict.fromkeys(tree.values()))
    backbone = tuple(s for s in stages if s != HEAD)
    head = (HEAD,) if HEAD in stages else ()
  groups = {s: (s,) for s in backbone + head}
  groups[FEATURES] = tuple(s for s in backbone if s != 'classifier')
  groups[HEAD] = head
  return groups


__all__ = ['ARCHS', 'STAGES', 'Backbone', 'BatchNorm', 'ResNet', 'TransferModel', 'VGG', 'arch_stages',
           'create_model', 'features_have_batch_norm', 'head_name', 'head_stages',
           'init_variables', 'num_features', 'stage_groups', 'stage_of', 'stage_tree']
