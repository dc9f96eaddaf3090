"""Early stopping per stage (Keras's EarlyStopping semantics), in the real run loop and across --resume.

The runs train a head on cached features of a random ResNet-18 (seconds each). A `min_delta` larger than
any change makes the stage's first epoch its only improvement, so the stop comes after exactly
`patience` more epochs whatever the numbers.
"""

import json
import re
import math
from types import SimpleNamespace

import pytest

from helpers import compilation_cache, head_only_values, two_class_folder  # noqa: F401 (a fixture)
from tl_jax.config import ConfigError, validate
from tl_jax.training import early_stopping
from tl_jax.training import train_and_evaluate

pytestmark = pytest.mark.usefixtures('compilation_cache')
QUIET = dict(progress=False, plots=False, report=False)
NEVER_IMPROVES = {'monitor': 'val_loss', 'patience': 2, 'min_delta': 100.0}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  return two_class_folder(tmp_path_factory.mktemp('data'))


def _keras(values, monitor, patience, min_delta):
  """Keras 3's EarlyStopping.on_epoch_end written out: the epoch after which fit stops, or None."""
  better = (lambda a, b: a - (-min_delta) < b) if monitor == 'val_loss' else (lambda a, b: a - min_delta > b)
  best, wait = None, 0
  for epoch, value in enumerate(values):
    wait += 1
    if best is None or better(value, best):
      best, wait = value, 0
      continue
    if wait >= patience and epoch > 0:
      return epoch
  return None


@pytest.mark.parametrize('monitor', ['val_loss', 'val_acc'])
@pytest.mark.parametrize('patience,min_delta', [(0, 0.0), (1, 0.0), (2, 0.02), (3, 0.05)])
def test_update_counts_as_keras_does(monitor, patience, min_delta):
  sequences = [[1.0, 0.9, 0.95, 0.91, 0.89, 0.9, 0.92, 0.7], [0.5, 0.5, 0.5, 0.5], [0.3, 0.6, 0.61, 0.62, 0.2],
               [math.nan, 0.4, 0.4, 0.39]]
  config = SimpleNamespace(monitor=monitor, patience=patience, min_delta=min_delta)
  for values in sequences:
    record, stopped = None, None
    for epoch, value in enumerate(values):
      record = early_stopping.update(config, record, {'epoch': 10 + epoch, 'stage_epoch': epoch, monitor: value})
      if record['stopped_epoch'] is not None:
        stopped = record['stopped_epoch'] - 10
        break
    assert stopped == _keras(values, monitor, patience, min_delta), values


def test_schema_errors_name_the_key():
  assert validate(head_only_values('d', [{'name': 'a', 'early_stopping': {}}])).stages[0].early_stopping.patience == 5
  for bad, where in [({'monitor': 'val_f1'}, 'stages[0].early_stopping.monitor'),
                     ({'patience': -1}, 'stages[0].early_stopping.patience'),
                     ({'min_delta': -0.1}, 'stages[0].early_stopping.min_delta')]:
    with pytest.raises(ConfigError, match=re.escape(where)):
      validate(head_only_values('d', [{'name': 'a', 'early_stopping': bad}]))


@pytest.mark.slow
def test_a_stage_stops_after_patience_epochs_and_the_next_stage_runs(data, tmp_path):
  config = validate(head_only_values(data, [{'name': 'first', 'epochs': 6, 'early_stopping': NEVER_IMPROVES},
                                            {'name': 'second', 'epochs': 1}]))
  lines = []
  result = train_and_evaluate(config, tmp_path / 'run', log=lines.append, **QUIET)
  assert [r['epoch'] for r in result.history] == [0, 1, 2, 6]
  assert [r['stage'] for r in result.history] == ['first'] * 3 + ['second']
  assert result.history[2]['early_stopping']['stopped_epoch'] == 2
  assert result.history[2]['early_stopping']['best_epoch'] == 0
  assert any(line.startswith('stage first: stopped early after epoch 2: val_loss did not improve on its best')
             for line in lines), lines
  written = json.loads((tmp_path / 'run' / 'history.json').read_text())
  assert written['early_stopping']['first']['stopped_epoch'] == 2


class _Crash(Exception):
  pass


class _CrashAfter:
  def __init__(self, epoch):
    self.epoch = epoch

  def on_epoch_end(self, run, epoch, state, row):
    if epoch == self.epoch:
      raise _Crash()

  def __getattr__(self, name):
    return lambda *args: None


@pytest.mark.slow
@pytest.mark.parametrize('crash_after', [1, 2])
def test_the_count_survives_resume(data, tmp_path, crash_after):
  """Killed after epoch 1 (one epoch without improvement counted) or after epoch 2 (the stage has stopped):
  the resumed run stops where the uninterrupted one does and goes on with the next stage."""
  config = validate(head_only_values(data, [{'name': 'first', 'epochs': 5, 'early_stopping': NEVER_IMPROVES},
                                            {'name': 'second', 'epochs': 1}]))
  with pytest.raises(_Crash):
    train_and_evaluate(config, tmp_path / 'run', log=lambda _: None, callbacks=[_CrashAfter(crash_after)], **QUIET)
  lines = []
  result = train_and_evaluate(config, tmp_path / 'run', resume=True, log=lines.append, **QUIET)
  assert [r['epoch'] for r in result.history] == [0, 1, 2, 5]
  assert result.history[2]['early_stopping']['stopped_epoch'] == 2
  assert (f'resuming {tmp_path / "run"} after epoch {crash_after}') in lines
