"""Layers that compute exactly what their torch.nn counterparts compute."""

from __future__ import annotations

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
        # Weighted reductions: a padded row contributes 0 to every sum and to the count.
        weights = mask_b.astype(x_bhwc.dtype).reshape((-1,) + (1,) * (x_bhwc.ndim - 1))
        count = jnp.sum(mask_b.astype(x_bhwc.dtype)) * (x_bhwc.size // (x_bhwc.shape[0] * num_channels))
        mean = jnp.sum(x_bhwc * weights, axis=reduce_axes) / count
        var = jnp.sum(jnp.square(x_bhwc - mean) * weights, axis=reduce_axes) / count
      if not self.is_initializing():
        # torch: running_var uses the unbiased estimate, normalisation the biased one.
        unbiased_var = var * (count / jnp.maximum(count - 1, 1))
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased_var
    else:
      mean, var = running_mean.value, running_var.value

    inv_std = jax.lax.rsqrt(var + self.epsilon)
    return ((x_bhwc - mean) * (inv_std * scale) + bias).astype(in_dtype)
