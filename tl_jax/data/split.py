"""One folder of class sub-folders (no train/ and val/) split into train and val, per class and seeded.

Each class keeps `round(n * val_fraction)` of its n images for val (at least one, and at least
one for train), so both phases see every class in the folder's proportions. The split is a
pure function of (file list, seed, val_fraction); it is also written to the run directory as
file lists (`split.json`), and a resumed run reads it back instead of splitting again, so
images added to the folder later cannot move between train and val mid-run.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tl_jax.data.folder import DataError, DatasetLayoutError, ImageFolder

SPLIT_FILE = 'split.json'


class SplitError(DataError):
  """The saved split does not fit the folder or the settings of this run."""


def _round_half_up(x: float) -> int:
  return int(np.floor(x + 0.5))


def split_samples(samples: Sequence[tuple[str, int]], num_classes: int, val_fraction: float,
                  seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
  """(train, val) samples: per class, a seeded choice of round(n * val_fraction) images goes to val.

  Both lists keep the input order (torchvision's file order), so only membership depends on the seed.
  """
  if not 0.0 < val_fraction < 1.0:
    raise SplitError(f'data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}')
  labels = np.array([label for _, label in samples])
  is_val = np.zeros(len(samples), bool)
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    num_val = min(max(_round_half_up(len(members) * val_fraction), 1), len(members) - 1)
    # One generator per class: a class's split does not change when another class gains images.
    picked = np.random.default_rng([seed, label]).permutation(members)[:num_val]
    is_val[picked] = True
  train = [s for s, v in zip(samples, is_val) if not v]
  val = [s for s, v in zip(samples, is_val) if v]
  return train, val


def _relative(root: str, path: str) -> str:
  return Path(os.path.relpath(path, root)).as_posix()


def split_folder(root: str | Path, val_fraction: float, seed: int, workdir: Optional[Path] = None,
                 log: Callable[[str], None] = print) -> tuple[ImageFolder, ImageFolder]:
  """The folder's images split into (train, val), read from `workdir/split.json` when it is there.

  Args:
    root: folder with one sub-folder per class.
    val_fraction: share of each class that goes to val.
    seed: picks which images of a class go to val.
    workdir: run directory; the split is written there (or read back from there). None: not saved.
    log: receives a warning about images added after the split was saved.
  """
  folder = ImageFolder(root)
  counts = collections.Counter(folder.targets)
  small = [name for name in folder.classes if counts[folder.class_to_idx[name]] < 2]
  if small:
    raise DatasetLayoutError(
        f'class folder(s) with fewer than 2 images cannot be split into train and val: '
        f'{", ".join(os.path.join(folder.root, name) for name in small)}. Add images, or pass a folder '
        'with train/ and val/ sub-folders.')
  split_file = Path(workdir) / SPLIT_FILE if workdir is not None else None
  settings = {'path': os.path.abspath(folder.root), 'seed': seed, 'val_fraction': val_fraction,
              'classes': folder.classes}
  if split_file is not None and split_file.is_file():
    train, val = _read_split(split_file, folder, settings, log)
  else:
    train, val = split_samples(folder.samples, len(folder.classes), val_fraction, seed)
    if split_file is not None:
      split_file.parent.mkdir(parents=True, exist_ok=True)
      record = {**settings, 'train': [_relative(folder.root, p) for p, _ in train],
                'val': [_relative(folder.root, p) for p, _ in val]}
      tmp = split_file.with_name(split_file.name + '.tmp')
      tmp.write_text(json.dumps(record, indent=1))
      os.replace(tmp, split_file)
  return folder.with_samples(train), folder.with_samples(val)


def _read_split(split_file: Path, folder: ImageFolder, settings: dict,
                log: Callable[[str], None]) -> tuple[list, list]:
  try:
    saved = json.loads(split_file.read_text())
    lists = {phase: list(saved[phase]) for phase in ('train', 'val')}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SplitError(f'{split_file} is not a readable split ({e}); delete it to split again, or '
                     'choose another --workdir') from e
  changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
  if changed:
    raise SplitError(f'{split_file} was written for other settings: ' +
                     ', '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in changed.items()) +
                     '. Use the same data folder, seed and data.val_fraction, or choose another --workdir.')
  label_of = {_relative(folder.root, path): label for path, label in folder.samples}
  missing = [rel for phase in lists.values() for rel in phase if rel not in label_of]
  if missing:
    shown = ', '.join(missing[:5]) + (f' and {len(missing) - 5} more' if len(missing) > 5 else '')
    raise SplitError(f'{len(missing)} image(s) listed in {split_file} are no longer in {folder.root}: '
                     f'{shown}. Restore them, or choose another --workdir to split again.')
  used = set(lists['train']) | set(lists['val'])
  added = len(label_of) - len(used)
  if added:
    log(f'warning: {added} image(s) in {folder.root} are newer than {split_file} and are not used')
  root = folder.root
  return tuple([(os.path.join(root, *rel.split('/')), label_of[rel]) for rel in lists[phase]]
               for phase in ('train', 'val'))
