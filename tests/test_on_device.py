"""Normalising uint8 batches on the device equals the host's float32 transforms bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tl_jax.data.on_device import normalize_uint8, uint8_table
from tl_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_normalized_array

torch = pytest.importorskip('torch')
F = pytest.importorskip('torchvision.transforms.functional')


def _images_bhwc(batch=3, height=20, width=30, seed=0):
  images = np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
  images[0].reshape(-1)[:256 * 3] = np.repeat(np.arange(256, dtype=np.uint8), 3)  # every value in every channel
  return images


@pytest.mark.parametrize('mean, std', [(IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.25, 0.1), (0.3, 0.7, 0.05))])
def test_equals_host_normalisation(mean, std):
  images = _images_bhwc()
  host = np.stack([to_normalized_array(Image.fromarray(im), mean, std) for im in images])
  device = np.asarray(jax.jit(lambda x: normalize_uint8(x, mean, std))(images))
  assert device.dtype == np.float32
  assert np.array_equal(device, host)  # bit for bit, not within a tolerance
  eager = np.asarray(normalize_uint8(jnp.asarray(images), mean, std))
  assert np.array_equal(eager, host)


def test_equals_torchvision():
  images = _images_bhwc(batch=1)
  ref = F.normalize(F.to_tensor(Image.fromarray(images[0])), IMAGENET_MEAN, IMAGENET_STD).numpy()
  ours = np.asarray(normalize_uint8(jnp.asarray(images), IMAGENET_MEAN, IMAGENET_STD))[0]
  assert np.array_equal(ours, np.transpose(ref, (1, 2, 0)))


def test_naive_device_arithmetic_is_only_close():
  """Why a table: XLA turns x / 255 into x * (1 / 255), which rounds differently."""
  images = _images_bhwc()
  host = np.stack([to_normalized_array(Image.fromarray(im)) for im in images])
  mean, std = jnp.asarray(IMAGENET_MEAN, jnp.float32), jnp.asarray(IMAGENET_STD, jnp.float32)
  naive = np.asarray(jax.jit(lambda x: (x.astype(jnp.float32) / 255 - mean) / std)(images))
  assert np.max(np.abs(naive - host)) < 1e-6
  assert uint8_table(IMAGENET_MEAN, IMAGENET_STD).shape == (256, 3)


def test_bad_input():
  with pytest.raises(TypeError, match='uint8'):
    normalize_uint8(jnp.zeros((1, 2, 2, 3), jnp.float32), IMAGENET_MEAN, IMAGENET_STD)
  with pytest.raises(ValueError, match='mean has 2 values but the image has 3 channels'):
    normalize_uint8(jnp.zeros((1, 2, 2, 3), jnp.uint8), (0.5, 0.5), IMAGENET_STD)


def test_normalizing_step_feeds_the_step_normalised_images():
  from tl_jax.data.on_device import normalizing_step
  images = _images_bhwc(batch=2)
  seen = {}

  def step(state, batch, *, scale):
    seen['dtype'] = batch['images'].dtype
    return state + scale * batch['images'].sum(), batch['labels']

  wrapped = jax.jit(normalizing_step(step, IMAGENET_MEAN, IMAGENET_STD), static_argnames='scale')
  total, labels = wrapped(0.0, {'images': images, 'labels': np.arange(2)}, scale=2.0)
  host = np.stack([to_normalized_array(Image.fromarray(im)) for im in images])
  assert seen['dtype'] == jnp.float32
  np.testing.assert_allclose(total, 2.0 * host.sum(dtype=np.float64), rtol=1e-5)
  assert np.array_equal(labels, [0, 1])
  already = wrapped(0.0, {'images': host, 'labels': np.arange(2)}, scale=1.0)[0]
  np.testing.assert_allclose(already, host.sum(dtype=np.float64), rtol=1e-5)
