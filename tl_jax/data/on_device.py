"""Input work done on the accelerator: uint8 batches travel (4x fewer bytes than float32) and
are normalised there, to exactly the float32 values the host transforms produce."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax.data.transforms import normalize


def uint8_table(mean: Sequence[float], std: Sequence[float], num_channels: int = 3) -> np.ndarray:
  """(256, C) float32: row v is what the host transforms make of a pixel value v in each channel."""
  values = np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255)  # ToTensor's arithmetic
  return normalize(np.repeat(values[:, None], num_channels, axis=1), mean, std)


def normalize_uint8(images_bhwc: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 (B, H, W, C) -> float32 (x / 255 - mean) / std, equal bit for bit to `to_normalized_array`.

  A lookup in a 256-entry table per channel computed on the host: XLA rewrites a division by
  a broadcast constant into a multiplication by its reciprocal, which rounds differently.
  Jit-able; the table is a constant of the computation.
  """
  if images_bhwc.dtype != jnp.uint8:
    raise TypeError(f'normalize_uint8 takes uint8 images, got {images_bhwc.dtype}')
  num_channels = images_bhwc.shape[-1]
  table = jnp.asarray(uint8_table(mean, std, num_channels).T.reshape(-1))  # channel-major
  return jnp.take(table, images_bhwc.astype(jnp.int32) + 256 * jnp.arange(num_channels, dtype=jnp.int32))


def normalizing_step(step: Callable, mean: Sequence[float], std: Sequence[float]) -> Callable:
  """`step(state, batch, **kw)` that accepts uint8 'images' and normalises them first, on the device.

  Float images pass through unchanged, so one step serves both kinds of loader. Wrap before jit:
  `jax.jit(functools.partial(normalizing_step(train_step, mean, std), model=..., ...))`.
  """

  @functools.wraps(step)
  def wrapped(state, batch, **kwargs):
    images = batch.get('images')   # None: a batch of cached features
    if images is not None and images.dtype == jnp.uint8:
      batch = {**batch, 'images': normalize_uint8(images, mean, std)}
    return step(state, batch, **kwargs)

  return wrapped
