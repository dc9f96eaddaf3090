"""The decoded-image cache: identical pixels to decoding every time, and its auto/true/false policy."""

import numpy as np
import pytest
from PIL import Image

from helpers import require_data
from tl_jax.data.cache import (CachePolicyError, DecodedCache, cached_loader, decoded_bytes, should_cache,
                                should_cache_rows)
from tl_jax.data.folder import ImageFolder, load_image
from tl_jax.data.loader import Loader
from tl_jax.data.transforms import TrainTransform


def _write_images(folder):
  """Small files of every kind the cache sees: RGB JPEG, RGB PNG, a grayscale and an RGBA PNG."""
  rng = np.random.default_rng(0)
  paths = []
  for name, mode, size in (('a.jpg', 'RGB', (23, 17)), ('b.png', 'RGB', (8, 30)), ('c.png', 'L', (12, 12)),
                           ('d.png', 'RGBA', (9, 14))):
    channels = {'RGB': 3, 'L': 1, 'RGBA': 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    path = folder / name
    Image.fromarray(pixels).save(path)
    paths.append(str(path))
  return paths


def _raw_open(path):
  # Keeps the file's own mode (load_image converts to RGB), so L and RGBA are exercised too.
  with Image.open(path) as img:
    img.load()
    return img.copy()


@pytest.mark.parametrize('load', [load_image, _raw_open], ids=['load_image', 'native_mode'])
def test_cached_images_have_the_pixels_and_mode_of_a_fresh_decode(tmp_path, load):
  paths = _write_images(tmp_path)
  cache = DecodedCache(load)
  for _ in range(3):
    for path in paths:
      ours, fresh = cache(path), load(path)
      assert ours.mode == fresh.mode and ours.size == fresh.size, path
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(fresh))
  assert (len(cache), cache.misses, cache.hits) == (len(paths), len(paths), 2 * len(paths))
  # A transform that draws on its image must not change what the cache returns next time.
  cache(paths[0]).paste(0, (0, 0, 5, 5))
  np.testing.assert_array_equal(np.asarray(cache(paths[0])), np.asarray(load(paths[0])))


def test_decoded_bytes_come_from_headers_and_match_the_decoded_arrays(tmp_path):
  paths = _write_images(tmp_path)
  assert decoded_bytes(paths) == sum(np.asarray(load_image(p)).nbytes for p in paths)
  (tmp_path / 'broken.jpg').write_bytes(b'not an image')
  assert decoded_bytes(paths + [str(tmp_path / 'broken.jpg')]) == decoded_bytes(paths)


def test_policy_auto_caches_only_within_the_budget(tmp_path):
  samples = [(p, 0) for p in _write_images(tmp_path)]
  size = decoded_bytes([p for p, _ in samples])
  assert isinstance(cached_loader(load_image, samples, 'auto', budget_bytes=size), DecodedCache)
  assert cached_loader(load_image, samples, 'auto', budget_bytes=size - 1) is load_image
  assert isinstance(cached_loader(load_image, samples, 'true', budget_bytes=0), DecodedCache)
  assert cached_loader(load_image, samples, 'false') is load_image
  # Only the given samples' images are kept; another path is decoded each time it is asked for.
  cached = cached_loader(load_image, samples[:1], 'true')
  for _ in range(2):
    for path, _label in samples:
      np.testing.assert_array_equal(np.asarray(cached(path)), np.asarray(load_image(path)))
  assert (len(cached), cached.hits, cached.misses) == (1, 1, 1)
  assert should_cache(True, samples) and not should_cache(False, samples)
  assert should_cache('auto', samples)  # a few hundred bytes fit the default budget
  with pytest.raises(CachePolicyError, match=r"cache_decoded.*auto, true, false.*'yes'"):
    cached_loader(load_image, samples, 'yes')


def test_loader_batches_are_identical_with_the_cache_on_real_images():
  root = require_data()
  samples = ImageFolder(root / 'train').samples[::20]
  transform = TrainTransform(crop_size=32)
  plain = Loader(samples, transform, batch_size=4, shuffle=True, seed=3, workers=2)
  cached = Loader(samples, transform, batch_size=4, shuffle=True, seed=3, workers=2,
                  load=cached_loader(load_image, samples, 'true'))
  for epoch in range(2):
    for a, b in zip(plain.epoch(epoch), cached.epoch(epoch), strict=True):
      np.testing.assert_array_equal(a.images, b.images)
      np.testing.assert_array_equal(a.labels, b.labels)
  assert cached.load.misses == len(samples) and cached.load.hits == len(samples)


def test_rows_are_kept_by_the_same_policy_within_the_budget():
  assert should_cache_rows('auto', 100, budget_bytes=100) and not should_cache_rows('auto', 101, budget_bytes=100)
  assert should_cache_rows('true', 10**15) and should_cache_rows(True, 10**15)
  assert not should_cache_rows('false', 0) and not should_cache_rows(False, 0)
  with pytest.raises(CachePolicyError, match='cache_decoded'):
    should_cache_rows('yes', 0)
