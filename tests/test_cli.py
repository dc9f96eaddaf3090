"""tl_jax.cli.run: one clear line for bad input, the traceback on request."""

import pytest

from tl_jax import cli
from tl_jax.config import ConfigError


def _exit_and_stderr(main, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main)
  return exit_info.value.code, capsys.readouterr().err


def _raise(error):
  def main():
    raise error
  return main


def test_own_error_is_one_line_and_exit_2(capsys, monkeypatch):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  code, err = _exit_and_stderr(_raise(ConfigError('epochs must be >= 1, got 0')), capsys)
  assert code == 2
  assert err == 'error: epochs must be >= 1, got 0\n'


def test_foreign_error_says_how_to_see_the_traceback(capsys, monkeypatch):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  code, err = _exit_and_stderr(_raise(ValueError('shapes (3,) and (4,) differ')), capsys)
  assert code == 2
  assert err.startswith('error: shapes (3,) and (4,) differ\n')
  assert 'ValueError' in err and f'{cli.DEBUG_ENV}=1' in err and 'Traceback' not in err


def test_debug_env_prints_the_traceback(capsys, monkeypatch):
  monkeypatch.setenv(cli.DEBUG_ENV, '1')
  code, err = _exit_and_stderr(_raise(ValueError('boom')), capsys)
  assert code == 2
  assert 'Traceback (most recent call last)' in err and 'error: boom' in err


def test_interrupt_and_success_exit_codes(capsys):
  assert _exit_and_stderr(_raise(KeyboardInterrupt()), capsys) == (130, 'interrupted\n')
  assert _exit_and_stderr(lambda: None, capsys)[0] == 0
  assert _exit_and_stderr(lambda: 3, capsys)[0] == 3
