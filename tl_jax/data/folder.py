"""torchvision's ImageFolder without torch: classes are sub-folders, samples are (path, label).

Files are found and ordered exactly as torchvision's `make_dataset` (sorted `os.walk` with
followlinks, torchvision's IMG_EXTENSIONS matched case-insensitively), so the sample lists are
identical. One deliberate difference: hidden folders ('.ipynb_checkpoints', '.git', ...) at the
top level are not classes; torchvision would make them classes (and fail on them when empty).
Unreadable images are found up front (`find_bad_images`) rather than mid-epoch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from PIL import Image, ImageFile

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

_SKIP_HINT = 'pass --skip-bad-images to drop unreadable images with a warning'
_MAX_LISTED = 20


class DataError(ValueError):
  """The data set on disk cannot be used as it is; the message says which path and what to do."""


class DatasetLayoutError(DataError):
  """The folder is missing, or has no class folders, or a class folder has no images."""


class ClassMismatchError(DataError):
  """The train and val folders do not have the same classes."""


class ImageReadError(DataError):
  """One or more image files cannot be decoded; `bad` lists (path, reason)."""

  def __init__(self, bad: Sequence[tuple[str, str]]):
    self.bad = list(bad)
    if len(self.bad) == 1:
      path, reason = self.bad[0]
      message = (f'cannot read image {path}: {reason}. Delete or replace this file, or {_SKIP_HINT}.')
    else:
      lines = [f'  {path}: {reason}' for path, reason in self.bad[:_MAX_LISTED]]
      if len(self.bad) > _MAX_LISTED:
        lines.append(f'  ... and {len(self.bad) - _MAX_LISTED} more')
      message = (f'{len(self.bad)} image files cannot be read:\n' + '\n'.join(lines)
                 + f'\nDelete or replace these files, or {_SKIP_HINT}.')
    super().__init__(message)


def has_image_extension(filename: str) -> bool:
  """torchvision's `is_image_file`: the lower-cased name ends with one of IMG_EXTENSIONS."""
  return filename.lower().endswith(IMG_EXTENSIONS)


def find_classes(root: Union[str, Path]) -> tuple[list[str], dict[str, int]]:
  """Sorted names of the non-hidden sub-folders of `root` (symlinks followed) and their indices."""
  with os.scandir(root) as entries:
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))
  if not classes:
    with os.scandir(root) as entries:
      num_images = sum(1 for e in entries if e.is_file() and has_image_extension(e.name))
    hint = (f' It holds {num_images} image files directly; move them into one sub-folder per class.'
            if num_images else '')
    raise DatasetLayoutError(
        f'no class folders in {root}: expected one sub-folder per class holding its images '
        f'(hidden folders starting with "." are ignored).{hint}')
  return classes, {name: index for index, name in enumerate(classes)}


def make_dataset(root: Union[str, Path], class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
  """(path, label) for every image file under each class folder, in torchvision's order."""
  root = os.path.expanduser(root)
  samples = []
  empty = []
  for class_name in sorted(class_to_idx):
    label = class_to_idx[class_name]
    class_dir = os.path.join(root, class_name)
    if not os.path.isdir(class_dir):
      continue
    count = 0
    for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
      for filename in sorted(filenames):
        path = os.path.join(dirpath, filename)
        if has_image_extension(path):
          samples.append((path, label))
          count += 1
    if not count:
      empty.append(class_dir)
  if empty:
    raise DatasetLayoutError(
        f'class folder(s) with no image files: {", ".join(empty)}. Image files end with one of '
        f'{", ".join(IMG_EXTENSIONS)} (any case). Add images or remove the folder(s).')
  return samples


class ImageFolder:
  """torchvision.datasets.ImageFolder's file list: `classes`, `class_to_idx`, `samples`, `targets`.

  Args:
    root: folder with one sub-folder per class (e.g. hymenoptera_data/train).
  """

  def __init__(self, root: Union[str, Path]):
    root = os.path.expanduser(os.fspath(root))
    if not os.path.exists(root):
      raise DatasetLayoutError(f'data folder {root} does not exist. Pass the folder holding one '
                               f'sub-folder per class, or download the data set first.')
    if not os.path.isdir(root):
      raise DatasetLayoutError(f'data folder {root} is not a directory. Pass the folder holding '
                               f'one sub-folder per class.')
    self.root = root
    self.classes, self.class_to_idx = find_classes(root)
    self.samples = make_dataset(root, self.class_to_idx)

  @property
  def targets(self) -> list[int]:
    return [label for _, label in self.samples]

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> tuple[Image.Image, int]:
    path, label = self.samples[index]
    return load_image(path), label

  def with_samples(self, samples: Sequence[tuple[str, int]]) -> ImageFolder:
    """A copy with the same root and classes and the given samples."""
    subset = copy.copy(self)
    subset.samples = list(samples)
    return subset

  def __repr__(self) -> str:
    return f'ImageFolder({self.root!r}, {len(self.classes)} classes, {len(self)} images)'


# PIL's LOAD_TRUNCATED_IMAGES is process-wide; some libraries set it to True, which turns a
# truncated file into a silently grey-filled image. While any of our loads runs it is forced to
# False (reference-counted across threads) and then restored.
_strict_lock = threading.Lock()
_strict_depth = 0
_saved_truncated_flag = False


@contextlib.contextmanager
def _truncated_images_raise() -> Iterator[None]:
  global _strict_depth, _saved_truncated_flag
  with _strict_lock:
    if _strict_depth == 0:
      _saved_truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
      ImageFile.LOAD_TRUNCATED_IMAGES = False
    _strict_depth += 1
  try:
    yield
  finally:
    with _strict_lock:
      _strict_depth -= 1
      if _strict_depth == 0:
        ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncated_flag


def _decode(path: str) -> Image.Image:
  with open(path, 'rb') as f:
    return _decode_file(f)


def _decode_file(f) -> Image.Image:
  with _truncated_images_raise():
    img = Image.open(f)
    img.load()
    return img.convert('RGB')


def _read_failure(path: str) -> Optional[str]:
  """None if `path` decodes, else why not."""
  try:
    _decode(path)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
    return f'{type(e).__name__}: {e}'
  return None


def load_image(path: Union[str, Path]) -> Image.Image:
  """The image at `path` fully decoded as RGB, as torchvision's `pil_loader`; raises ImageReadError."""
  path = os.fspath(path)
  try:
    return _decode(path)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
    raise ImageReadError([(path, f'{type(e).__name__}: {e}')]) from e


def load_image_bytes(data: bytes, name: str) -> Image.Image:
  """Encoded image `data` (e.g. a TFDS record's) decoded as `load_image` decodes a file; errors name `name`."""
  try:
    return _decode_file(io.BytesIO(data))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
    raise ImageReadError([(name, f'{type(e).__name__}: {e}')]) from e


def _load_failure(load: Callable[[str], Image.Image], key: str) -> Optional[str]:
  try:
    load(key)
  except ImageReadError as e:
    return e.bad[0][1]
  except Exception as e:  # a loader that does not wrap PIL's errors
    return f'{type(e).__name__}: {e}'
  return None


def find_bad_images(samples: Sequence[Union[tuple[str, int], str]], num_threads: int = 2,
                    load: Optional[Callable[[str], Image.Image]] = None) -> list[tuple[str, str]]:
  """(key, reason) for each of `samples` ((key, label) pairs or keys) that does not decode.

  Keys are file paths read by `load_image`, or whatever `load` takes (e.g. TFDS record names).
  """
  keys = [s if isinstance(s, (str, os.PathLike)) else s[0] for s in samples]
  if load is None:
    keys, check = [os.fspath(k) for k in keys], _read_failure
  else:
    check = functools.partial(_load_failure, load)
  if num_threads <= 1:
    failures = [check(k) for k in keys]
  else:
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
      failures = list(pool.map(check, keys))
  return [(k, reason) for k, reason in zip(keys, failures) if reason is not None]


def _warn(message: str) -> None:
  print(f'warning: {message}', file=sys.stderr)


def drop_bad_images(dataset: ImageFolder, skip_bad: bool, warn: Callable[[str], None] = _warn,
                    num_threads: int = 2,
                    load: Optional[Callable[[str], Image.Image]] = None) -> tuple[ImageFolder, int]:
  """Checks every image of `dataset`; returns (dataset without unreadable images, number dropped).

  Args:
    dataset: the folder to check.
    skip_bad: False raises one ImageReadError naming every unreadable file; True drops them,
      calling `warn` once per dropped file.
    warn: receives one message per dropped file.
    num_threads: decoding threads.
    load: key -> image for samples that are not files (see `find_bad_images`).
  """
  kept, dropped = readable_samples(dataset.samples, skip_bad, warn, num_threads, load)
  if not dropped:
    return dataset, 0
  left = {label for _, label in kept}
  emptied = [name for name in dataset.classes if dataset.class_to_idx[name] not in left]
  if emptied:
    folders = ', '.join(os.path.join(dataset.root, name) for name in emptied)
    raise DatasetLayoutError(f'no readable image left in class folder(s) {folders}; replace the '
                             f'unreadable files listed above or remove the class.')
  return dataset.with_samples(kept), dropped


def readable_samples(samples: Sequence[tuple], skip_bad: bool, warn: Callable[[str], None], num_threads: int = 2,
                     load: Optional[Callable[[str], Image.Image]] = None) -> tuple[list, int]:
  """(the samples whose image (key first) decodes, number dropped): ImageReadError naming every
  unreadable file, or with `skip_bad` one `warn` per dropped file."""
  bad = find_bad_images(samples, num_threads, load)
  if bad and not skip_bad:
    raise ImageReadError(bad)
  for key, reason in bad:
    warn(f'skipping unreadable image {key}: {reason}')
  bad_keys = {key for key, _ in bad}
  return [sample for sample in samples if sample[0] not in bad_keys], len(bad)


def check_same_classes(train: ImageFolder, val: ImageFolder) -> None:
  """Raises ClassMismatchError unless `val` has exactly the classes (hence labels) of `train`."""
  if train.classes == val.classes:
    return
  only_train = sorted(set(train.classes) - set(val.classes))
  only_val = sorted(set(val.classes) - set(train.classes))
  raise ClassMismatchError(
      f'the validation classes differ from the training classes: only in {train.root}: '
      f'{only_train or "none"}; only in {val.root}: {only_val or "none"}. Both folders need the '
      f'same class sub-folders.')
