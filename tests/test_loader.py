"""The loader: fixed shapes, masks, every sample once per epoch, reproducible batches."""

import threading
import time

import numpy as np
import pytest
from PIL import Image

from tl_jax.data import augment
from tl_jax.data.loader import Loader, pipeline_row


def _samples(n):
  return [(f'img{i}', i % 3) for i in range(n)]


def _fake_load(path):
  # A 1x1 image whose value encodes the sample, so rows can be traced back to files.
  return Image.new('L', (1, 1), int(path[3:]))


def _transform(img, rng):
  value = np.float32(img.getpixel((0, 0)))
  noise = np.float32(rng.random()) if rng is not None else np.float32(0)
  return np.full((2, 2, 3), value, np.float32) + noise


@pytest.mark.parametrize('workers', [0, 3])
def test_every_sample_once_per_epoch_with_fixed_shapes_and_masked_padding(workers):
  loader = Loader(_samples(10), _transform, batch_size=4, shuffle=True, seed=0, workers=workers, load=_fake_load)
  batches = list(loader.epoch(0))
  assert len(batches) == len(loader) == 3
  assert all(b.images.shape == (4, 2, 2, 3) and b.labels.shape == (4,) for b in batches)
  assert [int(b.mask.sum()) for b in batches] == [4, 4, 2]
  last = batches[-1]
  assert not last.mask[2:].any() and np.all(last.images[2:] == 0) and np.all(last.indices[2:] == -1)
  seen = np.concatenate([b.indices[b.mask] for b in batches])
  assert sorted(seen.tolist()) == list(range(10))
  for b in batches:
    for row in np.flatnonzero(b.mask):
      assert b.labels[row] == b.indices[row] % 3
      assert int(b.images[row, 0, 0, 0]) == b.indices[row]  # the row holds its own image


def test_same_seed_same_batches_whatever_the_threads_and_new_order_each_epoch():
  make = lambda workers, seed=0: Loader(_samples(13), _transform, 4, True, seed=seed, workers=workers,
                                        load=_fake_load)
  a = [b.images for b in make(0).epoch(1)]
  b = [b.images for b in make(4).epoch(1)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(make(0).order(0), make(0).order(1))
  assert not np.array_equal(make(0, seed=1).order(1), make(0).order(1))


def test_eval_loader_keeps_dataset_order_and_passes_no_rng():
  loader = Loader(_samples(5), _transform, 2, shuffle=False, workers=2, load=_fake_load)
  indices = np.concatenate([b.indices[b.mask] for b in loader.epoch(0)])
  assert indices.tolist() == [0, 1, 2, 3, 4]
  first = next(iter(loader.epoch(0)))
  assert first.images[1, 0, 0, 0] == 1.0  # no noise: rng was None


def test_workers_run_ahead_of_a_slow_consumer_and_wait_time_is_measured():
  delay = 0.02

  def slow_load(path):
    time.sleep(delay)
    return _fake_load(path)

  loader = Loader(_samples(16), _transform, 4, True, workers=4, prefetch=4, load=slow_load)
  start = time.perf_counter()
  for _ in loader.epoch(0):
    time.sleep(0.1)  # a "train step" longer than one batch's loading
  assert loader.wait_seconds < 0.5 * (time.perf_counter() - start)
  # With no overlap (workers=0) the consumer waits for every image.
  serial = Loader(_samples(16), _transform, 4, True, workers=0, load=slow_load)
  list(serial.epoch(0))
  assert serial.wait_seconds >= 16 * delay * 0.9


def test_abandoned_epoch_stops_the_workers():
  calls = []
  lock = threading.Lock()

  def counting_load(path):
    with lock:
      calls.append(path)
    time.sleep(0.01)
    return _fake_load(path)

  loader = Loader(_samples(400), _transform, 4, True, workers=2, prefetch=2, load=counting_load)
  iterator = loader.epoch(0)
  next(iterator)
  iterator.close()
  assert len(calls) < 40


def test_decode_errors_surface_in_the_consumer():
  def broken(path):
    raise ValueError(f'cannot read {path}')

  loader = Loader(_samples(3), _transform, 2, True, workers=2, load=broken)
  with pytest.raises(ValueError, match='cannot read img'):
    list(loader.epoch(0))


def test_a_large_epoch_starts_without_listing_the_order_per_batch():
  # 5,000 batches of 4 out of 20,000 samples: listing the whole order once per batch took minutes
  # (1e8 pairs); once per epoch it takes milliseconds. The bound leaves room for a loaded machine.
  loader = Loader(_samples(20_000), _transform, 4, True, workers=1, load=_fake_load)
  start = time.perf_counter()
  iterator = loader.epoch(0)
  first = next(iterator)
  iterator.close()
  assert time.perf_counter() - start < 5.0
  assert first.indices.tolist() == loader.order(0)[:4].tolist()


def _photo(width, height, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


@pytest.mark.parametrize('spec', [
    # the tutorial's training list
    [{'RandomResizedCrop': {'size': 24}}, {'RandomHorizontalFlip': {}}, {'ToTensor': {}},
     {'Normalize': {'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}}],
    # a heavy list, one mean and std for every channel
    [{'Resize': {'size': [30, 30]}}, {'RandomCrop': {'size': 20}}, {'RandomRotation': {'degrees': 10}},
     {'ColorJitter': {'brightness': 0.5, 'contrast': 0.5, 'saturation': 0.5, 'hue': 0.5}},
     {'RandomGrayscale': {'p': 0.5}}, {'ToTensor': {}}, {'Normalize': {'mean': 0.5, 'std': 0.25}}],
    # one channel out
    [{'Resize': {'size': [12, 16]}}, {'Grayscale': {}}, {'ToTensor': {}}, {'Normalize': {'mean': [0.5], 'std': [0.3]}}],
])
def test_pipeline_rows_equal_the_pipeline_bit_for_bit(spec):
  pipeline = augment.build_pipeline(spec)
  images = {f'img{i}': _photo(37 + i, 29 + 2 * i, i) for i in range(6)}
  loader = Loader([(k, 0) for k in images], pipeline, 4, shuffle=True, seed=1, workers=2, load=images.__getitem__)
  for batch in loader.epoch(2):
    for row in np.flatnonzero(batch.mask):
      position = int(np.flatnonzero(loader.order(2) == batch.indices[row])[0])
      expected = pipeline(images[f'img{batch.indices[row]}'], np.random.default_rng([1, 2, position]))
      assert batch.images[row].dtype == np.float32
      np.testing.assert_array_equal(batch.images[row], expected)


def test_pipeline_row_keeps_the_pipelines_error_for_a_normalize_of_the_wrong_length():
  pipeline = augment.build_pipeline([{'Grayscale': {}}, {'ToTensor': {}},
                                     {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.2, 0.2, 0.2]}}])
  with pytest.raises(ValueError, match='mean has 3 values but the image has 1 channels'):
    pipeline_row(pipeline, _photo(8, 8, 0), None)


@pytest.mark.parametrize('workers', [0, 2])
def test_cached_rows_are_made_once_and_give_the_same_batches_every_epoch(workers):
  calls = []

  def counting(img, rng):
    calls.append(img.getpixel((0, 0)))
    return _transform(img, rng)

  plain = Loader(_samples(7), _transform, 3, shuffle=False, workers=workers, load=_fake_load)
  cached = Loader(_samples(7), counting, 3, shuffle=False, workers=workers, load=_fake_load, cache_rows=True)
  for epoch in range(3):
    batches = list(cached.epoch(epoch))
    for a, b in zip(plain.epoch(epoch), batches, strict=True):
      np.testing.assert_array_equal(a.images, b.images)
      np.testing.assert_array_equal(a.mask, b.mask)
    batches[0].images[:] = -1   # a consumer writing into its batch does not reach the kept rows
  assert sorted(calls) == list(range(7))
  assert cached.cached_row_bytes == 7 * 2 * 2 * 3 * 4 and plain.cached_row_bytes == 0


@pytest.mark.parametrize('workers', [0, 2])
def test_an_epoch_resumed_at_a_batch_gives_the_batches_the_whole_epoch_gives_from_there(workers):
  loader = Loader(_samples(10), _transform, batch_size=4, shuffle=True, seed=3, workers=workers, load=_fake_load)
  whole = list(loader.epoch(2))
  opened = []
  resumed = Loader(_samples(10), _transform, batch_size=4, shuffle=True, seed=3, workers=workers,
                   load=lambda path: opened.append(path) or _fake_load(path))
  rest = list(resumed.epoch(2, start=1))
  assert len(rest) == 2
  for a, b in zip(whole[1:], rest, strict=True):
    for field in ('images', 'labels', 'mask', 'indices'):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert len(opened) == 6   # the first batch's images were not loaded
  assert list(resumed.epoch(2, start=3)) == []
