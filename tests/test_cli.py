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


def test_a_stop_on_request_prints_its_line_and_exits_with_its_status(capsys):
  assert _exit_and_stderr(_raise(cli.Stopped('SIGTERM: stopped; saved runs/x/checkpoints/3', 143)), capsys) == (
      143, 'SIGTERM: stopped; saved runs/x/checkpoints/3\n')


def test_an_error_with_an_exit_code_exits_with_it(capsys, monkeypatch):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

  class Diverged(RuntimeError):
    __module__ = 'tl_jax.training.faults'
    exit_code = 3

  assert _exit_and_stderr(_raise(Diverged('non-finite loss')), capsys) == (3, 'error: non-finite loss\n')


def test_what_a_failed_orbax_call_leaves_behind_is_dropped_and_the_rest_kept(monkeypatch):
  import sys
  import types
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  with pytest.raises(SystemExit):
    cli.run(lambda: None)
  orbax_coroutine = types.SimpleNamespace(cr_code=types.SimpleNamespace(
      co_filename='/site-packages/orbax/checkpoint/_src/serialization/serialization.py'))
  for error, source in ((RuntimeError('Event loop is closed'), None),
                        (ImportError('sys.meta_path is None, Python is likely shutting down'), None),
                        (Exception('Encountered error while reading array index'), orbax_coroutine),
                        (RuntimeError('other'), None)):
    sys.unraisablehook(types.SimpleNamespace(exc_value=error, object=source))
  assert [str(u.exc_value) for u in seen] == ['other']
