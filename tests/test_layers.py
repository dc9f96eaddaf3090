"""Layers against their torch.nn counterparts, computed in the test."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import nchw_to_nhwc, rel_err, within
from tl_jax.models.layers import max_pool

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
