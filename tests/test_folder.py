"""ImageFolder against torchvision's, its loud layout errors, and unreadable-image handling."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from helpers import require_data
from tl_jax.data import folder
from tl_jax.data.folder import (ClassMismatchError, DataError, DatasetLayoutError, ImageFolder, ImageReadError,
                                check_same_classes, drop_bad_images, find_bad_images, load_image)


@pytest.fixture(scope='module')
def tv_datasets():
  pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  from torchvision import datasets
  return datasets


def _write_image(path: Path, size=(9, 7), mode='RGB', seed=0) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  img = Image.fromarray(pixels).convert(mode)
  fmt = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG', '.bmp': 'BMP', '.tif': 'TIFF', '.tiff': 'TIFF',
         '.webp': 'WEBP', '.ppm': 'PPM', '.pgm': 'PPM', '.gif': 'GIF'}[path.suffix.lower()]
  img.save(path, format=fmt)
  return path


def _write_text(path: Path, text='not an image') -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def _truncated_jpeg(path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(noise).save(buffer, format='JPEG', quality=95)
  path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  return path


def _truncated_png(path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(noise).save(buffer, format='PNG')
  path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) * 2 // 3])
  return path


# ---------------------------------------------------------------- same files as torchvision

@pytest.mark.parametrize('split', ['train', 'val'])
def test_matches_torchvision_on_real_data(tv_datasets, split):
  root = require_data() / split
  ours = ImageFolder(root)
  theirs = tv_datasets.ImageFolder(str(root))
  assert ours.classes == theirs.classes
  assert ours.class_to_idx == theirs.class_to_idx
  assert ours.samples == theirs.samples
  assert ours.targets == theirs.targets
  assert len(ours) == len(theirs)
  if root.parent.name == 'hymenoptera_data':
    assert len(ours) == {'train': 244, 'val': 153}[split]
    assert all(not path.endswith('.gif') for path, _ in ours.samples)


def test_real_data_decodes_and_loads_like_torchvision(tv_datasets):
  root = require_data()
  train, val = ImageFolder(root / 'train'), ImageFolder(root / 'val')
  check_same_classes(train, val)
  assert find_bad_images(train.samples + val.samples) == []
  for path, _ in train.samples[::60] + val.samples[::60]:
    ours = load_image(path)
    theirs = tv_datasets.folder.pil_loader(path)
    assert ours.mode == theirs.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def _messy_tree(root: Path) -> None:
  """Classes with nested folders, odd cases in extensions, non-images, a linked folder, odd names."""
  _write_image(root / 'b' / 'z.jpg')
  _write_image(root / 'b' / 'UPPER.JPG', seed=1)
  _write_image(root / 'b' / 'mixed.Png', seed=2)
  _write_image(root / 'b' / 'x.JpEg', seed=3)
  _write_image(root / 'b' / 'scan.TIFF', seed=4)
  _write_image(root / 'b' / 'pic.webp', seed=5)
  _write_image(root / 'b' / 'anim.gif', seed=6)          # not an image extension for torchvision
  _write_text(root / 'b' / 'notes.txt')
  _write_text(root / 'b' / 'x.jpg.bak')
  _write_image(root / 'b' / '.hidden.jpg', seed=7)       # hidden *files* count, as in torchvision
  _write_image(root / 'a' / 'sub' / 'deeper' / 'y.png', seed=8)
  _write_image(root / 'a' / 'sub' / 'x.jpg', seed=9)
  _write_image(root / 'a' / 'sub b' / 'x.jpg', seed=10)
  _write_image(root / 'a' / 'Sub' / 'q.bmp', seed=11)
  _write_image(root / 'a' / 'sub-c' / 'x.ppm', seed=12)
  _write_image(root / 'a' / '0.png', seed=13)
  _write_image(root / 'A' / 'k.pgm', seed=14, mode='L')
  _write_image(root / 'c d' / 'e.jpg', seed=15)
  _write_image(root.parent / f'{root.name}_elsewhere' / 'linked.jpg', seed=16)
  os.symlink(root.parent / f'{root.name}_elsewhere', root / 'c d' / 'link')
  _write_text(root / 'README.txt')                      # a file at the top is not a class


def test_matches_torchvision_on_messy_tree(tv_datasets, tmp_path):
  root = tmp_path / 'data'
  _messy_tree(root)
  ours = ImageFolder(root)
  theirs = tv_datasets.ImageFolder(str(root))
  assert ours.classes == theirs.classes == ['A', 'a', 'b', 'c d']
  assert ours.samples == theirs.samples
  names = [os.path.basename(p) for p, _ in ours.samples]
  assert {'UPPER.JPG', 'mixed.Png', 'x.JpEg', 'scan.TIFF', 'linked.jpg'} <= set(names)
  assert not {'anim.gif', 'notes.txt', 'x.jpg.bak'} & set(names)
  # A Path root and a str root give the same sample strings.
  assert ImageFolder(str(root)).samples == ours.samples


def test_hidden_top_level_folders_are_not_classes(tv_datasets, tmp_path):
  root = tmp_path / 'data'
  _write_image(root / 'ants' / 'a.jpg')
  _write_image(root / 'bees' / 'b.jpg')
  _write_image(root / '.ipynb_checkpoints' / 'c.jpg')
  (root / '.git' / 'objects').mkdir(parents=True)
  _write_text(root / '.git' / 'HEAD', 'ref: refs/heads/main')
  ours = ImageFolder(root)
  assert ours.classes == ['ants', 'bees']
  assert ours.class_to_idx == {'ants': 0, 'bees': 1}
  # torchvision makes both hidden folders classes and then fails on the one without images.
  with pytest.raises(FileNotFoundError, match='.git'):
    tv_datasets.ImageFolder(str(root))
  (root / '.git' / 'HEAD').unlink()
  (root / '.git' / 'objects').rmdir()
  (root / '.git').rmdir()
  theirs = tv_datasets.ImageFolder(str(root))
  assert theirs.classes == ['.ipynb_checkpoints', 'ants', 'bees']
  expected = [(p, ours.class_to_idx[theirs.classes[t]]) for p, t in theirs.samples
              if not theirs.classes[t].startswith('.')]
  assert ours.samples == expected


# ---------------------------------------------------------------- layout errors

def test_missing_root(tmp_path):
  with pytest.raises(DatasetLayoutError, match='does not exist') as info:
    ImageFolder(tmp_path / 'nope')
  assert str(tmp_path / 'nope') in str(info.value)
  assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


def test_root_is_a_file(tmp_path):
  path = _write_image(tmp_path / 'a.jpg')
  with pytest.raises(DatasetLayoutError, match='not a directory'):
    ImageFolder(path)


def test_no_class_folders(tmp_path):
  root = tmp_path / 'data'
  (root / '.ipynb_checkpoints').mkdir(parents=True)  # only hidden: still no classes
  with pytest.raises(DatasetLayoutError, match='no class folders') as info:
    ImageFolder(root)
  assert str(root) in str(info.value)
  _write_image(root / 'a.jpg')
  _write_image(root / 'b.png')
  with pytest.raises(DatasetLayoutError, match='2 image files directly'):
    ImageFolder(root)


def test_class_folder_without_images_is_named(tmp_path):
  root = tmp_path / 'data'
  _write_image(root / 'ants' / 'a.jpg')
  _write_text(root / 'bees' / 'notes.txt')
  _write_image(root / 'bees' / 'anim.gif')
  (root / 'wasps').mkdir()
  with pytest.raises(DatasetLayoutError) as info:
    ImageFolder(root)
  message = str(info.value)
  assert str(root / 'bees') in message and str(root / 'wasps') in message
  assert str(root / 'ants') not in message
  assert '.jpg' in message


def test_check_same_classes(tmp_path):
  for name in ('ants', 'bees'):
    _write_image(tmp_path / 'train' / name / 'a.jpg')
  for name in ('ants', 'wasps'):
    _write_image(tmp_path / 'val' / name / 'a.jpg')
  _write_image(tmp_path / 'val2' / 'ants' / 'a.jpg')
  _write_image(tmp_path / 'val2' / 'bees' / 'a.jpg')
  train = ImageFolder(tmp_path / 'train')
  check_same_classes(train, ImageFolder(tmp_path / 'val2'))
  with pytest.raises(ClassMismatchError) as info:
    check_same_classes(train, ImageFolder(tmp_path / 'val'))
  message = str(info.value)
  assert "['bees']" in message and "['wasps']" in message
  assert str(tmp_path / 'val') in message and isinstance(info.value, DataError)


# ---------------------------------------------------------------- unreadable images

def _tree_with_bad_images(root: Path) -> dict[str, Path]:
  paths = {
      'good': _write_image(root / 'ants' / 'good.jpg'),
      'truncated': _truncated_jpeg(root / 'ants' / 'truncated.jpg'),
      'fake': _write_text(root / 'bees' / 'fake.png', 'this is text, not a PNG'),
      'good2': _write_image(root / 'bees' / 'good2.png', seed=3),
      'truncated_png': _truncated_png(root / 'bees' / 'cut.png'),
  }
  return {k: Path(v) for k, v in paths.items()}


def test_find_bad_images(tmp_path):
  paths = _tree_with_bad_images(tmp_path)
  dataset = ImageFolder(tmp_path)
  bad = find_bad_images(dataset.samples)
  # In the samples' order: ants/truncated.jpg, bees/cut.png, bees/fake.png.
  assert [p for p, _ in bad] == [str(paths[k]) for k in ('truncated', 'truncated_png', 'fake')]
  assert all(reason for _, reason in bad)
  # Serial, threaded and plain-path inputs agree.
  assert find_bad_images(dataset.samples, num_threads=1) == bad
  assert find_bad_images([p for p, _ in dataset.samples], num_threads=4) == bad


@pytest.mark.parametrize('kind', ['truncated', 'truncated_png', 'fake'])
def test_load_image_names_the_bad_file(tmp_path, kind):
  paths = _tree_with_bad_images(tmp_path)
  with pytest.raises(ImageReadError) as info:
    load_image(paths[kind])
  message = str(info.value)
  assert str(paths[kind]) in message
  assert '--skip-bad-images' in message and 'Delete or replace' in message
  assert isinstance(info.value, DataError)
  assert info.value.bad[0][0] == str(paths[kind])


def test_truncated_image_raises_even_if_pil_is_told_to_accept_it(tmp_path, monkeypatch):
  path = _truncated_jpeg(tmp_path / 'cut.jpg')
  monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
  with open(path, 'rb') as f:
    Image.open(f).convert('RGB')  # PIL alone now accepts it silently
  with pytest.raises(ImageReadError, match='truncated'):
    load_image(path)
  assert find_bad_images([str(path)])[0][0] == str(path)
  assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_load_image_is_rgb_fully_loaded_like_torchvision(tv_datasets, tmp_path):
  cases = [('p.png', 'P'), ('l.png', 'L'), ('rgba.png', 'RGBA'), ('cmyk.jpg', 'CMYK'), ('la.png', 'LA'),
           ('t.tif', 'RGB'), ('b.bmp', 'RGB'), ('w.webp', 'RGB')]
  for index, (name, mode) in enumerate(cases):
    path = _write_image(tmp_path / name, size=(13, 11), mode=mode, seed=index)
    ours = load_image(path)
    theirs = tv_datasets.folder.pil_loader(str(path))
    os.remove(path)  # fully loaded: nothing left to read from the file
    assert ours.mode == 'RGB' and ours.size == (13, 11)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_drop_bad_images_raises_without_skip(tmp_path):
  paths = _tree_with_bad_images(tmp_path)
  dataset = ImageFolder(tmp_path)
  with pytest.raises(ImageReadError) as info:
    drop_bad_images(dataset, skip_bad=False)
  message = str(info.value)
  for kind in ('truncated', 'truncated_png', 'fake'):
    assert str(paths[kind]) in message
  assert str(paths['good']) not in message
  assert '3 image files cannot be read' in message and '--skip-bad-images' in message


def test_drop_bad_images_skips_with_a_warning_each(tmp_path):
  paths = _tree_with_bad_images(tmp_path)
  dataset = ImageFolder(tmp_path)
  before = list(dataset.samples)
  warnings = []
  kept, num_skipped = drop_bad_images(dataset, skip_bad=True, warn=warnings.append)
  assert num_skipped == 3 and len(warnings) == 3
  for kind in ('truncated', 'truncated_png', 'fake'):
    assert sum(str(paths[kind]) in w for w in warnings) == 1
  assert kept.samples == [(str(paths['good']), 0), (str(paths['good2']), 1)]
  assert kept.classes == dataset.classes and kept.root == dataset.root
  assert dataset.samples == before  # the input is not modified
  same, zero = drop_bad_images(kept, skip_bad=True, warn=warnings.append)
  assert zero == 0 and same.samples == kept.samples and len(warnings) == 3


def test_drop_bad_images_refuses_to_empty_a_class(tmp_path):
  _write_image(tmp_path / 'ants' / 'good.jpg')
  _truncated_jpeg(tmp_path / 'bees' / 'cut.jpg')
  with pytest.raises(DatasetLayoutError, match='bees'):
    drop_bad_images(ImageFolder(tmp_path), skip_bad=True, warn=lambda message: None)


def test_default_warning_goes_to_stderr(tmp_path, capsys):
  _write_image(tmp_path / 'ants' / 'good.jpg')
  path = _write_text(tmp_path / 'ants' / 'fake.jpg')
  kept, num_skipped = drop_bad_images(ImageFolder(tmp_path), skip_bad=True)
  assert num_skipped == 1 and len(kept) == 1
  assert str(path) in capsys.readouterr().err


def test_extension_check_is_torchvision_s(tv_datasets):
  for name in ('a.jpg', 'a.JPG', 'a.Jpeg', 'a.webp', 'a.TIF', 'a.gif', 'a.jpg.txt', 'jpg', '.png', 'a.svg'):
    assert folder.has_image_extension(name) == tv_datasets.folder.is_image_file(name), name
  assert folder.IMG_EXTENSIONS == tv_datasets.folder.IMG_EXTENSIONS
