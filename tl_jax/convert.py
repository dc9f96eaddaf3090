"""torchvision state_dict <-> Flax variables, through an explicit name table.

Imports no torch: NumPy arrays in, NumPy arrays out. `tl_jax.weights` turns files into
NumPy state dicts.

Layout rules (why each transpose):
  conv  weight  (O, I, kH, kW)  -> kernel (kH, kW, I, O)   Flax convs are HWIO
  conv  bias                    -> bias                   (VGG's convs have one)
  fc    weight  (out, in)       -> kernel (in, out)       Dense computes x @ kernel
  bn    weight / bias           -> scale / bias           same values
  bn    running_mean / _var     -> batch_stats mean / var
  bn    num_batches_tracked     -> dropped (only used by torch when momentum=None);
                                   exported as 0

VGG's `classifier.0` needs no row permutation: the Flax VGG flattens its NHWC features in
torch's (C, H, W) order, so every Linear is a plain transpose.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax import models
from tl_jax.models import ARCHS, FAMILIES, family_of
from tl_jax.models.family import Entry


class ConversionError(ValueError):
  """A state dict or variable tree does not fit the architecture."""


def name_table(arch: str, include_head: bool = True, base_only: bool = False) -> list[Entry]:
  """Every tensor of torchvision's `arch` with where it lives in the Flax variables (its family's table).

  Args:
    include_head: with the last layer (`fc`, VGG's `classifier.6`).
    base_only: only the convolutional base (`tl_jax.models.Backbone`): ResNet without `fc`,
      VGG's `features` without any `classifier` layer.
  """
  try:
    family = family_of(arch)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  table = family.name_table(arch, include_head and not base_only)
  if base_only:
    # The base: what `features` computes; not the classifier, nor the auxiliary heads it never runs.
    aux_modules = {path[0] for path in family.aux_heads(arch)}
    return [e for e in table if family.stage_of(e.path[0]) not in family.head_stages and e.path[0] not in aux_modules]
  return table


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':
    return np.ascontiguousarray(np.transpose(value, (2, 3, 1, 0)))
  if kind == 'linear_w':
    return np.ascontiguousarray(value.T)
  return np.array(value)


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':
    return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
  if kind == 'linear_w':
    return np.ascontiguousarray(value.T)
  return np.array(value)


def _expected_torch_shape(entry: Entry, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if entry.kind == 'conv':
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if entry.kind == 'linear_w':
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _get(tree: Mapping, path: Iterable[str]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def torch_to_flax(state_dict: Mapping[str, np.ndarray], arch: str,
                  reference: Optional[Mapping] = None, include_head: bool = True,
                  base_only: bool = False) -> dict:
  """torchvision `state_dict` (NumPy values) -> {'params', 'batch_stats'}.

  Args:
    state_dict: tensor name -> array, as `model.state_dict()` with values as NumPy.
    arch: torchvision architecture name, e.g. 'resnet18'.
    reference: optional Flax variables of the target model; every shape is checked against
      them (catches a state dict of another arch or class count).
    include_head: convert the last layer (`fc`, VGG's `classifier.6`) too. With False it is
      ignored (a head is made afresh).
    base_only: convert only the convolutional base (for `tl_jax.models.Backbone`); the rest of
      the classifier is ignored.

  Raises:
    ConversionError listing every missing, unexpected and mis-shaped name.
  """
  state_dict = family_of(arch).modern_names(state_dict)   # e.g. DenseNet's files' older names
  table = name_table(arch, include_head, base_only)
  known = {e.torch_name for e in name_table(arch, include_head=True)}
  missing = [e.torch_name for e in table if e.torch_name not in state_dict]
  unexpected = sorted(k for k in state_dict
                      if k not in known and not k.endswith('num_batches_tracked'))
  if missing or unexpected:
    guessed = guess_arch(state_dict)
    if guessed is not None and guessed != arch:
      # One line instead of dozens of names: the file is fine, the --arch is not.
      raise ConversionError(f'weights do not fit {arch}: this looks like a {guessed} state dict; '
                            f'pass --arch {guessed}')
  mismatched = []
  variables: dict = {'params': {}, 'batch_stats': {}}
  for entry in table:
    if entry.torch_name not in state_dict:
      continue
    value = _to_flax(np.asarray(state_dict[entry.torch_name]), entry.kind)
    if reference is not None:
      try:
        want = tuple(np.shape(_get(reference[entry.collection], entry.path)))
      except KeyError:
        want = None
      if want is not None and tuple(value.shape) != want:
        mismatched.append(f'{entry.torch_name}: file has {tuple(np.shape(state_dict[entry.torch_name]))}, '
                          f'{arch} needs {_expected_torch_shape(entry, want)}')
        continue
    _set(variables[entry.collection], entry.path, value)
  _raise_if_problems(arch, missing, unexpected, mismatched)
  return variables


def flax_to_torch(variables: Mapping, arch: str) -> dict[str, np.ndarray]:
  """{'params', 'batch_stats'} -> torchvision state_dict (NumPy values), loadable strictly."""
  state_dict: dict[str, np.ndarray] = {}
  missing = []
  for entry in name_table(arch, include_head=True):
    try:
      value = np.asarray(_get(variables[entry.collection], entry.path))
    except KeyError:
      missing.append('/'.join((entry.collection,) + entry.path))
      continue
    state_dict[entry.torch_name] = _to_torch(value, entry.kind)
    if entry.torch_name.endswith('running_var'):
      state_dict[entry.torch_name.replace('running_var', 'num_batches_tracked')] = np.array(0, np.int64)
  known = {(e.collection,) + e.path for e in name_table(arch)}
  unexpected = sorted('/'.join(p) for p in _leaf_paths(variables) if p not in known)
  _raise_if_problems(arch, missing, unexpected, [])
  return state_dict


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  out = []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out += _leaf_paths(value, prefix + (key,))
    else:
      out.append(prefix + (key,))
  return out


def _raise_if_problems(arch: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
  if not (missing or unexpected or mismatched):
    return
  lines = [f'weights do not fit {arch}:']
  if missing:
    lines.append(f'  missing ({len(missing)}): ' + ', '.join(missing))
  if unexpected:
    lines.append(f'  unexpected ({len(unexpected)}): ' + ', '.join(unexpected))
  if mismatched:
    lines.append(f'  wrong shape ({len(mismatched)}):\n    ' + '\n    '.join(mismatched))
  lines.append('Check --arch (`tl-jax archs` lists them; e.g. resnet18/34 have BasicBlocks, resnet50/101 '
               'Bottlenecks, vggN_bn have BatchNorm and vggN do not) and that the file is a torchvision '
               'classification state_dict.')
  raise ConversionError('\n'.join(lines))


def guess_arch(state_dict: Mapping[str, np.ndarray]) -> Optional[str]:
  """The arch whose name table matches the state dict's keys exactly (with or without its head), else None.

  Archs that share every name (EfficientNet-B1 and B2, RegNets of one depth) are told apart by
  the shapes of their tensors, from each candidate's abstract parameters (no weights computed)."""
  for family in FAMILIES:
    state_dict = family.modern_names(state_dict)
  keys = {k for k in state_dict if not k.endswith('num_batches_tracked')}
  candidates = [(arch, include_head) for arch in ARCHS for include_head in (True, False)
                if {e.torch_name for e in name_table(arch, include_head)} == keys]
  if len(candidates) <= 1:
    return candidates[0][0] if candidates else None
  fitting = [arch for arch, include_head in candidates if _shapes_fit(state_dict, arch, include_head)]
  if not fitting:   # shapes fit none of them: the names still say more than nothing
    return candidates[0][0]
  return fitting[0] if len(fitting) == 1 else None


def _shapes_fit(state_dict: Mapping[str, np.ndarray], arch: str, include_head: bool) -> bool:
  """Whether every tensor of `state_dict` has the shape `arch`'s parameters give it (any class count)."""
  family = family_of(arch)
  model = family.create(arch, 1000)
  size = family.init_size(arch)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
  for entry in name_table(arch, include_head):
    if family.stage_of(entry.path[0]) == models.HEAD or any(entry.path[:len(p)] == p for p in family.aux_heads(arch)):
      continue   # the heads' shapes depend on the class count
    try:
      want = _expected_torch_shape(entry, tuple(_get(abstract[entry.collection], entry.path).shape))
    except KeyError:
      return False
    if tuple(np.shape(state_dict[entry.torch_name])) != want:
      return False
  return True


def head_num_classes(state_dict: Mapping[str, np.ndarray], arch: Optional[str] = None) -> Optional[int]:
  """Output size of the last layer (`fc`, `classifier.6`, `heads.head`, ...) in a torchvision state
  dict of `arch` (default: the arch its names say), or None."""
  arch = arch or guess_arch(state_dict)
  if arch is None:
    return None
  weight = state_dict.get(f'{family_of(arch).head_torch}.weight')
  return None if weight is None else int(np.shape(weight)[0])


def replace_head(variables: Mapping, fresh_variables: Mapping, arch: Optional[str] = None) -> dict:
  """Backbone of `variables` with the head of `fresh_variables` (the tutorial's new nn.Linear).

  The head is ResNet's `fc`, VGG's `classifier_6` (torch's `classifier[-1]`), ... (each family's
  `head`), plus the last layer of each auxiliary head (Inception's `AuxLogits.fc`, GoogLeNet's
  `aux1.fc2` / `aux2.fc2`) when `arch` names a family that has them. The rest of the classifier is
  kept, as `model.classifier[6] = nn.Linear(4096, K)` keeps VGG's first two layers.

  Args:
    variables: converted weights (any head, or none).
    fresh_variables: `init_variables` of the target model with `num_classes` outputs; its head
      has nn.Linear's init distribution.
    arch: the model's arch; None: the head is found among the families' head names.
  """
  if arch is not None:
    family = family_of(arch)
    head, aux_heads = family.head, family.aux_heads(arch)
  else:
    # The family whose modules these are (VGG's tree also holds a `classifier_3`, another family's
    # head), else the one family head name present.
    try:
      heads = [models.family_of_names(fresh_variables['params']).head]
    except ValueError:
      heads = list(dict.fromkeys(f.head for f in FAMILIES if f.head in fresh_variables['params']))
    if len(heads) != 1 or heads[0] not in fresh_variables['params']:
      raise ConversionError(f'cannot tell the head among {sorted(fresh_variables["params"])}; pass the arch')
    head, aux_heads = heads[0], ()
  params = {k: v for k, v in variables['params'].items() if k != head}
  params[head] = fresh_variables['params'][head]
  for path in aux_heads:
    params[path[0]] = _replace_at(params.get(path[0], {}), path[1:], _get(fresh_variables['params'], path))
  return {'params': params, 'batch_stats': dict(variables.get('batch_stats', {}))}


def _replace_at(tree: Mapping, path: tuple[str, ...], value) -> Any:
  """A copy of `tree` with the subtree at `path` replaced by `value`."""
  if not path:
    return value
  return {**tree, path[0]: _replace_at(tree.get(path[0], {}), path[1:], value)}


def init_transfer_variables(model: models.TransferModel, rng: jax.Array, state_dict: Optional[Mapping] = None,
                            image_size: Optional[int] = None) -> dict:
  """{'params', 'batch_stats'} of `model`: the backbone from `state_dict` (torchvision names, NumPy
  values; its classifier layers are ignored) or random, and the head fresh from its own init.

  Raises:
    ConversionError when `state_dict` does not fit `model.arch`'s base.
  """
  if image_size is None:
    image_size = family_of(model.arch).init_size(model.arch)
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  fresh = jax.jit(lambda r: model.init(r, dummy, train=False))(rng)
  params = dict(fresh['params'])
  batch_stats = dict(fresh.get('batch_stats', {}))
  if state_dict is not None:
    reference = {'params': params['backbone'], 'batch_stats': batch_stats.get('backbone', {})}
    loaded = torch_to_flax(state_dict, model.arch, reference=reference, base_only=True)
    params['backbone'] = loaded['params']
    if loaded['batch_stats']:
      batch_stats['backbone'] = loaded['batch_stats']
  return {'params': params, 'batch_stats': batch_stats}
