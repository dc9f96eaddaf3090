"""MixUp and CutMix of a train batch, on the device: torchvision.transforms.v2's `MixUp(alpha, num_classes)`,
`CutMix(alpha, num_classes)` and, when both alphas are > 0, `RandomChoice([MixUp, CutMix])` (each batch takes
one of the two with probability 1/2), as torchvision's reference scripts apply them to a collated batch.

Sample, then apply: `sample_lam`/`sample_cutmix` draw λ ~ Beta(α, α) (and CutMix's box centre) from a jax key,
`mixup`/`cutmix` apply given parameters, so tests feed torchvision's own parameters to both. The pairing is
torchvision's `batch.roll(1, 0)`: row i is mixed with row i - 1 and row 0 with the last row. Our batches
have a fixed shape, padded with rows whose mask is False at the end (tl_jax.data.loader); torch's last
batch is just smaller, so the roll here runs over the valid rows only (row 0 takes the last *valid* row)
and padding rows are left alone.

Labels become soft: one-hot targets mixed as torchvision's `_mixup_label`, in `batch['soft_labels']`
(B, C); the integer `labels` stay, so the train accuracy counts the argmax against each row's own
(unmixed) class. Multi-label batches mix their (B, C) `labels` in place. Only the train step mixes
(`mixing_step`); the val phase never does.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

# Folded into the step's key so the mixing draws are independent of dropout's.
_MIX_SALT = 0x6D6978


def partner_rows(mask_b: jax.Array) -> jax.Array:
  """(B,) the row each row is mixed with: torchvision's roll by one over the valid prefix of the batch
  (row i takes row i - 1, row 0 the last valid row); padding rows take themselves."""
  size = mask_b.shape[0]
  valid = jnp.maximum(jnp.sum(mask_b.astype(jnp.int32)), 1)
  index = jnp.arange(size)
  return jnp.where(index < valid, (index - 1) % valid, index)


def _mix_rows(x: jax.Array, partner_b: jax.Array, lam) -> jax.Array:
  # torchvision: x.roll(1, 0).mul_(1 - lam).add_(x.mul(lam)), in that order.
  return x[partner_b] * (1.0 - lam) + x * lam


def mixup(images_bhwc: jax.Array, targets_bc: jax.Array, lam, partner_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """torchvision's MixUp given λ: (λ x + (1 - λ) x_partner, the same mix of the (B, C) targets)."""
  return _mix_rows(images_bhwc, partner_b, lam), _mix_rows(targets_bc, partner_b, lam)


def cutmix_box(lam, r_x, r_y, height: int, width: int) -> tuple[tuple, jax.Array]:
  """torchvision's CutMix box from λ and the box centre (r_x, r_y): ((x1, y1, x2, y2), λ adjusted to the
  box's area), as v2.CutMix.make_params: half sides int(0.5 sqrt(1 - λ) · W) and · H, clipped to the image."""
  lam = jnp.asarray(lam)
  r = 0.5 * jnp.sqrt(1.0 - lam)
  r_w_half = jnp.floor(r * width).astype(jnp.int32)
  r_h_half = jnp.floor(r * height).astype(jnp.int32)
  x1 = jnp.maximum(r_x - r_w_half, 0)
  y1 = jnp.maximum(r_y - r_h_half, 0)
  x2 = jnp.minimum(r_x + r_w_half, width)
  y2 = jnp.minimum(r_y + r_h_half, height)
  lam_adjusted = 1.0 - ((x2 - x1) * (y2 - y1)).astype(lam.dtype) / (width * height)
  return (x1, y1, x2, y2), lam_adjusted


def cutmix(images_bhwc: jax.Array, targets_bc: jax.Array, box, lam_adjusted,
           partner_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """torchvision's CutMix given the box: the partner's pixels in [y1:y2, x1:x2], targets mixed by the
  box-adjusted λ."""
  x1, y1, x2, y2 = box
  height, width = images_bhwc.shape[1:3]
  ys = jnp.arange(height)[:, None]
  xs = jnp.arange(width)[None, :]
  inside_hw = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
  images = jnp.where(inside_hw[None, :, :, None], images_bhwc[partner_b], images_bhwc)
  return images, _mix_rows(targets_bc, partner_b, jnp.asarray(lam_adjusted, targets_bc.dtype))


def sample_lam(key: jax.Array, alpha: float, dtype=jnp.float32) -> jax.Array:
  """λ ~ Beta(α, α), torchvision's `torch.distributions.Beta(α, α).sample()`."""
  return jax.random.beta(key, alpha, alpha, dtype=dtype)


def sample_cutmix(key: jax.Array, alpha: float, height: int, width: int, dtype=jnp.float32):
  """CutMix's draws: λ ~ Beta(α, α), then the box centre r_x ~ U{0..W-1}, r_y ~ U{0..H-1}."""
  k_lam, k_x, k_y = jax.random.split(key, 3)
  return (sample_lam(k_lam, alpha, dtype), jax.random.randint(k_x, (), 0, width),
          jax.random.randint(k_y, (), 0, height))


def mix_batch(batch: Mapping[str, jax.Array], key: jax.Array, num_classes: int, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, multi_label: bool = False) -> dict:
  """The batch after MixUp or CutMix (RandomChoice of the two when both alphas are > 0), drawn from `key`.

  Single-label batches gain 'soft_labels' (B, C) and keep their integer 'labels'; multi-label ones
  have their (B, C) 'labels' mixed.
  """
  images = batch['images']
  dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
  targets = batch['labels'].astype(dtype) if multi_label else jax.nn.one_hot(batch['labels'], num_classes,
                                                                             dtype=dtype)
  partner = partner_rows(batch['mask'])
  k_choice, k_mixup, k_cutmix = jax.random.split(key, 3)
  outputs = []
  if mixup_alpha > 0:
    outputs.append(mixup(images, targets, sample_lam(k_mixup, mixup_alpha, dtype), partner))
  if cutmix_alpha > 0:
    lam, r_x, r_y = sample_cutmix(k_cutmix, cutmix_alpha, images.shape[1], images.shape[2], dtype)
    box, lam_adjusted = cutmix_box(lam, r_x, r_y, images.shape[1], images.shape[2])
    outputs.append(cutmix(images, targets, box, lam_adjusted, partner))
  if not outputs:
    return dict(batch)
  if len(outputs) == 2:   # RandomChoice([MixUp, CutMix]) with p = [1/2, 1/2]
    take_cutmix = jax.random.bernoulli(k_choice, 0.5)
    images, targets = jax.tree_util.tree_map(lambda m, c: jnp.where(take_cutmix, c, m), *outputs)
  else:
    images, targets = outputs[0]
  return {**batch, 'images': images, ('labels' if multi_label else 'soft_labels'): targets}


def mix_key(state) -> jax.Array:
  """The step's mixing key: from the state's base key and step, so a resumed run mixes as the uninterrupted one."""
  base = state.rng if getattr(state, 'rng', None) is not None else jax.random.PRNGKey(0)
  return jax.random.fold_in(jax.random.fold_in(base, state.step), _MIX_SALT)


def mixing_step(step: Callable, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
                multi_label: bool = False) -> Callable:
  """`step(state, batch, **kw)` that mixes image batches first (`mix_batch`); batches of cached features
  pass unchanged. Wrap inside `on_device.normalizing_step`, so the mix sees normalised floats as
  torchvision's (which mixes the collated, normalised tensors)."""

  @functools.wraps(step)
  def wrapped(state, batch, **kwargs):
    if 'images' in batch:
      batch = mix_batch(batch, mix_key(state), num_classes, mixup_alpha, cutmix_alpha, multi_label)
    return step(state, batch, **kwargs)

  return wrapped
