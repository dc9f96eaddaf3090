"""A 2-D convolution whose weight gradient XLA:CPU computes several times faster.

XLA:CPU lowers a convolution's weight gradient (dW) to a convolution of the input with the
output gradient, which its Eigen kernels run slowly for large feature maps with few channels:
ResNet-18's layer1 3x3 dW takes about twice its forward pass, the 1x1 stride-2 downsample dW
eight times. The same sum written as one matmul per kernel offset,

  dW[i, j] = x_padded[:, i::s, j::s, :]^T @ dy    (contracting batch and output pixels),

runs near the machine's matmul rate. The forward pass and the input gradient stay XLA's own
convolutions, so values are unchanged; only dW's summation order differs (float rounding).
`scripts/bench_step.py` measures each choice on ResNet-18's shapes.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Flax's nn.Conv passes its NHWC / HWIO layout as these numbers (lax's own spelling).
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _conv(x_bhwc, kernel_hwio, strides, padding):
  return lax.conv_general_dilated(x_bhwc, kernel_hwio, strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _offset_matmuls(x_bhwc, dy_bhwc, kernel_shape, strides, padding):
  kh, kw, ci, _ = kernel_shape
  (sh, sw), (oh, ow) = strides, dy_bhwc.shape[1:3]
  x_padded = jnp.pad(x_bhwc, ((0, 0), padding[0], padding[1], (0, 0)))
  n = x_bhwc.shape[0]
  rows = []
  for i in range(kh):
    for j in range(kw):
      # The input pixels that kernel offset (i, j) multiplies, one per output pixel.
      taps = lax.slice(x_padded, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, ci),
                       (1, sh, sw, 1))
      rows.append(lax.dot_general(taps.reshape(-1, ci), dy_bhwc.reshape(-1, dy_bhwc.shape[-1]),
                                  (((0,), (0,)), ((), ()))))
  return jnp.stack(rows).reshape(kernel_shape)


def space_to_depth(x_bhwc: jax.Array) -> jax.Array:
  """(B, 2H, 2W, C) -> (B, H, W, 4C), channel index (row parity, column parity, c)."""
  b, h, w, c = x_bhwc.shape
  return x_bhwc.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def _space_to_depth_grad(x_bhwc, dy_bhwc, kernel_shape, padding):
  """dW of a stride-2 conv through the equal stride-1 conv on the space-to-depth input.

  A k x k stride-2 conv equals a ceil(k/2)-square stride-1 conv over 2x2 pixel blocks
  (MLPerf's TPU ResNet stem): offset 2a + p of the kernel is block offset a, parity p. The
  stride-1 form needs a quarter of the offsets, each a matmul over 4x the channels.
  """
  kh, kw, ci, co = kernel_shape
  oh, ow = dy_bhwc.shape[1:3]
  bh, bw = -(-kh // 2), -(-kw // 2)
  # Blocks the stride-1 conv reads; the extra zero rows/cols only meet the kernel's zero padding.
  need_h, need_w = 2 * (oh + bh - 1), 2 * (ow + bw - 1)
  x_padded = jnp.pad(x_bhwc, ((0, 0), padding[0], padding[1], (0, 0)))
  x_padded = jnp.pad(x_padded, ((0, 0), (0, max(0, need_h - x_padded.shape[1])),
                                (0, max(0, need_w - x_padded.shape[2])), (0, 0)))[:, :need_h, :need_w]
  grad_blocks = _offset_matmuls(space_to_depth(x_padded), dy_bhwc, (bh, bw, 4 * ci, co), (1, 1),
                                ((0, 0), (0, 0)))
  grad = grad_blocks.reshape(bh, bw, 2, 2, ci, co).transpose(0, 2, 1, 3, 4, 5).reshape(2 * bh, 2 * bw, ci, co)
  return grad[:kh, :kw]


def kernel_grad(x_bhwc: jax.Array, dy_bhwc: jax.Array, kernel_shape: Sequence[int],
                strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """dW of an NHWC/HWIO convolution as matmuls over kernel offsets (batch x pixels contracted).

  Large stride-2 kernels (the 7x7 stem) go through space-to-depth first: 16 offsets on 12
  channels instead of 49 on 3 (measured 1.6x faster on one core for ResNet's stem).
  """
  if tuple(strides) == (2, 2) and min(kernel_shape[:2]) >= 4:
    return _space_to_depth_grad(x_bhwc, dy_bhwc, tuple(kernel_shape), padding)
  return _offset_matmuls(x_bhwc, dy_bhwc, tuple(kernel_shape), strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x_bhwc: jax.Array, kernel_hwio: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """lax's NHWC/HWIO convolution (no dilation, one group) with the fast weight gradient."""
  return _conv(x_bhwc, kernel_hwio, strides, padding)


def _conv2d_fwd(x_bhwc, kernel_hwio, strides, padding):
  return _conv(x_bhwc, kernel_hwio, strides, padding), (x_bhwc, kernel_hwio)


def _conv2d_bwd(strides, padding, residuals, dy_bhwc):
  x_bhwc, kernel_hwio = residuals
  # XLA's own input gradient (it is as fast as the forward); dead code where the input is data.
  _, input_vjp = jax.vjp(lambda x: _conv(x, kernel_hwio, strides, padding), x_bhwc)
  (dx,) = input_vjp(dy_bhwc)
  return dx, kernel_grad(x_bhwc, dy_bhwc, kernel_hwio.shape, strides, padding)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None,
                         preferred_element_type: Optional[jnp.dtype] = None) -> jax.Array:
  """Drop-in for `lax.conv_general_dilated` as `nn.Conv(conv_general_dilated=...)` calls it.

  Plain 2-D NHWC convolutions with explicit padding take `conv2d`; anything else (dilation,
  groups, string padding, other layouts) is passed to lax unchanged.
  """
  plain = (lhs.ndim == 4 and dimension_numbers == _NHWC and feature_group_count == 1
           and not isinstance(padding, str) and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1))))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), padding)
