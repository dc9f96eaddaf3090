"""tl_jax.cli.run: one clear line for bad input, the traceback on request."""

import logging

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


def _never_retrieved(error):
  """The record asyncio logs when a task that failed with `error` is collected unobserved."""
  return logging.LogRecord('asyncio', logging.ERROR, __file__, 0, 'Task exception was never retrieved\nfuture: ...',
                           None, (type(error), error, error.__traceback__))


def test_asyncios_unobserved_orbax_tasks_are_dropped_and_other_records_kept():
  keep = cli.OrbaxTaskNoise().filter
  orbax_code = compile('def read():\n  raise Exception("reading array index (slice(0, 3, 1),)")\n',
                       '/site-packages/orbax/checkpoint/_src/serialization/serialization.py', 'exec')
  scope = {}
  exec(orbax_code, scope)   # pylint: disable=exec-used
  try:
    scope['read']()
  except Exception as e:  # pylint: disable=broad-except
    from_orbax = e
  assert not keep(_never_retrieved(from_orbax))
  assert not keep(_never_retrieved(ValueError('OUT_OF_RANGE: Error reading "params.x/0" in OCDBT database')))
  assert keep(_never_retrieved(ValueError('a task of the user failed')))
  other = logging.LogRecord('asyncio', logging.ERROR, __file__, 0, 'Unclosed event loop', None,
                            (type(from_orbax), from_orbax, from_orbax.__traceback__))
  assert keep(other)


def test_a_cut_checkpoint_gives_one_line_and_no_asyncio_records(tmp_path):
  """A real damaged checkpoint under the scripts' settings: one reason, nothing logged by asyncio. (Whether
  orbax leaves unobserved tasks depends on the tree and on timing; a cut ResNet-18 train state does,
  which tests/test_faults.py's resume over a cut checkpoint runs through train.py.)"""
  import gc
  import shutil
  import numpy as np
  import orbax.checkpoint as ocp
  from tl_jax import checkpoint
  rng = np.random.default_rng(0)
  tree = {f'w{i}': rng.standard_normal((128, 128), np.float32) for i in range(60)}
  with ocp.StandardCheckpointer() as saver:
    saver.save(tmp_path / 'whole', tree)
  records = []

  class Collect(logging.Handler):
    def emit(self, record):
      records.append(record)

  asyncio_logger = logging.getLogger('asyncio')
  handler = Collect()
  asyncio_logger.addHandler(handler)
  try:
    cli.quiet_library_noise()
    assert sum(isinstance(f, cli.OrbaxTaskNoise) for f in asyncio_logger.filters) == 1
    for fraction in (0.1, 0.3, 0.6):
      cut = tmp_path / f'cut_{fraction}'
      shutil.copytree(tmp_path / 'whole', cut)
      largest = max((p for p in cut.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
      content = largest.read_bytes()
      largest.write_bytes(content[:int(len(content) * fraction)])
      with ocp.StandardCheckpointer() as loader:
        _, reason, _ = checkpoint.attempt(lambda: loader.restore(cut))  # pylint: disable=cell-var-from-loop
      assert reason and '\n' not in reason and 'OCDBT' in reason
      gc.collect()
    assert records == []
  finally:
    asyncio_logger.removeHandler(handler)
