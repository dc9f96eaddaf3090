"""PNG figures: valid, non-blank files written atomically; denormalize inverts Normalize."""

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TOL
from tl_jax import plots
from tl_jax.data import transforms as T

MEAN, STD = T.IMAGENET_MEAN, T.IMAGENET_STD
CLASS_NAMES = ['ants', 'bees']


def _normalized_batch(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  images01 = rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
  return (images01 - np.float32(MEAN)) / np.float32(STD)


def _history(epochs: int = 5) -> list[dict]:
  return [{'epoch': e, 'train_loss': 0.7 / (e + 1), 'val_loss': 0.6 / (e + 1) + 0.05,
           'train_acc': 0.6 + 0.07 * e, 'val_acc': [0.7, 0.85, 0.93, 0.91, 0.93][e % 5],
           'lr': 0.001 * 0.1 ** (e // 2)} for e in range(epochs)]


def _check_png(path: Path, min_width: int = 200, min_height: int = 150) -> np.ndarray:
  assert path.is_file()
  with Image.open(path) as img:
    assert img.format == 'PNG'
    pixels = np.asarray(img.convert('RGB'), np.float32)
  height, width = pixels.shape[:2]
  assert width >= min_width and height >= min_height, (width, height)
  assert pixels.std() > 0, 'blank image'
  return pixels


def _leftovers(directory: Path) -> list[str]:
  return [p.name for p in directory.iterdir() if p.suffix != '.png']


# ---------------------------------------------------------------------------------- denormalize


def test_denormalize_matches_explicit_formula():
  images = np.random.default_rng(1).normal(0, 1.5, (3, 8, 8, 3)).astype(np.float32)
  ref = np.clip(images.astype(np.float64) * np.array(STD) + np.array(MEAN), 0, 1)
  out = plots.denormalize(images, MEAN, STD)
  assert out.shape == images.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=0, atol=TOL['pixel_abs'])
  assert out.min() == 0.0 and out.max() == 1.0  # the normal draws reach past both ends


def test_denormalize_inverts_normalize():
  rng = np.random.default_rng(2)
  image01 = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
  normalized = T.to_normalized_array(Image.fromarray(image01), MEAN, STD)
  np.testing.assert_allclose(plots.denormalize(normalized, MEAN, STD), image01 / 255.0,
                             rtol=0, atol=TOL['pixel_abs'])
  batch01 = rng.uniform(0, 1, (2, 5, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(plots.denormalize((batch01 - np.float32(MEAN)) / np.float32(STD), MEAN, STD),
                             batch01, rtol=0, atol=TOL['pixel_abs'])


def test_denormalize_rejects_wrong_channel_count():
  with pytest.raises(ValueError, match='mean has 3 values'):
    plots.denormalize(np.zeros((1, 4, 4, 2), np.float32), MEAN, STD)


# ---------------------------------------------------------------------------------- figures


def test_save_train_batch(tmp_path):
  images = _normalized_batch(6)
  path = plots.save_train_batch(images, np.array([0, 1, 1, 0, 1, 0]), CLASS_NAMES, MEAN, STD,
                                tmp_path / 'nested' / 'dir' / 'train_batch.png', max_images=4)
  _check_png(path, min_width=400, min_height=150)
  assert _leftovers(path.parent) == []


def test_save_predictions(tmp_path):
  images = _normalized_batch(8)
  predicted = np.array([0, 1, 1, 0, 0, 1, 1, 1])
  labels = np.array([0, 1, 0, 0, 1, 1, 0, 0])
  path = plots.save_predictions(images, predicted, labels, CLASS_NAMES, MEAN, STD, tmp_path / 'predictions.png')
  pixels = _check_png(path, min_width=500, min_height=300)
  red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
  green = (pixels[..., 1] > 100) & (pixels[..., 0] < 90) & (pixels[..., 2] < 90)
  # Random-noise images are greyish after denormalize; saturated colour comes from the titles.
  assert red.sum() > 20 and green.sum() > 20
  assert _leftovers(tmp_path) == []


def test_save_predictions_with_fewer_images_than_requested(tmp_path):
  path = plots.save_predictions(_normalized_batch(2), [1, 0], [1, 1], CLASS_NAMES, MEAN, STD,
                                tmp_path / 'p.png', num_images=6)
  _check_png(path, min_width=300)


def test_save_curves(tmp_path):
  path = plots.save_curves(_history(), tmp_path / 'curves.png')
  _check_png(path, min_width=800, min_height=300)
  without_lr = [{k: v for k, v in row.items() if k != 'lr'} for row in _history(1)]
  _check_png(plots.save_curves(without_lr, tmp_path / 'one_epoch.png'))
  assert _leftovers(tmp_path) == []


def test_save_overwrites_existing_file(tmp_path):
  path = tmp_path / 'curves.png'
  path.write_bytes(b'old')
  plots.save_curves(_history(2), path)
  _check_png(path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['curves.png']


@pytest.mark.slow
def test_figures_are_freed(tmp_path):
  from matplotlib.figure import Figure
  for i in range(2):
    plots.save_curves(_history(), tmp_path / f'c{i}.png')
    plots.save_predictions(_normalized_batch(2), [0, 1], [0, 1], CLASS_NAMES, MEAN, STD, tmp_path / f'p{i}.png')
  # One pass can leave a figure whose last holder only became garbage during that pass.
  for _ in range(3):
    gc.collect()
  assert not [obj for obj in gc.get_objects() if isinstance(obj, Figure)]


def test_does_not_touch_pyplot(tmp_path):
  code = ('import sys; from tl_jax import plots; '
          f'plots.save_curves([dict(epoch=0, train_loss=1., val_loss=1., train_acc=.5, val_acc=.5)], {str(tmp_path / "c.png")!r}); '
          "assert 'matplotlib.pyplot' not in sys.modules")
  root = Path(__file__).resolve().parents[1]
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')])}
  subprocess.run([sys.executable, '-c', code], check=True, env=env, cwd=root, timeout=60)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize('call', [
    lambda p: plots.save_train_batch(_normalized_batch(3), [0, 1], CLASS_NAMES, MEAN, STD, p),
    lambda p: plots.save_predictions(_normalized_batch(3), [0, 1, 1], [0, 1], CLASS_NAMES, MEAN, STD, p),
    lambda p: plots.save_predictions(_normalized_batch(3), [0, 1], [0, 1, 1], CLASS_NAMES, MEAN, STD, p),
], ids=['train_labels', 'predicted', 'labels'])
def test_mismatched_lengths_raise(tmp_path, call):
  with pytest.raises(ValueError, match='for 3 images'):
    call(tmp_path / 'x.png')
  assert list(tmp_path.iterdir()) == []


def test_bad_inputs_raise(tmp_path):
  with pytest.raises(ValueError, match='outside the 2 class names'):
    plots.save_train_batch(_normalized_batch(2), [0, 2], CLASS_NAMES, MEAN, STD, tmp_path / 'x.png')
  with pytest.raises(ValueError, match='no images'):
    plots.save_train_batch(np.zeros((0, 8, 8, 3), np.float32), [], CLASS_NAMES, MEAN, STD, tmp_path / 'x.png')
  with pytest.raises(ValueError, match=r'\(B, H, W, C\)'):
    plots.save_predictions(_normalized_batch(1)[0], [0], [0], CLASS_NAMES, MEAN, STD, tmp_path / 'x.png')
  assert list(tmp_path.iterdir()) == []


def test_empty_or_incomplete_history_raises(tmp_path):
  with pytest.raises(ValueError, match='empty'):
    plots.save_curves([], tmp_path / 'c.png')
  with pytest.raises(ValueError, match='val_acc'):
    plots.save_curves([{'epoch': 0, 'train_loss': 1.0, 'val_loss': 1.0, 'train_acc': 0.5}], tmp_path / 'c.png')
  assert list(tmp_path.iterdir()) == []


def test_failed_render_leaves_no_temp_file(tmp_path, monkeypatch):
  from matplotlib.figure import Figure

  def fail(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(Figure, 'savefig', fail)
  with pytest.raises(OSError, match='disk full'):
    plots.save_curves(_history(), tmp_path / 'c.png')
  assert list(tmp_path.iterdir()) == []
