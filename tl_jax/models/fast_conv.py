"""A 2-D convolution whose gradients XLA:CPU computes faster, through exact rewrites.

XLA:CPU computes a convolution's weight gradient (dW) as a convolution of the input with the
output gradient in which the batch is the contracted feature axis: with 4 images, its Eigen
kernel packs runs of 4 floats and the layout copies around it dominate. ResNet-18's stem dW
took 2-4x torch's, layer1's about 2x. `kernel_grad` cuts each image into tiles of output
pixels (with the input pixels they read) and makes the tiles the batch: the same sum, grouped
so that the contracted axis is tiles x images long (measured 1.3-1.6x faster per conv).

Its input gradient (dx) is a convolution with the kernel flipped and its channels swapped, a
copy of the kernel per step; where the kernel is much larger than the output gradient
(ResNet's 512-channel convs at small batches) `input_grad_matmul` reads it in place instead.

Both rewrites apply on CPU only (`lax.platform_dependent`); other backends keep XLA's own
gradients. The forward pass is lax's convolution, so values are unchanged; gradients differ
by summation order only (float rounding). `benchmarks/bench_step.py` measures the ResNet-18 step
with and without them, and each conv shape.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# dx goes through `input_grad_matmul` when the kernel has at least this many times the output
# gradient's elements (ResNet-18 at batch 4: layer4's 3x3 convs, 24x and 12x).
MATMUL_DX_MIN_RATIO = 4

# Flax's nn.Conv passes its NHWC / HWIO layout as these numbers (lax's own spelling).
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _conv(x_bhwc, kernel_hwio, strides, padding):
  return lax.conv_general_dilated(x_bhwc, kernel_hwio, strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _xla_dx(x_bhwc, kernel_hwio, dy_bhwc, strides, padding):
  # XLA's own input gradient; dead code where the input is data.
  _, vjp = jax.vjp(lambda x: _conv(x, kernel_hwio, strides, padding), x_bhwc)
  return vjp(dy_bhwc)[0]


def _xla_dw(x_bhwc, dy_bhwc, kernel_shape, strides, padding):
  # XLA's own weight gradient (the conv is linear in the kernel: any kernel value gives it).
  _, vjp = jax.vjp(lambda k: _conv(x_bhwc, k, strides, padding), jnp.zeros(kernel_shape, dy_bhwc.dtype))
  return vjp(dy_bhwc)[0]


def output_tile(size: int, largest: int = 16) -> int:
  """The tile (along one output axis) dW is split into: its largest divisor below `size`, at most
  `largest`; `size` itself (no split) when it has none (a prime, or 1)."""
  return next((t for t in range(min(largest, size - 1), 1, -1) if size % t == 0), size)


def kernel_grad(x_bhwc: jax.Array, dy_bhwc: jax.Array, kernel_shape: Sequence[int],
                strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """dW of an NHWC/HWIO convolution, as XLA's own dW of the same conv over output tiles.

  Each image is cut into tiles of output pixels (with the input pixels they read, so
  neighbouring tiles share a kernel-size halo), and the tiles become the batch: the sum over
  batch and output pixels is the same sum, grouped differently.
  """
  kh, kw = kernel_shape[:2]
  (sh, sw), (oh, ow), co = strides, dy_bhwc.shape[1:3], dy_bhwc.shape[3]
  th, tw = output_tile(oh), output_tile(ow)
  n, ci = x_bhwc.shape[0], x_bhwc.shape[3]
  x_padded = jnp.pad(x_bhwc, ((0, 0), padding[0], padding[1], (0, 0)))
  span_h, span_w = (th - 1) * sh + kh, (tw - 1) * sw + kw
  tiles_h, tiles_w = oh // th, ow // tw
  x_tiles = jnp.stack([lax.slice(x_padded, (0, a * th * sh, b * tw * sw, 0),
                                 (n, a * th * sh + span_h, b * tw * sw + span_w, ci))
                       for a in range(tiles_h) for b in range(tiles_w)], axis=1)
  x_tiles = x_tiles.reshape(n * tiles_h * tiles_w, span_h, span_w, ci)
  dy_tiles = dy_bhwc.reshape(n, tiles_h, th, tiles_w, tw, co).transpose(0, 1, 3, 2, 4, 5)
  dy_tiles = dy_tiles.reshape(n * tiles_h * tiles_w, th, tw, co)
  return _xla_dw(x_tiles, dy_tiles, kernel_shape, strides, ((0, 0), (0, 0)))


def input_grad_matmul(dy_bhwc: jax.Array, kernel_hwio: jax.Array, x_shape: Sequence[int],
                      strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """dx of an NHWC/HWIO convolution as one matmul with the kernel, then a sum of shifted taps.

  XLA computes dx as a convolution with the kernel flipped and its in/out channels swapped, a
  copy of the whole kernel per step: for ResNet's 512-channel 3x3 convs (a kernel 24x the size
  of the output gradient at batch 4) that copy makes dx take ~1.7x the forward. Here the kernel
  is read in place ([kh*kw*ci, co], contracted on co), and each kernel offset's columns are
  added into the padded input frame at its own shift.
  """
  kh, kw, ci, co = kernel_hwio.shape
  n, h, w, _ = x_shape
  (sh, sw), (oh, ow) = strides, dy_bhwc.shape[1:3]
  taps = lax.dot_general(dy_bhwc.reshape(-1, co), kernel_hwio.reshape(kh * kw * ci, co),
                         (((1,), (1,)), ((), ()))).reshape(n, oh, ow, kh, kw, ci)
  frame_h, frame_w = h + sum(padding[0]), w + sum(padding[1])
  zero = jnp.zeros((), taps.dtype)
  dx_padded = sum(
      # Offset (i, j)'s contributions land at i + sh * output row (interior padding = stride - 1).
      lax.pad(taps[:, :, :, i, j, :], zero,
              ((0, 0, 0), (i, frame_h - i - (oh - 1) * sh - 1, sh - 1),
               (j, frame_w - j - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))
      for i in range(kh) for j in range(kw))
  return lax.slice(dx_padded, (0, padding[0][0], padding[1][0], 0), (n, padding[0][0] + h, padding[1][0] + w, ci))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x_bhwc: jax.Array, kernel_hwio: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """lax's NHWC/HWIO convolution (no dilation, one group) with the fast weight gradient."""
  return _conv(x_bhwc, kernel_hwio, strides, padding)


def _conv2d_fwd(x_bhwc, kernel_hwio, strides, padding):
  return _conv(x_bhwc, kernel_hwio, strides, padding), (x_bhwc, kernel_hwio)


def _xla_grads(strides, padding, x_bhwc, kernel_hwio, dy_bhwc):
  return (_xla_dx(x_bhwc, kernel_hwio, dy_bhwc, strides, padding),
          _xla_dw(x_bhwc, dy_bhwc, kernel_hwio.shape, strides, padding))


def _cpu_grads(strides, padding, x_bhwc, kernel_hwio, dy_bhwc):
  if kernel_hwio.size >= MATMUL_DX_MIN_RATIO * dy_bhwc.size:
    dx = input_grad_matmul(dy_bhwc, kernel_hwio, x_bhwc.shape, strides, padding)
  else:
    dx = _xla_dx(x_bhwc, kernel_hwio, dy_bhwc, strides, padding)   # as fast as the forward here
  if kernel_hwio.shape[0] * kernel_hwio.shape[1] == 1:
    # A 1x1 kernel's dW is a single matmul already; tiles would only copy.
    return dx, _xla_dw(x_bhwc, dy_bhwc, kernel_hwio.shape, strides, padding)
  return dx, kernel_grad(x_bhwc, dy_bhwc, kernel_hwio.shape, strides, padding)


def _conv2d_bwd(strides, padding, residuals, dy_bhwc):
  x_bhwc, kernel_hwio = residuals
  # The rewrites are for XLA:CPU's kernels; other backends (cuDNN) keep XLA's own gradients.
  return lax.platform_dependent(x_bhwc, kernel_hwio, dy_bhwc,
                                cpu=functools.partial(_cpu_grads, strides, padding),
                                default=functools.partial(_xla_grads, strides, padding))


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def depthwise_taps(x_bhwc: jax.Array, kernel_hw1c: jax.Array, strides: tuple[int, int],
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """A depthwise convolution (one filter per channel) as a sum of shifted, per-channel scaled taps.

  XLA:CPU runs depthwise convolutions (feature_group_count = channels) through a generic grouped
  kernel about 10x slower than this fused sum, and their gradients slower still
  (`benchmarks/bench_depthwise.py`); the taps' own gradients are the same shifted products. Sums in
  float32 at least, as a convolution accumulates.
  """
  kh, kw = kernel_hw1c.shape[:2]
  (sh, sw) = strides
  acc = jnp.promote_types(x_bhwc.dtype, jnp.float32)
  x_padded = jnp.pad(x_bhwc.astype(acc), ((0, 0), padding[0], padding[1], (0, 0)))
  kernel = kernel_hw1c.astype(acc)
  oh = (x_padded.shape[1] - kh) // sh + 1
  ow = (x_padded.shape[2] - kw) // sw + 1
  n, c = x_padded.shape[0], x_padded.shape[3]
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(x_padded, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), (1, sh, sw, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out.astype(x_bhwc.dtype)


def _lax_depthwise(x_bhwc, kernel_hw1c, strides, padding):
  return lax.conv_general_dilated(x_bhwc, kernel_hw1c, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=x_bhwc.shape[-1])


def depthwise(x_bhwc: jax.Array, kernel_hw1c: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """Depthwise convolution: `depthwise_taps` on CPU, lax's convolution elsewhere (cuDNN has its own)."""
  return lax.platform_dependent(x_bhwc, kernel_hw1c,
                                cpu=functools.partial(depthwise_taps, strides=strides, padding=padding),
                                default=functools.partial(_lax_depthwise, strides=strides, padding=padding))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None,
                         preferred_element_type: Optional[jnp.dtype] = None) -> jax.Array:
  """Drop-in for `lax.conv_general_dilated` as `nn.Conv(conv_general_dilated=...)` calls it.

  Plain 2-D NHWC convolutions with explicit padding take `conv2d`, depthwise ones (a group per
  channel, one filter each) `depthwise`; anything else (dilation, other groups, string padding,
  other layouts) is passed to lax unchanged.
  """
  plain = (lhs.ndim == 4 and dimension_numbers == _NHWC and feature_group_count == 1
           and not isinstance(padding, str) and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1))))
  is_depthwise = (lhs.ndim == 4 and dimension_numbers == _NHWC and feature_group_count > 1
                  and feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1
                  and not isinstance(padding, str) and preferred_element_type is None
                  and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1))))
  if is_depthwise:
    return depthwise(lhs, rhs, tuple(int(s) for s in window_strides), tuple((int(lo), int(hi)) for lo, hi in padding))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), padding)
