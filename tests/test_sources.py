"""load_data on folders: train/ and val/ as they are, or one folder of classes split per class and seeded."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_jax.data import sources
from tl_jax.data.folder import ClassMismatchError, DatasetLayoutError, ImageFolder, ImageReadError, load_image
from tl_jax.data.sources import SourceError, load_data
from tl_jax.data.split import SPLIT_FILE, SplitError, split_samples


def _image(path: Path, value: int = 100):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 10, 3), value, np.uint8)).save(path)


def make_classes(root: Path, counts: dict) -> Path:
  for cls, n in counts.items():
    for i in range(n):
      _image(root / cls / f'{cls}_{i:02d}.png', 10 * i)
  return root


def _load(path, **kwargs):
  defaults = dict(workdir=None, seed=0, skip_bad_images=False, workers=1, log=lambda m: None)
  return load_data(str(path), **{**defaults, **kwargs})


# ------------------------------------------------------------------------ train/ and val/


def test_train_val_folders_are_read_as_torchvision_lists_them(tmp_path):
  make_classes(tmp_path / 'train', {'ants': 3, 'bees': 2})
  make_classes(tmp_path / 'val', {'ants': 1, 'bees': 2})
  data = _load(tmp_path)
  assert data.train.samples == ImageFolder(tmp_path / 'train').samples
  assert data.val.samples == ImageFolder(tmp_path / 'val').samples
  assert data.classes == ['ants', 'bees'] and data.load is load_image and data.skipped == 0
  described = data.describe()
  json.dumps(described)
  assert described == {'kind': 'folder', 'path': str(tmp_path), 'splits': {'train': 'train', 'val': 'val'},
                       'counts': {'train': 5, 'val': 3}, 'skipped': 0}


def test_folder_errors_name_the_folder(tmp_path):
  make_classes(tmp_path / 'train', {'ants': 1, 'bees': 1})
  with pytest.raises(SourceError, match=rf'--data {tmp_path}: no val/ folder there; pass a folder with train/'):
    _load(tmp_path)
  with pytest.raises(SourceError, match=r'no train/ folder there'):
    _load(tmp_path / 'nowhere')
  make_classes(tmp_path / 'val', {'ants': 1, 'wasps': 1})
  with pytest.raises(ClassMismatchError, match=r"only in .*train: \['bees'\]; only in .*val: \['wasps'\]"):
    _load(tmp_path)
  with pytest.raises(SourceError, match='apply to tfds: sets only'):
    _load(tmp_path, train_split='train[:50%]')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(SourceError, match='no train/ and val/ folders and no class sub-folders'):
    _load(tmp_path / 'empty')


def test_unreadable_image_stops_or_is_skipped(tmp_path):
  make_classes(tmp_path / 'train', {'ants': 2, 'bees': 2})
  make_classes(tmp_path / 'val', {'ants': 1, 'bees': 1})
  bad = tmp_path / 'train' / 'bees' / 'bees_01.png'
  bad.write_bytes(b'not an image')
  with pytest.raises(ImageReadError, match=rf'cannot read image {bad}: .*--skip-bad-images'):
    _load(tmp_path)
  lines = []
  data = _load(tmp_path, skip_bad_images=True, log=lines.append)
  assert str(bad) not in [p for p, _ in data.train.samples] and len(data.train.samples) == 3
  assert data.skipped == 1 and lines[-1] == 'skipped 1 unreadable image(s)'
  assert lines[0].startswith(f'warning: skipping unreadable image {bad}')


def test_default_path_is_downloaded_only_when_missing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  calls = []

  def fake_ensure(root):
    calls.append(root)
    make_classes(Path(root) / 'train', {'ants': 1, 'bees': 1})
    make_classes(Path(root) / 'val', {'ants': 1, 'bees': 1})
    return Path(root)

  monkeypatch.setattr('tl_jax.data.download.ensure_hymenoptera', fake_ensure)
  assert _load(sources.DEFAULT_DATA).classes == ['ants', 'bees'] and len(calls) == 1
  _load(sources.DEFAULT_DATA)
  assert len(calls) == 1  # present now: not fetched again
  with pytest.raises(SourceError, match='no train/ folder'):
    _load('other/missing')
  assert len(calls) == 1


# ------------------------------------------------------------------------ one folder, split


def test_split_is_stratified_and_keeps_torchvision_order(tmp_path):
  make_classes(tmp_path, {'ants': 10, 'bees': 5, 'wasps': 2})
  data = _load(tmp_path, val_fraction=0.2)
  val_labels = [label for _, label in data.val.samples]
  # round(n * 0.2) per class, at least one for val and one for train.
  assert [val_labels.count(c) for c in range(3)] == [2, 1, 1]
  everything = ImageFolder(tmp_path).samples
  assert sorted(data.train.samples + data.val.samples) == sorted(everything)
  assert not set(data.train.samples) & set(data.val.samples)
  assert data.train.samples == [s for s in everything if s in data.train.samples]  # order kept
  assert data.classes == ['ants', 'bees', 'wasps']
  assert data.describe()['kind'] == 'split-folder' and data.describe()['counts'] == {'train': 13, 'val': 4}
  assert [label for _, label in _load(tmp_path, val_fraction=0.5).val.samples].count(0) == 5


def test_same_seed_same_split_other_seed_other_split():
  samples = [(f'c{label}/{i}.jpg', label) for label in range(2) for i in range(20)]
  a = split_samples(samples, 2, 0.25, seed=0)
  assert a == split_samples(samples, 2, 0.25, seed=0)
  b = split_samples(samples, 2, 0.25, seed=1)
  assert set(a[1]) != set(b[1])
  assert [label for _, label in b[1]].count(0) == [label for _, label in b[1]].count(1) == 5
  with pytest.raises(SplitError, match='val_fraction must be between 0 and 1'):
    split_samples(samples, 2, 1.0, seed=0)


def test_split_is_saved_in_the_workdir_and_read_back_on_resume(tmp_path):
  root = make_classes(tmp_path / 'images', {'ants': 6, 'bees': 6})
  workdir = tmp_path / 'run'
  first = _load(root, workdir=workdir, seed=3)
  saved = json.loads((workdir / SPLIT_FILE).read_text())
  assert saved['seed'] == 3 and saved['val_fraction'] == 0.2 and saved['classes'] == ['ants', 'bees']
  assert saved['val'] == [Path(p).relative_to(root).as_posix() for p, _ in first.val.samples]
  assert first.describe()['split_file'] == str(workdir / SPLIT_FILE)

  # An image added later would change nothing for this seed's membership of old files, but it must
  # not join either phase of a resumed run: the saved lists win.
  _image(root / 'ants' / 'ants_99.png')
  lines = []
  again = _load(root, workdir=workdir, seed=3, log=lines.append)
  assert again.train.samples == first.train.samples and again.val.samples == first.val.samples
  assert any('1 image(s)' in line and 'not used' in line for line in lines)

  with pytest.raises(SplitError, match=r'other settings: seed: saved 3, now 4'):
    _load(root, workdir=workdir, seed=4)
  (root / 'bees' / 'bees_00.png').unlink()
  with pytest.raises(SplitError, match=r'1 image\(s\) listed in .*split.json are no longer in .*bees/bees_00.png'):
    _load(root, workdir=workdir, seed=3)


def test_split_needs_two_images_per_class(tmp_path):
  make_classes(tmp_path, {'ants': 4, 'bees': 1})
  with pytest.raises(DatasetLayoutError, match=r'fewer than 2 images cannot be split.*bees'):
    _load(tmp_path)
