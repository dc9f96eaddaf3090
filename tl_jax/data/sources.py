"""Where training data comes from, behind one entry point: `load_data(path, ...) -> Data`.

- `FOLDER` with train/ and val/ class sub-folders (the tutorial's hymenoptera_data): as is.
- `FOLDER` whose sub-folders are the classes: split per class and seeded (`tl_jax.data.split`),
  the file lists saved in the run directory.
- `tfds:NAME[/CONFIG][:VERSION]`: a prepared TensorFlow Datasets set (`tl_jax.data.tfds`).
- `FILE.csv` with `path,labels[,split]`: a multi-label set (`tl_jax.data.multilabel`).

Every kind gives the same thing: `train` and `val` with `.samples` ((key, label) pairs) and
`.classes`, and one `load(key) -> PIL RGB image` for `Loader(load=...)`, so batches go through
the same decode and transforms whatever the source. Unreadable images are found up front and
stop the run, or with `skip_bad_images` are dropped with a warning each.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image

from tl_jax.data import multilabel
from tl_jax.data.folder import DataError, check_same_classes, drop_bad_images, load_image
from tl_jax.data.split import SPLIT_FILE, split_folder
from tl_jax.data.tfds import PREFIX as TFDS_PREFIX

# The tutorial's data set; only this path is downloaded when it is missing.
DEFAULT_DATA = 'data/hymenoptera_data'


class SourceError(DataError):
  """--data names something that is not a usable data set."""


@dataclasses.dataclass
class Data:
  """Train and val samples, the loader that reads their keys, and where they came from.

  `train`/`val` are `ImageFolder`s or `TfdsSplit`s: `.samples` (key, label), `.classes`.
  """
  train: Any
  val: Any
  load: Callable[[Any], Image.Image]
  skipped: int
  source: dict

  @property
  def classes(self) -> list[str]:
    return self.train.classes

  @property
  def multi_label(self) -> bool:
    """Several labels per image: each sample's label is a row of C 0/1 values."""
    return bool(self.source.get('multi_label'))

  def describe(self) -> dict:
    """JSON-able record of the source (kind, path or TFDS name/version, splits, counts) for checkpoints."""
    return {**self.source, 'counts': {'train': len(self.train.samples), 'val': len(self.val.samples)},
            'skipped': self.skipped}


def load_data(path: str, *, workdir: Optional[Path], seed: int, skip_bad_images: bool, workers: int,
              train_split: Optional[str] = None, val_split: Optional[str] = None,
              tfds_data_dir: Optional[str] = None, tfds_download: bool = False, val_fraction: float = 0.2,
              log: Callable[[str], None] = print) -> Data:
  """The train and val samples of `path`, checked; bad images raise or (skip_bad_images) are dropped.

  Args:
    path: a folder with train/ and val/, a folder of class folders, 'tfds:NAME[/CONFIG][:VERSION]', or a
      labels CSV (multi-label, tl_jax.data.multilabel).
    workdir: run directory; a single folder's split is saved there and read back on resume.
    seed: the single folder's split.
    skip_bad_images: drop unreadable images with a warning instead of stopping.
    workers: threads that check images.
    train_split: TFDS split string (default 'train'); slicing allowed, e.g. 'train[:80%]'.
    val_split: TFDS split string (default 'validation', else 'test').
    tfds_data_dir: where TFDS sets are prepared (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    tfds_download: download and prepare a TFDS set that is not prepared (needs network).
    val_fraction: share of each class a single folder gives to val.
    log: receives warnings and notes.
  """
  path = os.fspath(path)
  if path.startswith(TFDS_PREFIX):
    train, val, load, source = _tfds_data(path[len(TFDS_PREFIX):], train_split, val_split, tfds_data_dir,
                                          tfds_download, log)
  elif multilabel.is_labels_csv(path):
    train, val, source = multilabel.read_labels_csv(path, val_fraction, seed)
    load = load_image
  else:
    if train_split is not None or val_split is not None:
      raise SourceError(f'--data {path}: data.train_split and data.val_split apply to tfds: sets only; a '
                        'folder uses its train/ and val/ sub-folders, or data.val_fraction')
    train, val, source = _folder_data(path, workdir, seed, val_fraction, log)
    load = load_image
  skipped = 0
  checked = {}
  for phase, split in (('train', train), ('val', val)):
    if source['kind'] == multilabel.KIND:
      checked[phase], dropped = multilabel.drop_bad_rows(split, skip_bad_images, lambda m: log(f'warning: {m}'),
                                                         max(workers, 1))
    else:
      checked[phase], dropped = drop_bad_images(
          split, skip_bad_images, warn=lambda m: log(f'warning: {m}'), num_threads=max(workers, 1),
          load=None if load is load_image else load)
    skipped += dropped
  if skipped:
    log(f'skipped {skipped} unreadable image(s)')
  return Data(checked['train'], checked['val'], load, skipped, source)


def _folder_data(path: str, workdir: Optional[Path], seed: int, val_fraction: float,
                 log: Callable[[str], None]):
  from tl_jax.data.download import ensure_hymenoptera
  from tl_jax.data.folder import ImageFolder
  root = Path(path)
  if not root.exists() and path == DEFAULT_DATA:
    root = ensure_hymenoptera(root)
  has = {split: (root / split).is_dir() for split in ('train', 'val')}
  if root.is_dir() and not any(has.values()):
    if not any(e.is_dir() and not e.name.startswith('.') for e in os.scandir(root)):
      raise SourceError(f'--data {root}: no train/ and val/ folders and no class sub-folders there; pass a '
                        'folder with train/ and val/ class sub-folders (as the tutorial\'s hymenoptera_data), '
                        'or one sub-folder per class to split with data.val_fraction')
    train, val = split_folder(root, val_fraction, seed, workdir, log)
    split_file = str(Path(workdir).absolute() / SPLIT_FILE) if workdir is not None else None
    return train, val, {'kind': 'split-folder', 'path': os.path.abspath(root), 'seed': seed,
                        'val_fraction': val_fraction, 'split_file': split_file}
  for split in ('train', 'val'):
    if not has[split]:
      raise SourceError(f'--data {root}: no {split}/ folder there; pass a folder with train/ and val/ '
                        'class sub-folders (as the tutorial\'s hymenoptera_data)')
  train, val = ImageFolder(root / 'train'), ImageFolder(root / 'val')
  check_same_classes(train, val)
  return train, val, {'kind': 'folder', 'path': os.path.abspath(root), 'splits': {'train': 'train', 'val': 'val'}}


def _tfds_data(spec: str, train_split: Optional[str], val_split: Optional[str], data_dir: Optional[str],
               download: bool, log: Callable[[str], None]):
  from tl_jax.data.tfds import default_val_split, open_tfds
  source = open_tfds(spec, data_dir, download=download, log=log)
  train_split = train_split or 'train'
  val_split = val_split or default_val_split(source)
  train, val = source.split(train_split), source.split(val_split)
  return train, val, source.load, {'kind': 'tfds', **source.describe(),
                                   'splits': {'train': train_split, 'val': val_split}}
