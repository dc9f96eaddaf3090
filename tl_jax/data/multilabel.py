"""A multi-label data set from a CSV: `--data labels.csv`.

The file has a header with `path` and `labels` (and optionally `split`); paths are relative to the
CSV's folder, labels are class names separated by spaces (an empty cell: no class present):

  path,labels
  img/0001.jpg,cat dog
  img/0002.jpg,dog

Classes are the sorted names seen in the whole file. A sample's label is a row of C 0/1 values
(a tuple, so samples stay hashable), which the loader batches as (B, C) float32. Train and val come
from a `split` column (`train` / `val`) or, without one, a seeded split of `val_fraction` of the rows
(a pure function of the file, the seed and the fraction, so a resumed run gets the same split).
"""

from __future__ import annotations

import copy
import csv
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tl_jax.data.folder import DataError, readable_samples

KIND = 'labels-csv'
_SPLITS = {'train': 'train', 'val': 'val', 'valid': 'val', 'validation': 'val'}


class LabelsCsvError(DataError):
  """The labels CSV cannot be used as it is; the message names the file, row and what to do."""


def is_labels_csv(path: str) -> bool:
  return os.fspath(path).lower().endswith('.csv')


class MultiLabelSplit:
  """One phase of a labels CSV: `classes`, `samples` (path, 0/1 row), `targets` (N, C)."""

  def __init__(self, root: str, classes: Sequence[str], samples: Sequence[tuple[str, tuple]]):
    self.root = root
    self.classes = list(classes)
    self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
    self.samples = list(samples)

  @property
  def targets(self) -> np.ndarray:
    return np.asarray([label for _, label in self.samples], np.float32).reshape(-1, len(self.classes))

  def with_samples(self, samples) -> 'MultiLabelSplit':
    subset = copy.copy(self)
    subset.samples = list(samples)
    return subset

  def __len__(self) -> int:
    return len(self.samples)

  def __repr__(self) -> str:
    return f'MultiLabelSplit({self.root!r}, {len(self.classes)} classes, {len(self)} images)'


def _round_half_up(x: float) -> int:
  return int(np.floor(x + 0.5))


def read_labels_csv(path: str | Path, val_fraction: float, seed: int) -> tuple[MultiLabelSplit, MultiLabelSplit, dict]:
  """(train, val, source record) of a labels CSV (see the module docstring)."""
  path = Path(path)
  if not path.is_file():
    raise LabelsCsvError(f'--data {path}: no such file; pass a CSV with a header path,labels')
  with open(path, newline='', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
    header = rows and list(rows[0]) or []
  if not rows:
    raise LabelsCsvError(f'{path}: no rows; it needs a header path,labels and one row per image')
  missing = [c for c in ('path', 'labels') if c not in header]
  if missing:
    raise LabelsCsvError(f'{path}: the header has {",".join(header)}; it needs the columns path and labels '
                         '(and optionally split)')
  root = str(path.parent.resolve())
  names = sorted({name for row in rows for name in (row['labels'] or '').split()})
  if not names:
    raise LabelsCsvError(f'{path}: no labels in any row; write the class names of each image, separated by spaces')
  index = {name: i for i, name in enumerate(names)}
  samples, phases = [], []
  for line, row in enumerate(rows, start=2):
    if not row['path']:
      raise LabelsCsvError(f'{path}, line {line}: empty path')
    present = np.zeros(len(names), np.float32)
    for name in (row['labels'] or '').split():
      present[index[name]] = 1.0
    samples.append((os.path.join(root, *row['path'].split('/')), tuple(present.tolist())))
    if 'split' in header:
      phase = _SPLITS.get((row['split'] or '').strip().lower())
      if phase is None:
        raise LabelsCsvError(f'{path}, line {line}: split {row["split"]!r}; use train or val')
      phases.append(phase)
  if phases:
    is_val = np.array([p == 'val' for p in phases])
    how = {'split': 'column'}
  else:
    if len(samples) < 2:
      raise LabelsCsvError(f'{path}: {len(samples)} row(s) cannot be split into train and val')
    num_val = min(max(_round_half_up(len(samples) * val_fraction), 1), len(samples) - 1)
    is_val = np.zeros(len(samples), bool)
    is_val[np.random.default_rng([seed, len(samples)]).permutation(len(samples))[:num_val]] = True
    how = {'split': 'val_fraction', 'val_fraction': val_fraction, 'seed': seed}
  if is_val.all() or not is_val.any():
    raise LabelsCsvError(f'{path}: the split column gives no {"train" if is_val.all() else "val"} rows')
  train = MultiLabelSplit(root, names, [s for s, v in zip(samples, is_val) if not v])
  val = MultiLabelSplit(root, names, [s for s, v in zip(samples, is_val) if v])
  return train, val, {'kind': KIND, 'path': str(path.resolve()), 'multi_label': True, **how}


def drop_bad_rows(split: MultiLabelSplit, skip_bad: bool, warn: Callable[[str], None],
                  num_threads: int = 2) -> tuple[MultiLabelSplit, int]:
  """`folder.drop_bad_images` for a labels CSV: a missing or unreadable image raises, or is dropped."""
  kept, dropped = readable_samples(split.samples, skip_bad, warn, num_threads)
  if not dropped:
    return split, 0
  if not kept:
    raise LabelsCsvError(f'no readable image left in {split.root}; fix the paths in the CSV')
  return split.with_samples(kept), dropped


def evaluation_rows(path: str | Path, class_names: Sequence[str]) -> MultiLabelSplit:
  """The rows of a labels CSV to evaluate a checkpoint on, as 0/1 rows over the checkpoint's `class_names`:
  the val rows when the file has a `split` column, else every row. A class the checkpoint does not know
  is an error."""
  train, val, source = read_labels_csv(path, 0.5, 0)
  unknown = sorted(set(train.classes) - set(class_names))
  if unknown:
    raise LabelsCsvError(f'{path}: classes {unknown} are not among the checkpoint\'s {list(class_names)}')
  order = [train.classes.index(name) if name in train.classes else None for name in class_names]
  if source['split'] == 'column':
    samples = val.samples
  else:   # every row, in the file's order
    position = {key: i for i, key in enumerate(_file_paths(path))}
    samples = sorted(train.samples + val.samples, key=lambda s: position[s[0]])
  remap = [(key, tuple(0.0 if i is None else row[i] for i in order)) for key, row in samples]
  return MultiLabelSplit(train.root, list(class_names), remap)


def _file_paths(path: str | Path) -> list[str]:
  root = str(Path(path).parent.resolve())
  with open(path, newline='', encoding='utf-8') as f:
    return [os.path.join(root, *row['path'].split('/')) for row in csv.DictReader(f)]
