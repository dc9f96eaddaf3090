"""Decode each image once: a memory cache around the Loader's `load` callable.

JPEG decoding is most of the loader's work for the tutorial's small data set, and it gives
the same pixels every epoch. `cached_loader(load, samples, policy)` returns a `load` that
decodes a file the first time it is asked for and afterwards rebuilds the image from the
kept uint8 pixels (original size, 3 bytes per RGB pixel), so every transform sees exactly
the image it would have seen.

Policy (`data.cache_decoded`): 'false' never caches; 'true' always does; 'auto' caches when
the decoded data set fits the budget, by default min(2 GiB, a quarter of physical memory)
(`default_budget_bytes`). The size is read from the image headers up front, without
decoding: width x height x channels bytes per image.

A phase whose transforms draw nothing at random (the val phase: Resize, CenterCrop, Normalize)
goes one step further under the same policy (`should_cache_rows`): its loader keeps the
finished rows (`Loader(cache_rows=True)`, 224 x 224 x 3 float32 = 0.6 MB each), so resizing
and normalising happen once too, and its images need no decoded copy.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

POLICIES = ('auto', 'true', 'false')
BUDGET_CAP_BYTES = 2 << 30  # 2 GiB: the decoded hymenoptera_data is ~0.2 GB; ImageNet-1k would be ~110 GB
# PIL modes whose pixels round-trip through a uint8 array (Image.fromarray(np.asarray(img)) is img).
_ARRAY_MODES = {'RGB': 3, 'L': 1, 'RGBA': 4}

Load = Callable[[str], Image.Image]


class CachePolicyError(ValueError):
  """`data.cache_decoded` has a value other than auto, true or false."""


def default_budget_bytes() -> int:
  """min(2 GiB, a quarter of this machine's physical memory)."""
  try:
    physical = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):  # not available on this platform
    return BUDGET_CAP_BYTES
  return min(BUDGET_CAP_BYTES, physical // 4)


def decoded_bytes(paths: Sequence[str]) -> int:
  """Bytes the decoded images of `paths` take as uint8 RGB, from their headers (no decoding).

  A file whose header cannot be read counts as 0: loading it fails later with the loader's
  own error, which names the file.
  """
  total = 0
  for path in paths:
    try:
      with Image.open(path) as img:
        width, height = img.size
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ...
      continue
    total += width * height * 3
  return total


class DecodedCache:
  """`load` with each result kept as a uint8 array; a callable path -> PIL image.

  Thread-safe for the Loader's worker threads: two threads asking for the same new path may
  both decode it (the same pixels); a lock only guards the byte count. With `keys`, only those
  paths are kept; any other is loaded each time it is asked for.
  """

  def __init__(self, load: Load, keys: Optional[Sequence[str]] = None):
    self.load = load
    self._keys = None if keys is None else {os.fspath(key) for key in keys}
    self._arrays: dict[str, np.ndarray] = {}
    self._lock = threading.Lock()
    self.nbytes = 0
    self.hits = 0
    self.misses = 0

  def __call__(self, path: Union[str, os.PathLike]) -> Image.Image:
    path = os.fspath(path)
    if self._keys is not None and path not in self._keys:
      return self.load(path)
    array = self._arrays.get(path)
    if array is not None:
      self.hits += 1
      return Image.fromarray(array)  # mode from the shape: (H, W) L, (H, W, 3) RGB, (H, W, 4) RGBA
    img = self.load(path)
    self.misses += 1
    if img.mode in _ARRAY_MODES:
      array = np.asarray(img)
      array.setflags(write=False)  # shared by every later call; Image.fromarray copies it
      with self._lock:
        if path not in self._arrays:
          self._arrays[path] = array
          self.nbytes += array.nbytes
    return img

  def __len__(self) -> int:
    return len(self._arrays)


def should_cache(policy: Union[str, bool], samples: Sequence[tuple[str, int]],
                 budget_bytes: Optional[int] = None) -> bool:
  """The decision of `cached_loader` for `policy` ('auto' | 'true' | 'false', or a bool)."""
  if isinstance(policy, bool):
    return policy
  if policy not in POLICIES:
    raise CachePolicyError(f'data.cache_decoded must be one of {", ".join(POLICIES)}, got {policy!r}')
  if policy != 'auto':
    return policy == 'true'
  budget = default_budget_bytes() if budget_bytes is None else budget_bytes
  return decoded_bytes([os.fspath(path) for path, _ in samples]) <= budget


def should_cache_rows(policy: Union[str, bool], nbytes: int, budget_bytes: Optional[int] = None) -> bool:
  """Whether a phase with deterministic transforms keeps its finished rows (`nbytes` in all), by the
  same policy as decoded images: 'auto' when they fit `budget_bytes`."""
  if isinstance(policy, bool) or policy != 'auto':
    return should_cache(policy, [])
  return nbytes <= (default_budget_bytes() if budget_bytes is None else budget_bytes)


def cached_loader(load: Load, samples: Sequence[tuple[str, int]], policy: Union[str, bool] = 'auto',
                  budget_bytes: Optional[int] = None) -> Load:
  """`load`, or a `DecodedCache` of `samples`' images around it when `policy` says so, for `Loader(load=...)`.

  Args:
    load: path -> PIL image, e.g. `tl_jax.data.folder.load_image`.
    samples: the (path, label) pairs whose images are kept (their headers size the cache); other
      paths pass through to `load`.
    policy: 'auto' (cache if the decoded images fit `budget_bytes`), 'true', 'false', or a bool.
    budget_bytes: bound for 'auto'; default `default_budget_bytes()`.
  """
  if not should_cache(policy, samples, budget_bytes):
    return load
  return DecodedCache(load, [path for path, _ in samples])
