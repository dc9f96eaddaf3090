"""Winograd 3x3 convolutions against lax's direct convolution: values and both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err, within
from tl_jax.models import winograd

PAD = ((1, 1), (1, 1))


def _direct(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), PAD, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# Odd and even maps, ResNet's 7x7 and 14x14, sizes that leave a partial tile for either tile size,
# and a batch whose last rows are padding (zeros), as the trainer's padded last batch.
SHAPES = [(2, 7, 7, 3, 5), (3, 14, 14, 4, 6), (1, 8, 9, 2, 3), (2, 5, 6, 3, 2), (1, 1, 1, 2, 2), (4, 6, 6, 3, 4)]
SHAPES = [s if s in ((2, 7, 7, 3, 5), (4, 6, 6, 3, 4)) else pytest.param(s, marks=pytest.mark.slow) for s in SHAPES]


@pytest.mark.parametrize('m', winograd.TILES)
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)) if isinstance(s, tuple) else None)
def test_values_and_gradients_equal_the_direct_convolution_in_float64(shape, m):
  n, h, w, ci, co = shape
  rng = np.random.default_rng(sum(shape) + m)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((n, h, w, ci)))
    if n == 4:
      x = x.at[2:].set(0.0)   # padded rows
    k = jnp.asarray(rng.standard_normal((3, 3, ci, co)))
    dy = jnp.asarray(rng.standard_normal((n, h, w, co)))

    def value_and_grads(conv):
      y, vjp = jax.vjp(conv, x, k)
      return (y, *vjp(dy))

    ours = jax.jit(lambda: value_and_grads(lambda a, b: winograd.conv3x3(a, b, m)))()
    ref = jax.jit(lambda: value_and_grads(_direct))()
    for what, a, b in zip(('value', 'dx', 'dW'), ours, ref):
      assert within(rel_err(a, b), 'rewrite_rel_f64', f'Winograd F({m}x{m},3x3) {what} float64'), (what, shape)


@pytest.mark.parametrize('m', winograd.TILES)
def test_float32_error_is_that_of_rounding(m):
  """float32 Winograd against the float64 direct convolution: F(2x2) as close as XLA's own float32
  convolution (within 4x), F(4x4) within 1e-4 (its transforms' larger coefficients)."""
  rng = np.random.default_rng(m)
  x = rng.standard_normal((2, 14, 14, 32)).astype(np.float32)
  k = (rng.standard_normal((3, 3, 32, 16)) / np.sqrt(288)).astype(np.float32)
  with jax.enable_x64(True):
    ref = np.asarray(_direct(jnp.asarray(x, jnp.float64), jnp.asarray(k, jnp.float64)))
  direct_err = rel_err(jax.jit(_direct)(x, k), ref)
  ours_err = rel_err(jax.jit(lambda a, b: winograd.conv3x3(a, b, m))(x, k), ref)
  assert ours_err <= (4 * max(direct_err, 1e-7) if m == 2 else 1e-4), (ours_err, direct_err)


def test_jitted_and_differentiated_inside_a_model_step():
  """Under jit and grad of a loss (the train step's use), the same as lax's."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  loss = lambda conv: jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.tanh(conv(a, b))), argnums=(0, 1)))  # noqa: E731
  ours = loss(lambda a, b: winograd.conv3x3(a, b, 2))(x, k)
  ref = loss(_direct)(x, k)
  for a, b in zip(ours, ref):
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize('ops', [(2, 0, 4), (0, 4, 0), (4, 2, 2)])
def test_a_plan_mixing_winograd_and_direct_ops_is_exact_in_float64(ops):
  """Each of forward, dx and dW runs as its planned tile size or as the direct conv."""
  rng = np.random.default_rng(sum(ops))
  with jax.enable_x64(True):
    x, k, dy = (jnp.asarray(rng.standard_normal(s)) for s in ((2, 7, 7, 3), (3, 3, 3, 4), (2, 7, 7, 4)))

    def value_and_grads(conv):
      y, vjp = jax.vjp(conv, x, k)
      return (y, *vjp(dy))

    ours = jax.jit(lambda: value_and_grads(lambda a, b: winograd.planned_conv3x3(a, b, ops)))()
    ref = value_and_grads(_direct)
  for what, a, b in zip(('values', 'dx', 'dW'), ours, ref):
    assert within(rel_err(a, b), 'rewrite_rel_f64', f'Winograd plan {ops}: {what}')


def _resnet18_policy(batch):
  shapes = [(64, 64, 8), (128, 128, 4), (256, 256, 2), (512, 512, 1)]   # resnet18's 3x3 stride-1 shapes at 32 px
  return {(c, c, s, batch): (2, 4, 2) for c, _, s in shapes}


@pytest.mark.slow
def test_models_take_winograd_where_the_policy_says_and_equal_the_direct_model(monkeypatch):
  """resnet18 with every 3x3 stride-1 conv planned as Winograd: float64 logits and gradients equal the
  direct model's; the policy is consulted only with winograd on, and an empty policy changes nothing."""
  from tl_jax.models import create_model, init_variables
  from tl_jax import losses
  calls = []
  monkeypatch.setattr(winograd, 'policy', lambda: calls.append(1) or _resnet18_policy(2))
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    on, off = create_model('resnet18', 3), create_model('resnet18', 3, winograd=False)
    assert on.winograd and not off.winograd
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), init_variables(off, jax.random.PRNGKey(0)))
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)))
    batch = {'labels': jnp.asarray([0, 2]), 'mask': jnp.ones(2, bool)}

    def loss_and_grads(model):
      def loss(params):
        logits = model.apply({**variables, 'params': params}, x, train=False)
        return losses.cross_entropy(logits, batch)['loss_sum']
      return jax.jit(jax.value_and_grad(loss))(variables['params'])

    (l_on, g_on), (l_off, g_off) = loss_and_grads(on), loss_and_grads(off)
    assert calls, 'the Winograd model never consulted the policy'
    n_calls = len(calls)
    loss_and_grads(off)
    assert len(calls) == n_calls, 'the direct model consulted the policy'
  assert within(abs(float(l_on) - float(l_off)) / abs(float(l_off)), 'rewrite_rel_f64', 'resnet18 with Winograd: loss')
  worst = max(rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(g_on), jax.tree_util.tree_leaves(g_off)))
  assert within(worst, 'rewrite_rel_f64', 'resnet18 with Winograd: every gradient')
  # A shape outside the policy keeps the direct path.
  assert winograd.plan((2, 9, 9, 64), (3, 3, 64, 64)) == (0, 0, 0)


def test_winograd_is_refused_for_families_without_it():
  from tl_jax.models import create_model
  with pytest.raises(ValueError, match='built for the ResNets and VGG, not mobilenet_v2'):
    create_model('mobilenet_v2', 3, winograd=True)
  assert create_model('mobilenet_v2', 3, winograd=False).arch == 'mobilenet_v2'


def test_the_bench_keeps_winograd_only_where_it_is_faster_and_accurate():
  """bench_winograd.policy: per op the faster accurate tile size within the margin of XLA's time, else 0."""
  import importlib.util
  from pathlib import Path
  path = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_winograd.py'
  spec = importlib.util.spec_from_file_location('bench_winograd', path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  ok, loose = [5e-7] * 3, [8e-6] * 3
  row = {'ci': 64, 'co': 64, 'size': 56, 'batch': 4,
         'xla': {'forward': 10.0, 'dx': 10.0, 'dw': 10.0},
         'f2': {'forward': 8.0, 'dx': 9.5, 'dw': 20.0, 'errors': ok},
         'f4': {'forward': 5.0, 'dx': 5.0, 'dw': 5.0, 'errors': loose}}
  [entry] = bench.policy([row], margin=0.9)['shapes']
  # forward: F(2x2) 0.8x XLA; dx: F(2x2) 0.95x, not within the margin; dW: slower. F(4x4) is faster
  # everywhere but too inexact for float32 parity.
  assert (entry['forward'], entry['dx'], entry['dw']) == (2, 0, 0)
  row['f4']['errors'] = ok
  [entry] = bench.policy([row], margin=0.9)['shapes']
  assert (entry['forward'], entry['dx'], entry['dw']) == (4, 4, 4)
