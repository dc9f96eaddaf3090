"""fast_conv's convolution equals lax's: values and both gradients, through each rewrite."""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from helpers import rel_err, within
from tl_jax.models import fast_conv

# (input H, W, in channels, out channels, kernel, stride, padding): every shape class ResNets
# use (7x7/2 stem, 3x3 stride 1 and 2, 1x1 stride 1 and 2), odd sizes that leave a stride-2
# remainder, and an asymmetric padding.
SHAPES = [
    (30, 30, 3, 8, (7, 7), (2, 2), ((3, 3), (3, 3))),   # a stem: dW over 3x3 tiles of 5x5 outputs
    (17, 14, 2, 5, (5, 4), (2, 2), ((2, 1), (0, 2))),   # odd sizes and paddings; 7 output columns, no tiles
    (9, 9, 5, 6, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (9, 8, 5, 6, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (8, 8, 5, 7, (1, 1), (1, 1), ((0, 0), (0, 0))),
    (9, 9, 5, 7, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (10, 7, 4, 3, (3, 2), (2, 1), ((0, 2), (1, 0))),
    # Kernels >= 4x the output gradient (layer4's case): dx through input_grad_matmul.
    (3, 3, 16, 16, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (6, 5, 16, 12, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (5, 6, 20, 16, (3, 2), (2, 1), ((0, 2), (1, 0))),
]


def _plain(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


_IDS = lambda s: f'{s[4][0]}x{s[4][1]}s{s[5][0]}p{s[6][0][0]}_{s[0]}x{s[1]}'


def _lax_reference(shape, seed):
  """float64 x, w, dy of `shape` and lax's conv value and gradients: (x, w, dy, y, dx, dW)."""
  h, w_, cin, cout, kernel, strides, padding = shape
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((3, h, w_, cin)))
  w = jnp.asarray(rng.standard_normal(kernel + (cin, cout)))
  y, vjp = jax.vjp(lambda a, b: _plain(a, b, strides, padding), x, w)
  dy = jnp.asarray(rng.standard_normal(y.shape))
  return (x, w, dy, y) + tuple(vjp(dy))


def _assert_equal_f64(label, pairs):
  for what, ours, ref in pairs:
    assert ours.shape == ref.shape, what
    assert within(rel_err(ours, ref), 'rewrite_rel_f64', f'fast_conv {what} {label} (rel)'), what


@pytest.mark.parametrize('shape', SHAPES, ids=_IDS)
def test_value_and_gradients_equal_lax_conv_in_float64(shape):
  strides, padding = shape[5:]
  with jax.enable_x64(True):
    x, w, dy, y_ref, dx_ref, dw_ref = _lax_reference(shape, seed=0)
    y, vjp = jax.vjp(lambda a, b: fast_conv.conv2d(a, b, strides, padding), x, w)
    dx, dw = vjp(dy)
    assert y.dtype == dw.dtype == jnp.float64
    _assert_equal_f64('vs lax conv', (('value', y, y_ref), ('dx', dx, dx_ref), ('dW', dw, dw_ref)))


@pytest.mark.parametrize('shape', SHAPES, ids=_IDS)
def test_each_rewrite_equals_lax_gradients_in_float64(shape):
  """Both rewrites on every shape, whichever one conv2d's size rule would pick there."""
  strides, padding = shape[5:]
  with jax.enable_x64(True):
    x, w, dy, _, dx_ref, dw_ref = _lax_reference(shape, seed=1)
    dx = fast_conv.input_grad_matmul(dy, w, x.shape, strides, padding)
    dw = fast_conv.kernel_grad(x, dy, w.shape, strides, padding)
    _assert_equal_f64('rewrite vs lax', (('dx', dx, dx_ref), ('dW', dw, dw_ref)))


def test_output_tiles_divide_the_output():
  # ResNet-18 at 224 px: the stem's 112 outputs, layer1-4's 56, 28, 14 and 7.
  assert [fast_conv.output_tile(n) for n in (112, 56, 28, 14, 7, 1, 2, 9)] == [16, 14, 14, 7, 7, 1, 2, 3]


def _op_counts(fn, platform, *args):
  text = jax.export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()
  # lax.platform_dependent leaves a `case` on a constant index (XLA folds it): count the compute ops.
  return collections.Counter(op for op in re.findall(r'stablehlo\.(\w+)', text)
                             if op not in ('case', 'return', 'constant'))


def test_other_backends_keep_xlas_own_gradients():
  """Lowered for CUDA, the gradient is lax's own (cuDNN's kernels); for CPU, the rewrites."""
  x, w = jnp.ones((2, 12, 12, 4)), jnp.ones((3, 3, 4, 4))
  grad = lambda conv: jax.grad(lambda a, b: jnp.sum(jnp.sin(conv(a, b, (1, 1), ((1, 1), (1, 1))))), (0, 1))
  fast, plain = (_op_counts(grad(conv), 'cuda', x, w) for conv in (fast_conv.conv2d, _plain))
  assert fast == plain and fast['convolution'] == 3
  assert _op_counts(grad(fast_conv.conv2d), 'cpu', x, w)['pad'] > plain['pad']


def test_is_a_drop_in_for_flax_conv_and_passes_other_convs_to_lax(monkeypatch):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 11, 11, 4), dtype=np.float32))
  calls = []
  real_conv2d = fast_conv.conv2d
  monkeypatch.setattr(fast_conv, 'conv2d', lambda *a: calls.append(a[2:]) or real_conv2d(*a))
  for kwargs, takes_fast_path in (({'strides': (2, 2), 'padding': ((1, 1), (1, 1))}, True),
                                  ({'padding': 'SAME', 'kernel_dilation': (2, 2)}, False),
                                  ({'padding': ((1, 1), (1, 1)), 'feature_group_count': 2}, False)):
    calls.clear()
    plain = nn.Conv(6, (3, 3), use_bias=False, **kwargs)
    fast = nn.Conv(6, (3, 3), use_bias=False, conv_general_dilated=fast_conv.conv_general_dilated, **kwargs)
    params = plain.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(fast.init(jax.random.PRNGKey(0), x)) == jax.tree_util.tree_structure(params)
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))
    np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), rtol=0, atol=0)
    g_fast, g_plain = jax.grad(loss(fast))(params), jax.grad(loss(plain))(params)
    np.testing.assert_allclose(g_fast['params']['kernel'], g_plain['params']['kernel'], rtol=1e-5, atol=1e-5)
    assert bool(calls) == takes_fast_path, kwargs


@pytest.mark.parametrize('kernel, stride, size', [(3, 1, 9), (3, 2, 10), (5, 2, 11), (7, 1, 8)])
def test_depthwise_taps_equal_lax_in_float64_values_and_gradients(kernel, stride, size):
  """Depthwise convolutions (MobileNet, EfficientNet, ConvNeXt, ...) as shifted taps: values, dx and
  dW equal lax's grouped convolution, strides 1 and 2, odd and even sizes."""
  from tl_jax.models.fast_conv import conv_general_dilated as ours
  rng = np.random.default_rng(kernel * 10 + stride)
  pad = ((kernel - 1) // 2,) * 2
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((2, size, size, 6)))
    k = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)))
    dims = jax.lax.conv_dimension_numbers(x.shape, k.shape, ('NHWC', 'HWIO', 'NHWC'))

    def value_and_grads(conv):
      y, vjp = jax.vjp(lambda a, b: conv(a, b, (stride, stride), (pad, pad), dimension_numbers=dims,
                                          feature_group_count=6), x, k)
      return (y, *vjp(jnp.cos(y)))

    got = jax.jit(lambda: value_and_grads(ours))()
    want = jax.jit(lambda: value_and_grads(jax.lax.conv_general_dilated))()
    for what, a, b in zip(('value', 'dx', 'dW'), got, want):
      assert within(rel_err(a, b), 'rewrite_rel_f64', f'depthwise taps {what} float64'), what
