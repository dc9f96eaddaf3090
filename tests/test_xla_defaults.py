"""tl_jax.xla_defaults: which XLA_FLAGS tl_jax sets on import, and that the installed jaxlib accepts them."""

import os
import subprocess
import sys

import pytest

from tl_jax import xla_defaults
from tl_jax.xla_defaults import FLAG, VALUE, flags_to_add


@pytest.mark.parametrize('environ, jaxlib, expected', [
    ({}, '0.10.2', f'{FLAG}={VALUE}'),
    ({'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}, '0.10.2',
     f'--xla_force_host_platform_device_count=4 {FLAG}={VALUE}'),
    ({'XLA_FLAGS': f'{FLAG}='}, '0.10.2', None),          # the user's own setting wins
    ({'TL_JAX_XLA_DEFAULTS': '0'}, '0.10.2', None),        # opted out
    ({}, '0.8.3', None),                                    # a jaxlib not checked for the flag
    ({}, '0.9.0', f'{FLAG}={VALUE}'),
    ({}, '0.10.0rc1', f'{FLAG}={VALUE}'),
    ({}, None, None),                                       # no jaxlib
])
def test_flags_to_add(environ, jaxlib, expected):
  assert flags_to_add(environ, jaxlib) == expected


def test_apply_changes_only_the_given_environment():
  env = {}
  assert xla_defaults.apply(env) == (flags_to_add({}, _jaxlib_version()) is not None)
  assert xla_defaults.apply(env) is False     # already set: left alone


def _jaxlib_version():
  from importlib.metadata import version
  return version('jaxlib')


def _run(code, **env):
  environ = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'TL_JAX_XLA_DEFAULTS')}
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                        env={**environ, **env})


@pytest.mark.slow
def test_the_installed_jaxlib_accepts_the_flag_and_a_jitted_conv_runs():
  """XLA aborts the process on a flag it does not know; importing tl_jax must not do that."""
  code = ('import os, tl_jax, jax, jax.numpy as jnp\n'
          'x = jnp.ones((1, 8, 8, 3)); w = jnp.ones((3, 3, 3, 4))\n'
          'y = jax.jit(lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME", '
          'dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, w)\n'
          'print(os.environ.get("XLA_FLAGS", ""), float(y[0, 4, 4, 0]))')
  result = _run(code)
  assert result.returncode == 0, result.stderr[-2000:]
  flags, value = result.stdout.split('\n')[0].rsplit(' ', 1)
  assert float(value) == 27.0
  assert (f'{FLAG}={VALUE}' in flags) == (flags_to_add({}, _jaxlib_version()) is not None)
  opted_out = _run(code, TL_JAX_XLA_DEFAULTS='0')
  assert opted_out.returncode == 0 and FLAG not in opted_out.stdout


@pytest.mark.parametrize('environ, jaxlib, platform, expected', [
    ({}, '0.10.2', 'cpu', xla_defaults.FORWARD_OPTIONS),
    ({}, '0.10.2', 'gpu', {}),                               # an XLA:CPU option only
    ({'XLA_FLAGS': f'{FLAG}=+dot'}, '0.10.2', 'cpu', {}),     # the user's own setting wins
    ({'XLA_FLAGS': f'--xla_cpu_use_xnnpack=false {FLAG}={VALUE}'}, '0.10.2', 'cpu',
     xla_defaults.FORWARD_OPTIONS),                           # tl_jax's own flag (xla_defaults.apply)
    ({'TL_JAX_XLA_DEFAULTS': '0'}, '0.10.2', 'cpu', {}),
    ({}, '0.8.3', 'cpu', {}),
    ({}, None, 'cpu', {}),
])
def test_forward_options_for(environ, jaxlib, platform, expected):
  assert xla_defaults.forward_options_for(environ, jaxlib, platform) == expected


def _ynn_fusions(compiled) -> int:
  text = compiled.as_text()
  return text[text.index('ENTRY'):].count('%ynn_fusion')


@pytest.mark.slow
def test_forward_steps_compile_without_ynnpack_fusions():
  """The eval step the train loop compiles carries the forward options, and XLA honours them:
  the same step compiled with the process's settings alone still has YNNPACK fusions."""
  import functools

  import jax
  import numpy as np

  from tl_jax import parallel, training as train
  from tl_jax.models import create_model, init_variables
  if not xla_defaults.forward_compiler_options():
    pytest.skip('forward options do not apply here (not CPU, opted out or an older jaxlib)')
  model = create_model('resnet18', 2)
  variables = init_variables(model, jax.random.PRNGKey(0), image_size=32)
  state = train.TrainState(step=0, apply_fn=None, params=variables['params'], tx=None, opt_state=None,
                           batch_stats=variables['batch_stats'], rng=None)
  batch = {'images': np.zeros((8, 64, 64, 3), np.float32), 'labels': np.zeros(8, np.int32),
           'mask': np.ones(8, bool)}
  mesh = parallel.make_mesh(1)
  ours = parallel.jit_eval_step(train.eval_step, mesh, model=model).lower(state, batch).compile()
  plain = jax.jit(functools.partial(train.eval_step, model=model)).lower(state, batch).compile()
  assert _ynn_fusions(plain) > 0, 'the process settings no longer give YNNPACK fusions: re-measure'
  assert _ynn_fusions(ours) == 0
  np.testing.assert_allclose(np.asarray(ours(state, batch)['loss_sum']),
                             np.asarray(plain(state, batch)['loss_sum']), rtol=1e-5)
