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
