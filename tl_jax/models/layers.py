"""Layers that compute exactly what their torch.nn counterparts compute."""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last (channel) axis of an NHWC tensor.

  Flax's built-in BatchNorm updates its running variance with the *biased* batch
  variance; torch uses the unbiased one (n / (n - 1)). Running statistics must follow
  torch or a model trained here and exported drifts from one trained in PyTorch.

  Attributes:
    momentum: torch's convention: running = (1 - momentum) * running + momentum * batch
      (Flax's `momentum=0.9` means the same as torch's 0.1).
    epsilon: added to the variance, torch's default 1e-5.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, train: bool,
               mask_b: Optional[jax.Array] = None) -> jax.Array:
    """Normalises `x_bhwc`.

    Args:
      x_bhwc: activations, channels last.
      train: batch statistics (and a running-stat update) if True, running stats if False.
      mask_b: optional bool/0-1 weights per sample; padded rows (0) do not enter the batch
        statistics, so a padded batch normalises exactly as torch does the smaller batch.
    """
    # Statistics and normalisation in float32 at least (bf16 activations would lose the mean).
    in_dtype = x_bhwc.dtype
    x_bhwc = x_bhwc.astype(jnp.promote_types(in_dtype, jnp.float32))
    num_channels = x_bhwc.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (num_channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (num_channels,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (num_channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (num_channels,), jnp.float32)

    if train:
      reduce_axes = tuple(range(x_bhwc.ndim - 1))
      if mask_b is None:
        count = x_bhwc.size // num_channels
        mean = jnp.mean(x_bhwc, axis=reduce_axes)
        var = jnp.mean(jnp.square(x_bhwc - mean), axis=reduce_axes)
      else:
        # A padded row contributes 0 to every sum and to the count.
        weights_b = jax.lax.stop_gradient(mask_b.astype(x_bhwc.dtype))
        count = jnp.sum(weights_b) * (x_bhwc.size // (x_bhwc.shape[0] * num_channels))
        mean, var = masked_moments(x_bhwc, weights_b, count)
      if not self.is_initializing():
        # torch: running_var uses the unbiased estimate, normalisation the biased one.
        unbiased_var = var * (count / jnp.maximum(count - 1, 1))
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased_var
    else:
      mean, var = running_mean.value, running_var.value

    inv_std = jax.lax.rsqrt(var + self.epsilon)
    return ((x_bhwc - mean) * (inv_std * scale) + bias).astype(in_dtype)


@jax.custom_jvp
def masked_moments(x_bhwc: jax.Array, weights_b: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance over the rows of weight 1 (`count` values per channel).

  Each row is summed over its pixels first and the rows' sums are then weighted: on XLA:CPU a
  plain reduction over the pixels is a fast kernel, while a reduction of `x * weights` is not
  (ResNet-18's frozen train step, whose backbone runs forward only, took ~10 % longer). The
  derivative (`_masked_moments_jvp`) is the weighted formula's, so a differentiated BatchNorm
  computes the same backward pass as before. `weights_b` and `count` are constants.
  """
  pixels = tuple(range(1, x_bhwc.ndim - 1))
  mean = jnp.sum(weights_b[:, None] * jnp.sum(x_bhwc, axis=pixels), axis=0) / count
  var = jnp.sum(weights_b[:, None] * jnp.sum(jnp.square(x_bhwc - mean), axis=pixels), axis=0) / count
  return mean, var


@masked_moments.defjvp
def _masked_moments_jvp(primals, tangents):
  x_bhwc, weights_b, count = primals
  dx_bhwc = tangents[0]
  mean, var = masked_moments(x_bhwc, weights_b, count)
  weights = weights_b.reshape((-1,) + (1,) * (x_bhwc.ndim - 1))
  axes = tuple(range(x_bhwc.ndim - 1))
  dmean = jnp.sum(dx_bhwc * weights, axis=axes) / count
  dvar = jnp.sum(2 * (x_bhwc - mean) * (dx_bhwc - dmean) * weights, axis=axes) / count
  return (mean, var), (dmean, dvar)


def _window_taps(x_padded, window, strides, out_hw):
  """(offset, the input value each output pixel sees at that window offset), row-major offsets."""
  (kh, kw), (sh, sw), (oh, ow) = window, strides, out_hw
  n, c = x_padded.shape[0], x_padded.shape[-1]
  for i in range(kh):
    for j in range(kw):
      yield (i, j), jax.lax.slice(x_padded, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                                  (1, sh, sw, 1))


def _pad_neg_inf(x_bhwc, padding):
  return jnp.pad(x_bhwc, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x_bhwc: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """torch.nn.MaxPool2d on NHWC, padded with -inf as torch pads, with torch's gradient.

  The gradient of each window goes to its first maximum in row-major order, as torch's CPU
  kernel does. JAX's own max-pool gradient on CPU builds four int32 index arrays of the
  padded input and a variadic reduce-window (~10% of ResNet-18's finetune step); this one is
  a few fused compares and pads.
  """
  return jax.lax.reduce_window(_pad_neg_inf(x_bhwc, padding), -jnp.inf, jax.lax.max,
                               (1,) + tuple(window) + (1,), (1,) + tuple(strides) + (1,), 'VALID')


def _max_pool_fwd(x_bhwc, window, strides, padding):
  y = max_pool(x_bhwc, window, strides, padding)
  return y, (x_bhwc, y)


def _max_pool_bwd(window, strides, padding, residuals, dy_bhwc):
  x_bhwc, y = residuals
  x_padded = _pad_neg_inf(x_bhwc, padding)
  (sh, sw), (oh, ow) = strides, y.shape[1:3]
  hp, wp = x_padded.shape[1:3]
  # Each window's first maximum in row-major order, found among the taps themselves: comparing the
  # taps with `y` fails when XLA computes the pool's input in two fusions that differ by an ulp
  # (no tap equals y, and the window's gradient is lost).
  taps = list(_window_taps(x_padded, window, strides, (oh, ow)))
  best, best_k = taps[0][1], jnp.zeros(y.shape, jnp.int32)
  for k, (_, tap) in enumerate(taps[1:], start=1):
    better = tap > best
    best, best_k = jnp.where(better, tap, best), jnp.where(better, k, best_k)
  dx_padded = jnp.zeros(x_padded.shape, dy_bhwc.dtype)
  for k, ((i, j), _) in enumerate(taps):
    # Back to the input grid: output pixel (r, s) read input (i + r * sh, j + s * sw).
    dx_padded = dx_padded + jax.lax.pad(
        jnp.where(best_k == k, dy_bhwc, 0), jnp.zeros((), dy_bhwc.dtype),
        ((0, 0, 0), (i, hp - i - (oh - 1) * sh - 1, sh - 1), (j, wp - j - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))
  (top, _), (left, _) = padding
  return (dx_padded[:, top:top + x_bhwc.shape[1], left:left + x_bhwc.shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
