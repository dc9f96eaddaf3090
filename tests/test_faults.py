"""Faults lose nothing and say so: damaged checkpoints, non-finite losses, SIGTERM/SIGINT with a
mid-epoch resume, a directory in use, a full disk (tl_jax.rundir, tl_jax.training.faults, tl_jax.cli).

The default tier drives the real run loop on a frozen ResNet-18 backbone whose features are computed
once per stage (bn: frozen, deterministic transforms), so its steps train the head alone; signals are
real ones sent by the process to itself. The slow tier sends them to a real `train.py` subprocess.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import compilation_cache, two_class_folder  # noqa: F401  (a fixture, used by name)
from tl_jax import checkpoint, cli
from tl_jax.config import validate
from tl_jax.rundir import RunDir, RunError
from tl_jax.training import faults

REPO = Path(__file__).resolve().parents[1]
# A failed orbax read or write leaves operations in flight that end in its closed event loop; a script
# (tl_jax.cli.run) drops that noise, pytest reports it as a warning.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
NORMALIZE = {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]}}
# Deterministic train transforms and bn: frozen: the stage caches its backbone features and its steps
# train the head alone, so a whole run takes seconds.
FIXED = [{'Resize': {'size': 36}}, {'CenterCrop': {'size': 32}}, {'ToTensor': {}}, NORMALIZE]
QUIET = dict(progress=False, plots=False, report=False)
METRICS = ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'lr')


# The runs here compile the same computations (the init, the features, the head's steps): JAX's
# persistent compilation cache lets the first run's executables serve the others.
pytestmark = [pytestmark, pytest.mark.usefixtures('compilation_cache')]


_folder = two_class_folder


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  return _folder(tmp_path_factory.mktemp('data'))


def _config(data, epochs=2, **top):
  stage = {'name': 'head', 'epochs': epochs, 'trainable': ['head'], 'bn': 'frozen',
           'optimizer': {'name': 'sgd', 'lr': 0.01, 'momentum': 0.9}, **top.pop('stage', {})}
  return validate({'model': {'arch': 'resnet18', 'weights': 'random'},
                   'data': {'path': str(data), 'batch_size': 4, 'eval_batch_size': 8, 'workers': 0,
                            'train_transforms': FIXED, 'val_transforms': FIXED},
                   'stages': [stage], 'seed': 0, **top})


def _train(config, workdir, lines=None, **kwargs):
  from tl_jax.training import train_and_evaluate
  log = lines.append if lines is not None else (lambda _: None)
  return train_and_evaluate(config, workdir, log=log, **QUIET, **kwargs)


@pytest.fixture(scope='module')
def straight(data, tmp_path_factory):
  """The uninterrupted two-epoch run every interrupted one must end equal to."""
  return _train(_config(data), tmp_path_factory.mktemp('straight') / 'run').history


def _assert_same_run(history, expected):
  assert [r['epoch'] for r in history] == [r['epoch'] for r in expected]
  for ours, theirs in zip(history, expected):
    for key in METRICS:
      assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (ours['epoch'], key)


class _OnStep:
  """A Callback that calls `action()` after train step `step` of `epoch` (phase `phase`)."""

  def __init__(self, epoch, step, action, phase='train'):
    self.epoch, self.step, self.action, self.phase, self.current = epoch, step, action, phase, None

  def on_epoch_start(self, run, epoch):
    self.current = epoch

  def on_step_end(self, run, phase, step, sums):
    if (self.current, phase, step) == (self.epoch, self.phase, self.step):
      self.action()

  def __getattr__(self, name):
    return lambda *args: None


def _exit_status_and_stderr(main, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main)
  return exit_info.value.code, capsys.readouterr().err


# ------------------------------------------------------------------------------ damaged checkpoints


def _tree(seed: int):
  params = {'fc': {'kernel': jnp.asarray(np.random.default_rng(seed).standard_normal((256, 64)), jnp.float32),
                   'bias': jnp.zeros(64)}}
  return {'params': params, 'batch_stats': {}, 'opt_state': optax.sgd(0.1, momentum=0.9).init(params),
          'step': jnp.asarray(seed)}


def _cut_largest_file(directory: Path) -> Path:
  """Half of the largest file under `directory` cut off, as a full disk or an interrupted copy leaves it."""
  largest = max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  content = largest.read_bytes()
  largest.write_bytes(content[:len(content) // 2])
  return largest


def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(tmp_path):
  run = RunDir(tmp_path / 'run')
  for seed in (1, 2):
    run.save(_tree(seed), {'seed': seed})
  run.close()
  _cut_largest_file(tmp_path / 'run' / 'checkpoints' / '1' / 'state')
  lines = []
  again = RunDir(tmp_path / 'run', resume=True, log=lines.append)
  restored = again.restore(lambda meta: _tree(0))
  assert restored.meta == {'seed': 1} and restored.path.name == '0'
  np.testing.assert_array_equal(restored.state['params']['fc']['kernel'], _tree(1)['params']['fc']['kernel'])
  damaged = str(tmp_path / 'run' / 'checkpoints' / '1')
  assert any(line.startswith(f'warning: checkpoint {damaged} does not restore: ') and 'OUT_OF_RANGE' in line
             for line in lines), lines
  assert any('resuming from' in line and line.endswith('the newest checkpoint that restores') for line in lines)
  # Set aside, not deleted, and out of the rotation: the next save keeps the good one beside it.
  assert (tmp_path / 'run' / 'checkpoints.damaged' / '1').is_dir()
  assert again.save(_tree(3), {'seed': 3}).name == '2'
  again.close()
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()) == ['0', '2']


def test_when_no_checkpoint_restores_it_is_one_line_and_exit_status_2(tmp_path, capsys):
  run = RunDir(tmp_path / 'run')
  for seed in (1, 2):
    run.save(_tree(seed), {'seed': seed})
  run.close()
  for step in ('0', '1'):
    _cut_largest_file(tmp_path / 'run' / 'checkpoints' / step / 'state')
  again = RunDir(tmp_path / 'run', resume=True, log=lambda _: None)
  try:
    status, err = _exit_status_and_stderr(lambda: again.restore(lambda meta: _tree(0)), capsys)
  finally:
    again.close()
  assert status == 2 and err.count('\n') == 1, err
  assert err.startswith(f'error: no checkpoint in {tmp_path / "run" / "checkpoints"} restores (1: ')
  assert '0: ' in err and 'Traceback' not in err and 'Event loop' not in err


@pytest.fixture(scope='module')
def model_checkpoint(tmp_path_factory):
  from tl_jax.training.stages import initial_variables
  variables = initial_variables('resnet18', 2, 0)   # the runs' own init: compiled once (compilation_cache)
  metadata = checkpoint.make_metadata('resnet18', 2, {'mean': [0.5] * 3, 'std': [0.2] * 3}, ['ants', 'bees'])
  return checkpoint.save_model(tmp_path_factory.mktemp('model') / 'm', variables, metadata)


@pytest.mark.parametrize('command', ['predict', 'evaluate', 'convert'])
def test_predict_evaluate_and_convert_name_a_damaged_checkpoint_in_one_line(tmp_path, model_checkpoint, data, capsys,
                                                                           command):
  import shutil
  from tl_jax.commands import convert, evaluate, predict
  damaged = tmp_path / 'm'
  shutil.copytree(model_checkpoint, damaged)
  _cut_largest_file(damaged / 'variables')
  argv = {'predict': (predict, ['--checkpoint', damaged, data / 'val' / 'ants' / 'ants_0.png']),
          'evaluate': (evaluate, ['--checkpoint', damaged, '--data', data / 'val']),
          'convert': (convert, ['--to-torch', damaged, '--out', tmp_path / 'out.safetensors'])}
  module, args = argv[command]
  status, err = _exit_status_and_stderr(lambda: module.main([str(a) for a in args]), capsys)
  assert status == 2 and err.count('\n') == 1, err
  assert err.startswith(f'error: cannot read the checkpoint at {damaged}: ') and 'damaged or incomplete' in err


# ------------------------------------------------------------------------------ non-finite losses


def test_a_non_finite_step_is_skipped_or_flagged_by_the_train_step():
  from tl_jax import optim
  from tl_jax.models import create_model
  from tl_jax.training import create_train_state, train_step
  from tl_jax.training.stages import initial_variables
  model = create_model('resnet18', 2)
  variables = initial_variables('resnet18', 2, 0)
  tx = optim.make_optimizer(variables['params'], ['head'], {'name': 'sgd', 'lr': 0.1, 'momentum': 0.9},
                            optim.make_schedule(None, 0.1, 1, 3))
  trainable = optim.trainable_mask(variables['params'], ['head'])
  features = np.ones((2, 512), np.float32)
  good = {'features': features, 'labels': np.array([0, 1], np.int32), 'mask': np.ones(2, bool)}
  bad = {**good, 'features': np.where(np.arange(512) == 3, np.nan, features).astype(np.float32)}
  for policy in ('stop', 'skip_step'):
    state = create_train_state(model, variables, tx)
    step = jax.jit(lambda s, b, policy=policy: train_step(s, b, model=model, trainable=trainable, bn_train=False,
                                                           on_nonfinite=policy))
    state, sums = step(state, good)
    assert bool(sums['finite']) if policy == 'stop' else not bool(sums['skipped'])
    before = jax.device_get(state)
    after, sums = step(state, bad)
    if policy == 'stop':
      assert not bool(sums['finite']) and np.isnan(float(sums['loss_sum']))
      continue
    # Skipped: weights and momentum as they were, the counts moved on, nothing added to the metrics.
    assert bool(sums['skipped']) and float(sums['loss_sum']) == 0 and float(sums['count']) == 0
    np.testing.assert_array_equal(after.params['fc']['kernel'], before.params['fc']['kernel'])
    for old, new in zip(jax.tree_util.tree_leaves(before.opt_state), jax.tree_util.tree_leaves(after.opt_state)):
      if jnp.issubdtype(new.dtype, jnp.inexact):
        np.testing.assert_array_equal(new, old)
    assert int(after.step) == int(before.step) + 1


def test_step_sums_are_read_without_waiting_and_stop_at_the_first_non_finite_step():
  class Pending:
    """A device value whose step is still running until `ready` is set."""

    def __init__(self, value, ready=False):
      self.value, self.ready = value, ready

    def is_ready(self):
      return self.ready

    def __array__(self, dtype=None, copy=None):
      return np.asarray(self.value, dtype)

  sums = faults.StepSums(faults.PhaseProgress())
  steps = [{'loss_sum': Pending(1.0 if finite else np.nan), 'correct': 1.0, 'count': 4.0,
            'finite': Pending(finite)} for finite in (True, True, False, True)]
  sums.add(steps[0])
  assert sums.progress.steps == 0   # step 0 still running: nothing read, nothing waited for
  steps[0]['loss_sum'].ready = steps[0]['finite'].ready = True
  sums.add(steps[1])
  assert sums.progress.steps == 1 and sums.progress.totals == {'loss_sum': 1.0, 'correct': 1.0, 'count': 4.0}
  sums.add(steps[2])
  with pytest.raises(faults.NonFiniteError, match='non-finite loss or gradient') as error:
    sums.read_all()
  assert error.value.step == 2 and np.isnan(error.value.loss)
  # on_nonfinite: skip_step: the step zeroed its sums and says it was skipped; the phase goes on.
  skipping = faults.StepSums(faults.PhaseProgress())
  for skipped in (False, True, False):
    skipping.add({'loss_sum': 0.0 if skipped else 1.0, 'correct': 0.0, 'count': 0.0 if skipped else 4.0,
                  'skipped': skipped})
  done = skipping.read_all()
  assert (done.steps, done.skipped, done.totals['count']) == (3, 1, 8.0)


def _diverging(data, gamma):
  # Epoch 0 at lr 0.01, epoch 1 at 0.01 * gamma: 1e40 overflows float32, the weights become inf.
  return _config(data, stage={'schedule': {'name': 'step', 'step_size': 1, 'gamma': gamma}})


@pytest.mark.filterwarnings('ignore:overflow encountered in cast:RuntimeWarning')   # the lr of epoch 1: inf
def test_a_diverging_run_stops_at_the_first_non_finite_step_saving_nothing_non_finite(data, tmp_path, capsys):
  from tl_jax.training import NonFiniteError
  lines = []
  with pytest.raises(NonFiniteError) as error:
    _train(_diverging(data, 1e40), tmp_path / 'run', lines)
  message = str(error.value)
  assert '\n' not in message and error.value.exit_code == 3
  assert 'non-finite loss or gradient in stage head, epoch 1, train step ' in message
  assert f'{tmp_path / "run" / "checkpoints" / "0"} holds the last finite state' in message
  assert 'Try a lower lr' in message and 'clip_grad_norm' in message and 'on_nonfinite: skip_step' in message
  # Neither the best model nor a run checkpoint of the diverged epoch was written.
  assert sorted(p.name for p in (tmp_path / 'run' / 'best').iterdir()) == ['0']
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()) == ['0']
  history = json.loads((tmp_path / 'run' / 'history.json').read_text())
  assert len(history['epochs']) == 1 and history['stopped']['epoch'] == 1
  assert cli._report(error.value) == 3 and capsys.readouterr().err.endswith(f'error: {message}\n')
  # Resumed with a schedule that does not diverge, from the last finite state: the change is accepted and named.
  resumed = _train(_diverging(data, 0.1), tmp_path / 'run', lines, resume=True)
  assert any(line.startswith('resuming after the stop on a non-finite loss with stages[0].schedule.gamma')
             for line in lines), lines
  assert [r['epoch'] for r in resumed.history] == [0, 1]
  assert all(np.isfinite(r['train_loss']) for r in resumed.history)
  assert not (tmp_path / 'run' / 'stop.json').exists()


@pytest.mark.filterwarnings('ignore:overflow encountered in cast:RuntimeWarning')
def test_skip_step_skips_non_finite_steps_and_non_finite_weights_still_stop_the_run(data, tmp_path):
  """Epoch 1's first step has a finite loss and gradient but an update (lr inf) that overflows the weights;
  the steps after it are non-finite and skipped; the weights are checked before they are saved."""
  from tl_jax.training import NonFiniteError
  config = _config(data, stage={'on_nonfinite': 'skip_step',
                                'schedule': {'name': 'step', 'step_size': 1, 'gamma': 1e40}})
  with pytest.raises(NonFiniteError) as error:
    _train(config, tmp_path / 'run')
  assert str(error.value).startswith('non-finite weights after train step 3 of 3 (an update too large for '
                                     'float32) in stage head, epoch 1: stopped; nothing non-finite was saved')
  assert sorted(p.name for p in (tmp_path / 'run' / 'best').iterdir()) == ['0']
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()) == ['0']
  assert len(json.loads((tmp_path / 'run' / 'history.json').read_text())['epochs']) == 1


# ------------------------------------------------------------------------------ signals and mid-epoch resume


def _send(signum):
  return lambda: os.kill(os.getpid(), signum)


@pytest.mark.slow
def test_signals_save_mid_epoch_and_the_run_resumed_from_there_ends_as_the_uninterrupted_one(data, tmp_path,
                                                                                            straight):
  """SIGINT (Ctrl-C) in epoch 0's val phase, then SIGTERM after train step 1 of epoch 1 of the resumed
  run, both real signals: each saves where the run got and stops it with 130 / 143; resumed twice,
  the run ends with the uninterrupted run's numbers."""
  from tl_jax.training import Preempted
  workdir, config = tmp_path / 'run', _config(data)
  handler_before = signal.getsignal(signal.SIGINT)   # default_int_handler, or SIG_IGN in a background job
  with pytest.raises(Preempted) as first:
    _train(config, workdir, callbacks=[_OnStep(0, 0, _send(signal.SIGINT), 'val')])
  assert first.value.exit_code == 130
  assert str(first.value) == (f'SIGINT: stopped in the val phase of epoch 0; saved {workdir / "checkpoints" / "0"} '
                              '(its train phase done); continue it with --resume')
  assert signal.getsignal(signal.SIGINT) == handler_before   # the previous handlers are back
  lines = []
  with pytest.raises(Preempted) as second:
    _train(config, workdir, lines, resume=True, callbacks=[_OnStep(1, 0, _send(signal.SIGTERM))])
  assert f'resuming {workdir} in epoch 0 after train step 3 of 3' in lines
  assert second.value.exit_code == 143
  assert str(second.value) == (f'SIGTERM: stopped in epoch 1 after train step 1 of 3; saved '
                               f'{workdir / "checkpoints" / "2"}; continue it with --resume')
  resumed = _train(config, workdir, lines, resume=True)
  assert f'resuming {workdir} in epoch 1 after train step 1 of 3' in lines
  _assert_same_run(resumed.history, straight)


@pytest.mark.slow
def test_step_checkpoints_resume_mid_epoch_after_a_crash(data, tmp_path, straight):
  class Crash(Exception):
    pass

  def crash():
    raise Crash()

  config = _config(data, checkpoint_every={'steps': 2})
  lines = []
  with pytest.raises(Crash):
    # Step checkpoints after the run's train steps 2 and 4 (epoch 0 after 2 steps, epoch 1 after 1), with
    # epoch 0's own between them; the crash comes in epoch 1's third step.
    _train(config, tmp_path / 'run', lines, callbacks=[_OnStep(1, 2, crash)])
  assert f'saved {tmp_path / "run" / "checkpoints" / "2"} (epoch 1, after train step 1 of 3)' in lines
  resumed = _train(config, tmp_path / 'run', lines, resume=True)
  assert f'resuming {tmp_path / "run"} in epoch 1 after train step 1 of 3' in lines
  _assert_same_run(resumed.history, straight)


def test_checkpoint_every_takes_steps_or_minutes():
  from tl_jax.config import ConfigError
  schedule = faults.SaveSchedule(validate({'stages': [{'name': 'a', 'epochs': 1}],
                                           'checkpoint_every': {'steps': 4}}).checkpoint_every, 3)
  assert [(e, s) for e in range(3) for s in range(1, 4) if schedule.due(e, s)] == [(1, 1), (2, 2)]
  schedule = faults.SaveSchedule(validate({'stages': [{'name': 'a', 'epochs': 1}],
                                           'checkpoint_every': {'minutes': 0.5}}).checkpoint_every, 10)
  assert not schedule.due(0, 1)
  schedule.last_save -= 31
  assert schedule.due(0, 1) and not schedule.due(0, 10)   # the epoch's own checkpoint follows its last step
  for bad in ({}, {'steps': 2, 'minutes': 1}):
    with pytest.raises(ConfigError, match='checkpoint_every: give steps or minutes'):
      validate({'stages': [{'name': 'a', 'epochs': 1}], 'checkpoint_every': bad})


# ------------------------------------------------------------------------------ one run per directory


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_process(tmp_path):
  first = RunDir(tmp_path / 'run')
  with pytest.raises(RunError, match=rf'{tmp_path / "run"} is in use by process {os.getpid()} on '):
    RunDir(tmp_path / 'run', resume=True)
  first.close()
  RunDir(tmp_path / 'run').close()   # released by the first: free again


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path):
  gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'run.lock').write_text(json.dumps({'pid': int(gone.stdout), 'host': 'x', 'started': 'then',
                                                         'command': 'train.py'}))
  lines = []
  RunDir(tmp_path / 'run', log=lines.append).close()
  assert lines == [f'warning: took over {tmp_path / "run" / "run.lock"} from process {int(gone.stdout)} on x '
                   '(started then: train.py), which ended without releasing it (killed, or its machine went '
                   'down); its checkpoints are resumed as they are']
  assert (tmp_path / 'run' / 'run.lock').read_text() == ''   # a clean end leaves no holder behind


# ------------------------------------------------------------------------------ a full disk


@pytest.fixture
def full_disk(monkeypatch):
  """Every file orbax writes into a temporary checkpoint directory fails with ENOSPC."""
  from etils import epath
  write_text = epath.Path.write_text

  def failing(self, *args, **kwargs):
    if '.orbax-checkpoint-tmp' in str(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return write_text(self, *args, **kwargs)

  return lambda: monkeypatch.setattr(epath.Path, 'write_text', failing)


def test_a_full_disk_keeps_the_previous_checkpoint_whole_and_says_where(tmp_path, full_disk, capsys):
  run = RunDir(tmp_path / 'run')
  run.save(_tree(1), {'seed': 1})
  full_disk()
  status, err = _exit_status_and_stderr(lambda: run.save(_tree(2), {'seed': 2}), capsys)
  run.close()
  assert status == 2 and err.count('\n') == 1, err
  assert err.startswith(f'error: cannot write the run checkpoint {tmp_path / "run" / "checkpoints" / "1"}: '
                        'No space left on device. The previous one, ')
  assert f'The previous one, {tmp_path / "run" / "checkpoints" / "0"}, is intact' in err
  assert 'free space on that disk' in err
  again = RunDir(tmp_path / 'run', resume=True)
  restored = again.restore(lambda meta: _tree(0))
  again.close()
  assert restored.meta == {'seed': 1}
  np.testing.assert_array_equal(restored.state['params']['fc']['kernel'], _tree(1)['params']['fc']['kernel'])
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir() if p.name.isdigit()) == ['0']


def test_a_full_disk_during_a_run_stops_it_with_one_line_and_exit_status_2(data, tmp_path, full_disk, capsys):
  from tl_jax.commands import train
  argv = ['--config', str(tmp_path / 'r.yaml'), '--workdir', str(tmp_path / 'run'), '--no-progress']
  (tmp_path / 'r.yaml').write_text(json.dumps(_config(data, epochs=1).to_dict()))
  status, err = _exit_status_and_stderr(lambda: full_disk() or train.main(argv), capsys)
  assert status == 2 and err.count('\n') == 1, err
  assert err.startswith(f'error: cannot write the best checkpoint {tmp_path / "run" / "best" / "0"}: '
                        'No space left on device. Nothing was written; free space on that disk')
  assert not (tmp_path / 'run' / 'run.lock').read_text()   # the directory is free again


# ------------------------------------------------------------------------------ real processes


def _script(workdir, *args):
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'PYTHONUNBUFFERED': '1'}
  return subprocess.Popen([sys.executable, str(REPO / 'scripts' / 'train.py'), *map(str, args), '--workdir',
                           str(workdir), '--no-progress'], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


SLOW_RECIPE = """\
model: {arch: resnet18, weights: random}
data:
  batch_size: 4
  eval_batch_size: 8
  workers: 1
  train_transforms: [{RandomResizedCrop: {size: 32}}, {RandomHorizontalFlip: {}}, {ToTensor: {}},
                     {Normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}]
  val_transforms: [{Resize: {size: 36}}, {CenterCrop: {size: 32}}, {ToTensor: {}},
                   {Normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}]
stages:
  - {name: all, epochs: 2, trainable: all, optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}
"""


def _wait_for(proc, marker, timeout=600):
  """Reads `proc`'s stdout until a line holding `marker`; returns the lines read."""
  lines, deadline = [], time.monotonic() + timeout
  for line in proc.stdout:
    lines.append(line)
    if marker in line:
      return lines
    assert time.monotonic() < deadline, lines
  raise AssertionError(f'{marker!r} never came; the run printed {lines} and exited {proc.wait()}: {proc.stderr.read()}')


@pytest.mark.slow
@pytest.mark.parametrize('signum,status', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_real_signal_mid_epoch_then_resume_gives_the_uninterrupted_run(tmp_path, signum, status):
  """train.py (every layer learning, train-mode BN, random crops) gets a real signal in its second
  epoch; --resume continues from the mid-epoch checkpoint and ends with the uninterrupted run's numbers."""
  data = _folder(tmp_path / 'data', per_class=80)   # 40 train steps an epoch: a signal lands among them
  recipe = tmp_path / 'r.yaml'
  recipe.write_text(SLOW_RECIPE)
  common = ['--config', recipe, '--data', data]
  straight = _script(tmp_path / 'straight', *common)
  assert straight.wait(timeout=900) == 0, straight.stderr.read()
  proc = _script(tmp_path / 'stopped', *common)
  _wait_for(proc, 'Epoch 1/1')
  # At once: a train step of 32-px images takes milliseconds, so any wait risks the val phase. A
  # signal before the epoch's first step is acted on after it, still mid-epoch.
  proc.send_signal(signum)
  assert proc.wait(timeout=300) == status
  err = proc.stderr.read()
  assert f'{signal.Signals(signum).name}: stopped in epoch 1 after train step ' in err, err
  assert 'Traceback' not in err and 'Event loop' not in err
  resumed = _script(tmp_path / 'stopped', *common, '--resume')
  out, err = resumed.communicate(timeout=900)
  assert resumed.returncode == 0, err
  assert f'resuming {tmp_path / "stopped"} in epoch 1 after train step ' in out
  history = json.loads((tmp_path / 'stopped' / 'history.json').read_text())['epochs']
  _assert_same_run(history, json.loads((tmp_path / 'straight' / 'history.json').read_text())['epochs'])


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_a_concurrent_run_is_refused(tmp_path):
  data = _folder(tmp_path / 'data', per_class=12)
  recipe = tmp_path / 'r.yaml'
  recipe.write_text(SLOW_RECIPE)
  proc = _script(tmp_path / 'run', '--config', recipe, '--data', data)
  _wait_for(proc, 'devices:')
  second = _script(tmp_path / 'run', '--config', recipe, '--data', data, '--resume')
  out, err = second.communicate(timeout=300)
  assert second.returncode == 2 and err.count('\n') == 1, err
  assert err.startswith(f'error: {tmp_path / "run"} is in use by process {proc.pid} on ')
  _wait_for(proc, 'Epoch 0/1')
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 143
  assert 'SIGTERM again: exiting at once, without saving' in proc.stderr.read()


@pytest.mark.slow
def test_resume_over_a_cut_checkpoint_falls_back_without_a_traceback(tmp_path):
  """The issue's case: half of a file of the newest run checkpoint cut off; train.py --resume names it,
  continues from the one before, and prints no traceback."""
  data = _folder(tmp_path / 'data')
  recipe = tmp_path / 'r.yaml'
  recipe.write_text(SLOW_RECIPE)
  first = _script(tmp_path / 'run', '--config', recipe, '--data', data)
  assert first.wait(timeout=900) == 0, first.stderr.read()
  _cut_largest_file(tmp_path / 'run' / 'checkpoints' / '1' / 'state')
  recipe.write_text(SLOW_RECIPE.replace('epochs: 2', 'epochs: 3'))
  # The recipe changed: refused before any checkpoint is read.
  proc = _script(tmp_path / 'run', '--config', recipe, '--data', data, '--resume')
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 2 and 'stages[0].epochs: run has 2, now 3' in err
  recipe.write_text(SLOW_RECIPE)
  proc = _script(tmp_path / 'run', '--config', recipe, '--data', data, '--resume')
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err
  assert f'warning: checkpoint {tmp_path / "run" / "checkpoints" / "1"} does not restore: ' in out
  assert f'resuming {tmp_path / "run"} after epoch 0' in out
  assert 'Traceback' not in err and 'Event loop' not in err


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm_and_resume_as_the_uninterrupted_run(tmp_path):
  """A 2-process run (one device each) where only process 1 gets SIGTERM: both save the same step and exit
  143; resumed, the pair ends with the uninterrupted pair's numbers."""
  import socket
  data = _folder(tmp_path / 'data', per_class=80)
  recipe = tmp_path / 'r.yaml'
  recipe.write_text(SLOW_RECIPE.replace('trainable: all', 'trainable: [head]'))

  def pair(workdir, *extra):
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'PYTHONUNBUFFERED': '1', 'JAX_PLATFORMS': 'cpu'}
    return [subprocess.Popen([sys.executable, str(REPO / 'scripts' / 'train.py'), '--config', str(recipe), '--data',
                              str(data), '--workdir', str(workdir), '--no-progress', '--coordinator',
                              f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(i), *extra],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in (0, 1)]

  def finish(procs):
    try:
      return [(p.wait(timeout=900), p.stdout.read()) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()

  straight = finish(pair(tmp_path / 'straight'))
  assert [code for code, _ in straight] == [0, 0], straight
  procs = pair(tmp_path / 'stopped')
  _wait_for(procs[0], 'Epoch 1/1')
  time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  stopped = finish(procs)
  assert [code for code, _ in stopped] == [143, 143], stopped
  # Both stopped after the same step and say so, process 0 too, which got no signal.
  lines = [[line for line in out.splitlines() if line.startswith('SIGTERM: stopped in epoch 1 after')]
           for _, out in stopped]
  assert len(lines[0]) == len(lines[1]) == 1 and lines[0] == lines[1], stopped
  resumed = finish(pair(tmp_path / 'stopped', '--resume'))
  assert [code for code, _ in resumed] == [0, 0], resumed
  assert 'in epoch 1 after train step' in resumed[0][1]
  history = json.loads((tmp_path / 'stopped' / 'history.json').read_text())['epochs']
  _assert_same_run(history, json.loads((tmp_path / 'straight' / 'history.json').read_text())['epochs'])
