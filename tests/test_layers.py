"""Layers against their torch.nn counterparts, computed in the test."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import nchw_to_nhwc, rel_err, within
from tl_jax.models.layers import masked_moments, max_pool

torch = pytest.importorskip('torch')


@pytest.mark.parametrize('window,stride,pad,size', [(3, 2, 1, 12), (3, 2, 1, 11), (2, 2, 0, 8), (3, 1, 1, 7)])
def test_max_pool_value_and_gradient_match_torch_with_ties_in_float64(window, stride, pad, size):
  # Few distinct values: most windows hold tied maxima, where torch sends the gradient to the
  # first maximum in row-major order; ReLU outputs (ResNet's pool input) tie at 0 often.
  rng = np.random.default_rng(0)
  x_nchw = rng.integers(0, 3, (2, 3, size, size)).astype(np.float64)
  tx = torch.from_numpy(x_nchw).requires_grad_(True)
  ty = torch.nn.functional.max_pool2d(tx, window, stride, pad)
  dy_nchw = rng.standard_normal(ty.shape)
  ty.backward(torch.from_numpy(dy_nchw))
  with jax.enable_x64(True):
    pool = lambda x: max_pool(x, (window, window), (stride, stride), ((pad, pad), (pad, pad)))
    y, vjp = jax.vjp(pool, jnp.asarray(nchw_to_nhwc(x_nchw)))
    (dx,) = vjp(jnp.asarray(nchw_to_nhwc(dy_nchw)))
    assert dx.dtype == jnp.float64
    # JAX's own max-pool gives the same values (its gradient splits ties differently).
    np.testing.assert_array_equal(y, nn.max_pool(jnp.asarray(nchw_to_nhwc(x_nchw)), (window, window),
                                                 strides=(stride, stride), padding=((pad, pad), (pad, pad))))
  assert within(rel_err(y, nchw_to_nhwc(ty.detach().numpy())), 'rewrite_rel_f64', 'max_pool value vs torch (rel)')
  assert within(rel_err(dx, nchw_to_nhwc(tx.grad.numpy())), 'rewrite_rel_f64', 'max_pool gradient vs torch (rel)')


def _weighted_moments(x, weights_b, count):
  """The textbook weighted formulas masked_moments must equal (values and derivatives)."""
  weights = weights_b.reshape((-1,) + (1,) * (x.ndim - 1))
  axes = tuple(range(x.ndim - 1))
  mean = jnp.sum(x * weights, axis=axes) / count
  return mean, jnp.sum(jnp.square(x - mean) * weights, axis=axes) / count


def test_masked_moments_equal_the_weighted_formulas_with_their_gradient_in_float64():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 5, 6, 3)) * 3.0 + 2.0
  x[3] = 1e3   # a padding row: must not reach the values or the gradient of the valid rows
  weights = np.array([1.0, 1.0, 1.0, 0.0])
  probe_mean, probe_var = rng.standard_normal(3), rng.standard_normal(3)
  with jax.enable_x64(True):
    x64, w64 = jnp.asarray(x), jnp.asarray(weights)
    count = jnp.sum(w64) * 30

    def loss(fn, x_):
      mean, var = fn(x_, w64, count)
      return jnp.sum(mean * probe_mean) + jnp.sum(jnp.sqrt(var) * probe_var)

    ours, reference = masked_moments(x64, w64, count), _weighted_moments(x64, w64, count)
    grad_ours = jax.grad(lambda x_: loss(masked_moments, x_))(x64)
    grad_ref = jax.grad(lambda x_: loss(_weighted_moments, x_))(x64)
  np.testing.assert_allclose(ours[0], x[:3].mean(axis=(0, 1, 2)), rtol=1e-13)
  np.testing.assert_allclose(ours[1], x[:3].var(axis=(0, 1, 2)), rtol=1e-13)
  for got, want, what in ((ours[0], reference[0], 'mean'), (ours[1], reference[1], 'var'),
                          (grad_ours, grad_ref, 'gradient')):
    assert within(rel_err(got, want), 'rewrite_rel_f64', f'masked BN {what} vs weighted formula (rel)')
  assert np.all(np.asarray(grad_ours)[3] == 0)
  assert np.any(np.asarray(grad_ours)[:3] != 0)


def test_max_pool_gradient_reaches_one_input_per_window_when_the_output_is_rounded_differently():
  """Under jit XLA may compute the pool's input in two fusions an ulp apart, so the saved output
  equals no tap of its window: every window's gradient must still reach its first maximum."""
  from tl_jax.models.layers import _max_pool_bwd
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
  window, strides, padding = (3, 3), (2, 2), ((1, 1), (1, 1))
  y = max_pool(x, window, strides, padding)
  y_off = jnp.nextafter(y, jnp.inf)   # the forward's output one ulp away from every tap
  dy = jnp.ones_like(y)
  (dx,) = _max_pool_bwd(window, strides, padding, (x, y_off), dy)
  (dx_exact,) = _max_pool_bwd(window, strides, padding, (x, y), dy)
  assert float(jnp.sum(dx)) == float(jnp.sum(dy))
  np.testing.assert_array_equal(dx, dx_exact)
