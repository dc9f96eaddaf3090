"""Where weights come from: torchvision's ImageNet files, local .pth/.safetensors, or none.

Downloads follow torch.hub: the same cache (`<hub>/checkpoints/<filename>`), the same
sha256 prefix taken from the file name, a temp file renamed into place so a broken
download never looks like a checkpoint. Imports no torch at module level: torch is only
needed to read or write .pth files (`pip install 'tl_jax[torch]'`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import sys
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from tl_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tl_jax.fetch import FetchError, fetch
from tl_jax.models.registry import ARCHS
from tl_jax.weight_files import WEIGHT_FILES, DEFAULT_WEIGHTS, WeightFile, imagenet_weights_name

PathLike = Union[str, os.PathLike]


class WeightsError(ValueError):
  """Weights cannot be found, downloaded, verified or read."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The input pipeline the weights were trained with (torchvision's ImageClassification)."""
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  resize_size: int = 256
  crop_size: int = 224
  interpolation: str = 'bilinear'

  def to_dict(self) -> dict[str, Any]:
    return {'mean': list(self.mean), 'std': list(self.std), 'resize_size': self.resize_size,
            'crop_size': self.crop_size, 'interpolation': self.interpolation}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Preprocessing':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise WeightsError(f'unknown preprocessing keys {unknown}; known: {sorted(known)}')
    kwargs = dict(d)
    for key in ('mean', 'std'):
      if key in kwargs:
        kwargs[key] = tuple(float(v) for v in kwargs[key])
    return cls(**kwargs)


IMAGENET_PREPROCESSING = Preprocessing()

DEFAULT_BASE_URL = 'https://download.pytorch.org/models/'
BASE_URL_ENV = 'TL_JAX_WEIGHTS_BASE_URL'
# The file `weights: imagenet` names per arch: torchvision's IMAGENET1K_V1 (the tutorial's
# `pretrained=True`), or its DEFAULT where there is no V1.
IMAGENET_URLS = {arch: DEFAULT_BASE_URL + WEIGHT_FILES[arch][imagenet_weights_name(arch)].filename for arch in ARCHS}

# torch.hub.HASH_REGEX: 'resnet18-f37072fd.pth' -> 'f37072fd'.
_HASH_REGEX = re.compile(r'-([a-f0-9]*)\.')
_PREPROCESSING_KEY = 'tl_jax.preprocessing'
_TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
_SAFETENSORS_SUFFIXES = ('.safetensors',)
_SPEC_HELP = ('accepted values: imagenet | a torchvision weight name (IMAGENET1K_V2, DEFAULT, ...) | random | '
              'PATH (a local .pth or .safetensors state dict)')


@dataclasses.dataclass
class ResolvedWeights:
  state_dict: Optional[dict[str, np.ndarray]]   # None for 'random'
  source: str                                   # 'random', 'imagenet:<cached file>' or the local path
  preprocessing: Preprocessing


def torch_hub_dir() -> Path:
  """`torch.hub.get_dir()` without importing torch (ignores `torch.hub.set_dir`)."""
  torch_home = os.path.expanduser(
      os.getenv('TORCH_HOME', os.path.join(os.getenv('XDG_CACHE_HOME', '~/.cache'), 'torch')))
  return Path(torch_home) / 'hub'


def sha256_prefix_from_name(filename: PathLike) -> Optional[str]:
  """The hash prefix torch.hub checks for `filename` ('resnet18-f37072fd.pth' -> 'f37072fd'), or None."""
  match = _HASH_REGEX.search(os.path.basename(os.fspath(filename)))
  return match.group(1) if match and match.group(1) else None


def _weights_hint(dst: Path) -> str:
  return (f'Alternatives: put the file at {dst} yourself, or pass --weights PATH '
          '(a local .pth/.safetensors state dict), or --weights random.')


def download(url: str, dst: PathLike, expected_sha256_prefix: Optional[str] = None,
             progress: bool = True, timeout: float = 60.0, hint: Optional[str] = None) -> Path:
  """`tl_jax.fetch.fetch` for weight files: its errors as WeightsError, the --weights alternatives as
  the default hint."""
  dst = Path(dst).expanduser()
  try:
    return fetch(url, dst, expected_sha256_prefix, progress=progress, timeout=timeout,
                 hint=_weights_hint(dst) if hint is None else hint)
  except FetchError as e:
    raise WeightsError(str(e)) from e


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise WeightsError("reading or writing .pth files needs torch: pip install 'tl_jax[torch]', "
                       'or use a .safetensors file instead') from e
  return torch


def _tensor_to_numpy(torch, tensor) -> np.ndarray:
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    import ml_dtypes  # NumPy has no bfloat16; jax's ml_dtypes does, bit for bit.
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _numpy_to_tensor(torch, name: str, value) -> Any:
  array = np.asarray(value)
  if name.endswith('num_batches_tracked') and array.ndim == 0:
    return torch.tensor(int(array), dtype=torch.int64)   # torch's BatchNorm keeps it int64
  array = np.ascontiguousarray(array)
  if array.dtype.name == 'bfloat16':
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array.copy())


def _torch_load(torch, path: Path) -> Any:
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
    message = str(e)
    found = re.search(r'Unsupported global: GLOBAL (\S+)', message)
    if found:
      raise WeightsError(
          f'{path} holds pickled objects, not just tensors (found {found.group(1)}; e.g. a whole '
          'nn.Module saved with torch.save(model)); refusing to unpickle them. Save '
          'model.state_dict() instead.') from e
    # torch's weights_only message is a page of advice; the reason sits after this marker.
    reason = message.split('WeightsUnpickler error:', 1)[-1].split('Check the documentation', 1)[0]
    reason = ' '.join(reason.split()) or type(e).__name__
    raise WeightsError(f'{path} could not be read as a torch file; it may be corrupt or truncated '
                       f'({type(e).__name__}: {reason})') from e


def _unwrap(obj: Any, path: Path) -> Mapping:
  if isinstance(obj, Mapping):
    # Training checkpoints wrap the weights: {'model': sd, 'optimizer': ..., 'epoch': ...}.
    for key in ('state_dict', 'model'):
      if isinstance(obj.get(key), Mapping):
        return obj[key]
    return obj
  raise WeightsError(f'{path} holds a {type(obj).__name__}, not a state dict (a dict of name -> tensor)')


def _strip_module_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # nn.DataParallel / DistributedDataParallel wrap the model as `.module`, so a state dict saved
  # from the wrapper names every tensor 'module.<name>'. Strip only when all names have it.
  if state_dict and all(k.startswith('module.') for k in state_dict):
    return {k[len('module.'):]: v for k, v in state_dict.items()}
  return state_dict


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict from .pth/.pt/.bin (torch, weights_only) or .safetensors as NumPy arrays.

  Raises:
    WeightsError naming the file when it is missing, unreadable, or not a state dict.
  """
  path = Path(path).expanduser()
  if not path.is_file():
    raise WeightsError(f'weights file not found: {path}')
  suffix = path.suffix.lower()
  if suffix in _SAFETENSORS_SUFFIXES:
    import safetensors.numpy
    try:
      state_dict = safetensors.numpy.load_file(path)
    except Exception as e:  # SafetensorError and friends
      raise WeightsError(f'{path} could not be read as safetensors; it may be corrupt or truncated '
                         f'({type(e).__name__}: {e})') from e
  elif suffix in _TORCH_SUFFIXES:
    torch = _import_torch()
    obj = _unwrap(_torch_load(torch, path), path)
    bad = [f'{k!r} ({type(v).__name__})' for k, v in obj.items()
           if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
      raise WeightsError(f'{path} is not a state dict: entries that are not name -> tensor: '
                         + ', '.join(bad[:10]) + (' ...' if len(bad) > 10 else ''))
    state_dict = {k: _tensor_to_numpy(torch, v) for k, v in obj.items()}
  else:
    raise WeightsError(f'{path}: unknown weights file type {suffix!r}; use '
                       f'{" / ".join(_TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES)}')
  if not state_dict:
    raise WeightsError(f'{path} holds no tensors')
  return _strip_module_prefix(dict(state_dict))


def load_preprocessing(path: PathLike) -> Optional[Preprocessing]:
  """Preprocessing stored in a .safetensors file's metadata by `save_state_dict`, else None."""
  path = Path(path).expanduser()
  if path.suffix.lower() not in _SAFETENSORS_SUFFIXES:
    return None
  from safetensors import safe_open
  try:
    with safe_open(path, framework='np') as f:
      metadata = f.metadata() or {}
  except Exception as e:
    raise WeightsError(f'{path} could not be read as safetensors ({type(e).__name__}: {e})') from e
  if _PREPROCESSING_KEY not in metadata:
    return None
  try:
    return Preprocessing.from_dict(json.loads(metadata[_PREPROCESSING_KEY]))
  except (ValueError, TypeError) as e:
    raise WeightsError(f'{path}: bad {_PREPROCESSING_KEY} metadata ({e})') from e


def save_state_dict(state_dict: Mapping[str, Any], path: PathLike,
                    preprocessing: Optional[Preprocessing] = None,
                    module_versions: Optional[Mapping[str, int]] = None) -> Path:
  """Writes `state_dict` (name -> array) as .pth (torch tensors) or .safetensors, atomically.

  Args:
    state_dict: name -> NumPy (or jax) array.
    path: destination; the suffix picks the format.
    preprocessing: stored in the metadata of a .safetensors file (a .pth stays a plain state dict).
    module_versions: module path -> version, kept as the `_metadata` torch's own state_dict() carries
      (a .pth only), for modules whose `_load_from_state_dict` reads it (torchvision's MNASNet
      refuses a state dict without its version).
  """
  path = Path(path).expanduser()
  suffix = path.suffix.lower()
  if suffix not in _TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES:
    raise WeightsError(f'{path}: unknown weights file type {suffix!r}; use .pth or .safetensors')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'{path.name}.{uuid.uuid4().hex}.partial')
  try:
    if suffix in _SAFETENSORS_SUFFIXES:
      import safetensors.numpy
      metadata = None
      if preprocessing is not None:
        metadata = {_PREPROCESSING_KEY: json.dumps(preprocessing.to_dict())}
      arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
      safetensors.numpy.save_file(arrays, tmp, metadata=metadata)
    else:
      torch = _import_torch()
      tensors = collections.OrderedDict((k, _numpy_to_tensor(torch, k, v)) for k, v in state_dict.items())
      if module_versions:
        tensors._metadata = collections.OrderedDict((k, {'version': v}) for k, v in module_versions.items())
      torch.save(tensors, tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def _url_filename(url: str) -> str:
  return os.path.basename(urllib.parse.urlparse(url).path)


def weight_file(arch: str, name: str = 'imagenet') -> tuple[str, WeightFile]:
  """(enum name, file) of torchvision's weights `name` for `arch`: 'imagenet' (IMAGENET1K_V1, or
  DEFAULT where torchvision has no V1), 'DEFAULT', or an enum name such as 'IMAGENET1K_V2'."""
  if arch not in WEIGHT_FILES or arch not in ARCHS:
    raise WeightsError(f'no ImageNet weights known for arch {arch!r}; known: {", ".join(sorted(ARCHS))}')
  enum = {'imagenet': imagenet_weights_name(arch), 'DEFAULT': DEFAULT_WEIGHTS[arch]}.get(name, name)
  if enum not in WEIGHT_FILES[arch]:
    raise WeightsError(f'--weights {name!r}: torchvision has no such weights for {arch}; its weights are '
                       f'{", ".join(WEIGHT_FILES[arch])} (or imagenet, DEFAULT, random, a PATH)')
  return enum, WEIGHT_FILES[arch][enum]


def preprocessing_of(arch: str, name: str = 'imagenet') -> Preprocessing:
  """The eval preprocessing of torchvision's weights `name` for `arch` (its `weights.transforms()`)."""
  _, file = weight_file(arch, name)
  return Preprocessing(mean=tuple(file.mean), std=tuple(file.std), resize_size=file.resize_size,
                       crop_size=file.crop_size, interpolation=file.interpolation)


def default_preprocessing(arch: str) -> Preprocessing:
  """What weights without their own preprocessing (random ones, a bare state dict) are given:
  that of the weights `imagenet` names for `arch`, the tutorial's for the ResNets."""
  return preprocessing_of(arch) if arch in WEIGHT_FILES and arch in ARCHS else IMAGENET_PREPROCESSING


def imagenet_url(arch: str, base_url: Optional[str] = None, name: str = 'imagenet') -> str:
  """torchvision's URL of the weights `name` for `arch`, or the same file name under `base_url` /
  $TL_JAX_WEIGHTS_BASE_URL."""
  if name == 'imagenet' and arch in IMAGENET_URLS:
    url = IMAGENET_URLS[arch]
  else:
    url = DEFAULT_BASE_URL + weight_file(arch, name)[1].filename
  base_url = base_url or os.environ.get(BASE_URL_ENV)
  if not base_url:
    return url
  return base_url.rstrip('/') + '/' + _url_filename(url)


def _is_weight_name(spec: str) -> bool:
  return spec == 'imagenet' or re.fullmatch(r'[A-Z][A-Z0-9_]*', spec) is not None


def resolve_weights(spec: str, arch: str, *, cache_dir: Optional[PathLike] = None,
                    base_url: Optional[str] = None, progress: bool = True) -> ResolvedWeights:
  """Turns a --weights value into a NumPy state dict (or None) and its preprocessing.

  Args:
    spec: 'imagenet' (torchvision's IMAGENET1K_V1 file, or its DEFAULT where there is no V1,
      cached like torch.hub), a torchvision weight enum name of the arch ('IMAGENET1K_V2',
      'IMAGENET1K_SWAG_E2E_V1', 'DEFAULT', ...), 'random' (no weights), or a path to a
      .pth/.safetensors state dict.
    arch: e.g. 'resnet18'; picks the file and the preprocessing.
    cache_dir: where torchvision's files are cached; default `torch_hub_dir() / 'checkpoints'`,
      so files torch already downloaded are reused.
    base_url: mirror to download from instead of download.pytorch.org (file name appended);
      also read from $TL_JAX_WEIGHTS_BASE_URL.
    progress: show a download progress bar.

  Raises:
    WeightsError with what went wrong and what to pass instead.
  """
  if spec == 'random':
    return ResolvedWeights(None, 'random', default_preprocessing(arch))
  if _is_weight_name(spec) and not Path(spec).expanduser().exists():
    url = imagenet_url(arch, base_url, spec)
    _import_torch()   # torchvision's files are .pth: fail before downloading one we cannot read
    filename = _url_filename(url)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else torch_hub_dir() / 'checkpoints'
    cached = cache / filename
    if cached.exists():
      # Like torch.hub, a cached file is not re-hashed; a broken one shows when it is read.
      try:
        state_dict = load_state_dict(cached)
      except WeightsError as e:
        raise WeightsError(f'the cached ImageNet weights {cached} could not be read; the file may be '
                           f'corrupt: delete it and run again to download a fresh copy.\n{e}') from e
    else:
      print(f'Downloading {url} to {cached}', file=sys.stderr)
      download(url, cached, sha256_prefix_from_name(filename), progress=progress)
      state_dict = load_state_dict(cached)
    return ResolvedWeights(state_dict, f'{spec}:{cached}', preprocessing_of(arch, spec))
  path = Path(spec).expanduser()
  if not path.exists():
    raise WeightsError(f'--weights {spec!r}: no such file; {_SPEC_HELP}')
  state_dict = load_state_dict(path)
  preprocessing = load_preprocessing(path) or default_preprocessing(arch)
  return ResolvedWeights(state_dict, str(path), preprocessing)
