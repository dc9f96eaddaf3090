"""3x3 stride-1 convolutions (padding 1) by Winograd's minimal filtering, F(m x m, 3 x 3).

Each output tile of m x m pixels is computed from an (m + 2)^2 input tile with (m + 2)^2
multiplies per channel pair instead of 9 m^2 (F(2x2, 3x3): 2.25x fewer, F(4x4, 3x3): 4x):

  y = A^T [ (G g G^T) * (B^T d B) ] A          (Lavin & Gray 2016, correlation form)

Over channels the elementwise product becomes (m + 2)^2 independent matmuls, [tiles, Ci] @ [Ci, Co].
The transforms are written as strided slices and additions with the constant coefficients,
separably (rows, then columns), which XLA fuses; no gathers.

The gradients are Winograd too: the input gradient is the same convolution of the output
gradient with the kernel flipped and its channels swapped, and the weight gradient follows from
the same bilinear identity with the roles of kernel and output exchanged,

  dW = G^T [ sum over tiles (A^T dy A)^T-transformed * (B^T d B) ] G,

again (m + 2)^2 matmuls, contracted over tiles x images. `conv3x3` takes this path on CPU only
(`lax.platform_dependent`); other backends keep XLA's convolution (cuDNN picks its own algorithm).
Values equal the direct convolution up to float rounding (exact in float64 to ~1e-15).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# (B^T, G, A^T) per output tile size m: alpha = m + 2 points.
_MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)),
}
TILES = tuple(_MATRICES)


def _combine(coefficients: Sequence[float], terms: Sequence[jax.Array]) -> jax.Array:
  """sum(c * t) with the zero coefficients left out and +-1 as plain adds (XLA fuses the rest)."""
  out = None
  for c, term in zip(coefficients, terms):
    if c == 0:
      continue
    value = term if c == 1 else (-term if c == -1 else term * jnp.asarray(c, term.dtype))
    out = value if out is None else out + value
  return out


def _strided(x: jax.Array, axis: int, start: int, count: int, step: int) -> jax.Array:
  starts, limits, strides = [0] * x.ndim, list(x.shape), [1] * x.ndim
  starts[axis], limits[axis], strides[axis] = start, start + (count - 1) * step + 1, step
  return lax.slice(x, starts, limits, strides)


def _tile_counts(h: int, w: int, m: int) -> tuple[int, int]:
  return -(-h // m), -(-w // m)


def input_transform(x_bhwc: jax.Array, m: int) -> jax.Array:
  """(alpha^2, N * tiles, C): B^T d B of every input tile of the 1-padded image."""
  bt = _MATRICES[m][0]
  alpha = m + 2
  n, h, w, c = x_bhwc.shape
  th, tw = _tile_counts(h, w, m)
  # Pad 1 (the convolution's padding) and enough at the end for whole tiles.
  x = jnp.pad(x_bhwc, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - w), (0, 0)))
  rows = [_strided(x, 1, i, th, m) for i in range(alpha)]                       # (N, th, Wp, C)
  rows = [_combine(bt[k], rows) for k in range(alpha)]
  out = []
  for row in rows:
    cols = [_strided(row, 2, j, tw, m) for j in range(alpha)]                     # (N, th, tw, C)
    out += [_combine(bt[l], cols) for l in range(alpha)]
  return jnp.stack(out).reshape(alpha * alpha, n * th * tw, c)


def kernel_transform(kernel_hwio: jax.Array, m: int) -> jax.Array:
  """(alpha^2, Ci, Co): G g G^T."""
  g = jnp.asarray(_MATRICES[m][1], kernel_hwio.dtype)
  u = jnp.einsum('ai,ijco,bj->abco', g, kernel_hwio, g)
  return u.reshape((m + 2) ** 2, *kernel_hwio.shape[2:])


def output_transform(m_tpo: jax.Array, n: int, h: int, w: int, m: int) -> jax.Array:
  """A^T M A of every tile, tiles put back in place and cropped: (N, H, W, Co)."""
  at = _MATRICES[m][2]
  alpha = m + 2
  th, tw = _tile_counts(h, w, m)
  co = m_tpo.shape[-1]
  grid = m_tpo.reshape(alpha, alpha, n, th, tw, co)
  cols = [_combine(at[b], [grid[:, l] for l in range(alpha)]) for b in range(m)]      # (alpha, N, th, tw, Co)
  tiles = jnp.stack([jnp.stack([_combine(at[a], [col[k] for k in range(alpha)]) for col in cols])
                     for a in range(m)])                                                # (m, m, N, th, tw, Co)
  y = tiles.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, co)
  return y[:, :h, :w]


def dy_transform(dy_bhwc: jax.Array, m: int) -> jax.Array:
  """(alpha^2, N * tiles, Co): A dy A^T of every m x m output-gradient tile (zero-padded tiles)."""
  at = _MATRICES[m][2]
  alpha = m + 2
  n, h, w, co = dy_bhwc.shape
  th, tw = _tile_counts(h, w, m)
  dy = jnp.pad(dy_bhwc, ((0, 0), (0, th * m - h), (0, tw * m - w), (0, 0)))
  rows = [_strided(dy, 1, a, th, m) for a in range(m)]                                # (N, th, Wt, Co)
  rows = [_combine(at[:, k], rows) for k in range(alpha)]
  out = []
  for row in rows:
    cols = [_strided(row, 2, b, tw, m) for b in range(m)]
    out += [_combine(at[:, l], cols) for l in range(alpha)]
  return jnp.stack(out).reshape(alpha * alpha, n * th * tw, co)


def conv(x_bhwc: jax.Array, kernel_hwio: jax.Array, m: int = 2) -> jax.Array:
  """The 3x3, stride-1, padding-1 convolution of NHWC `x_bhwc` with HWIO `kernel_hwio`, F(m x m, 3 x 3)."""
  n, h, w, _ = x_bhwc.shape
  v = input_transform(x_bhwc, m)
  u = kernel_transform(kernel_hwio, m)
  product = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), preferred_element_type=x_bhwc.dtype)
  return output_transform(product, n, h, w, m)


def weight_grad(x_bhwc: jax.Array, dy_bhwc: jax.Array, m: int = 2) -> jax.Array:
  """dW (3, 3, Ci, Co) of `conv`: G^T [sum over tiles (A dy A^T) * (B^T d B)] G."""
  g = jnp.asarray(_MATRICES[m][1], x_bhwc.dtype)
  alpha = m + 2
  v = input_transform(x_bhwc, m)
  d = dy_transform(dy_bhwc, m)
  product = lax.dot_general(v, d, (((1,), (1,)), ((0,), (0,))), preferred_element_type=x_bhwc.dtype)
  product = product.reshape(alpha, alpha, *product.shape[1:])
  return jnp.einsum('ai,abco,bj->ijco', g, product, g)


def input_grad(dy_bhwc: jax.Array, kernel_hwio: jax.Array, m: int = 2) -> jax.Array:
  """dx of `conv`: the same convolution of dy with the kernel flipped and its channels swapped."""
  return conv(dy_bhwc, jnp.flip(kernel_hwio, (0, 1)).transpose(0, 1, 3, 2), m)


def _direct(x_bhwc, kernel_hwio):
  return lax.conv_general_dilated(x_bhwc, kernel_hwio, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x_bhwc: jax.Array, kernel_hwio: jax.Array, m: int = 2) -> jax.Array:
  """3x3 stride-1 padding-1 NHWC convolution: Winograd F(m x m, 3 x 3) on CPU, lax's elsewhere."""
  return lax.platform_dependent(x_bhwc, kernel_hwio, cpu=functools.partial(conv, m=m), default=_direct)


def _conv3x3_fwd(x_bhwc, kernel_hwio, m):
  return conv3x3(x_bhwc, kernel_hwio, m), (x_bhwc, kernel_hwio)


def _winograd_grads(x_bhwc, kernel_hwio, dy_bhwc, m):
  return input_grad(dy_bhwc, kernel_hwio, m), weight_grad(x_bhwc, dy_bhwc, m)


def _xla_grads(x_bhwc, kernel_hwio, dy_bhwc):
  _, vjp = jax.vjp(_direct, x_bhwc, kernel_hwio)
  return vjp(dy_bhwc)


def _conv3x3_bwd(m, residuals, dy_bhwc):
  x_bhwc, kernel_hwio = residuals
  return lax.platform_dependent(x_bhwc, kernel_hwio, dy_bhwc, cpu=functools.partial(_winograd_grads, m=m),
                                default=_xla_grads)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


# ------------------------------------------------------------------------------ where it is used

# Which ops of which 3x3 shape run as Winograd, from `benchmarks/bench_winograd.py --policy`: for each
# measured (Ci, Co, map size, batch) the tile size (2 or 4) of the forward, dx and dW where it beat
# XLA's direct convolution (tl_jax's fast_conv) by the bench's margin, else 0 (direct). Shapes not
# in the file, and every op marked 0, keep the direct convolution.
POLICY_FILE = Path(__file__).with_name('winograd_policy.json')
OPS = ('forward', 'dx', 'dw')


@functools.lru_cache(maxsize=None)
def policy() -> dict[tuple[int, int, int, int], tuple[int, int, int]]:
  """{(ci, co, size, batch): (forward m, dx m, dw m)} from POLICY_FILE ({} when it is absent)."""
  if not POLICY_FILE.is_file():
    return {}
  rows = json.loads(POLICY_FILE.read_text())['shapes']
  return {(r['ci'], r['co'], r['size'], r['batch']): tuple(int(r[op]) for op in OPS) for r in rows}


def plan(x_shape: Sequence[int], kernel_shape: Sequence[int]) -> tuple[int, int, int]:
  """(forward, dx, dW) tile sizes for a 3x3 conv of NHWC `x_shape` (0: the direct convolution).

  A square map of a measured (Ci, Co, size) takes the row of the measured batch nearest on a log
  scale (the bench measures the tutorial's 4 and a larger 32)."""
  n, h, w, ci = x_shape
  co = kernel_shape[-1]
  rows = {b: ops for (pci, pco, size, b), ops in policy().items() if (pci, pco, size) == (ci, co, h) and h == w}
  if not rows:
    return (0, 0, 0)
  nearest = min(rows, key=lambda b: abs(np.log(b) - np.log(max(n, 1))))
  return rows[nearest]


def _fast_direct(x_bhwc, kernel_hwio):
  from tl_jax.models import fast_conv   # its gradients where an op is not Winograd's
  return fast_conv.conv2d(x_bhwc, kernel_hwio, (1, 1), ((1, 1), (1, 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def planned_conv3x3(x_bhwc: jax.Array, kernel_hwio: jax.Array, ops: tuple[int, int, int]) -> jax.Array:
  """3x3 stride-1 padding-1 conv with each of forward, dx and dW as Winograd F(m) (m = ops[i]) or
  the direct convolution (0), on CPU; lax's convolution and gradients elsewhere."""
  forward = functools.partial(conv, m=ops[0]) if ops[0] else _fast_direct
  return lax.platform_dependent(x_bhwc, kernel_hwio, cpu=forward, default=_direct)


def _planned_fwd(x_bhwc, kernel_hwio, ops):
  return planned_conv3x3(x_bhwc, kernel_hwio, ops), (x_bhwc, kernel_hwio)


def _planned_cpu_grads(x_bhwc, kernel_hwio, dy_bhwc, ops):
  needs_direct = not (ops[1] and ops[2])
  if needs_direct:
    _, vjp = jax.vjp(_fast_direct, x_bhwc, kernel_hwio)
    dx_direct, dw_direct = vjp(dy_bhwc)
  dx = input_grad(dy_bhwc, kernel_hwio, ops[1]) if ops[1] else dx_direct
  dw = weight_grad(x_bhwc, dy_bhwc, ops[2]) if ops[2] else dw_direct
  return dx, dw


def _planned_bwd(ops, residuals, dy_bhwc):
  x_bhwc, kernel_hwio = residuals
  return lax.platform_dependent(x_bhwc, kernel_hwio, dy_bhwc, cpu=functools.partial(_planned_cpu_grads, ops=ops),
                                default=_xla_grads)


planned_conv3x3.defvjp(_planned_fwd, _planned_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None,
                         preferred_element_type=None, fallback=None) -> jax.Array:
  """`fallback` (default `fast_conv.conv_general_dilated`; VGG passes lax's) with the 3x3 stride-1
  padding-1 float32/64 convolutions that `plan` marks taken by Winograd, as
  `nn.Conv(conv_general_dilated=functools.partial(conv_general_dilated, fallback=...))`. bfloat16
  keeps the direct convolution (Winograd's transforms lose more bits than its 8-bit mantissa can spare)."""
  from tl_jax.models import fast_conv
  ops = (0, 0, 0)
  if (lhs.ndim == 4 and rhs.shape[:2] == (3, 3) and tuple(window_strides) == (1, 1)
      and not isinstance(padding, str) and tuple(tuple(int(p) for p in pair) for pair in padding) == ((1, 1), (1, 1))
      and dimension_numbers == fast_conv._NHWC and feature_group_count == 1 and preferred_element_type is None
      and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and lhs.dtype in (jnp.float32, jnp.float64) and rhs.dtype == lhs.dtype):
    ops = plan(lhs.shape, rhs.shape)
  if any(ops):
    return planned_conv3x3(lhs, rhs, ops)
  fallback = fast_conv.conv_general_dilated if fallback is None else fallback
  return fallback(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count, precision=precision, preferred_element_type=preferred_element_type)
