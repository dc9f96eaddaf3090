"""tl_jax.rundir: the run directory's checks, the per-epoch run checkpoint and history.json."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tl_jax.config import validate
from tl_jax.rundir import RunDir, RunError


def _tree(value: float):
  params = {'fc': {'kernel': jnp.full((3, 2), value), 'bias': jnp.zeros(2)}}
  opt_state = optax.sgd(0.1, momentum=0.9).init(params)
  return {'params': params, 'batch_stats': {'bn': {'mean': jnp.arange(3.0) * value}}, 'opt_state': opt_state,
          'step': jnp.asarray(int(value))}


def test_a_workdir_that_is_a_file_or_cannot_be_created_is_refused(tmp_path):
  (tmp_path / 'f').write_text('')
  with pytest.raises(RunError, match='is a file'):
    RunDir(tmp_path / 'f')
  with pytest.raises(RunError, match='cannot be used as a run directory'):
    RunDir(tmp_path / 'f' / 'run')


def test_an_existing_run_is_refused_without_resume_and_resumed_with_it(tmp_path):
  run = RunDir(tmp_path / 'run')
  assert not run.resuming and run.latest_path() is None
  run.save(_tree(1.0), {'history': [{'epoch': 0}]})
  run.save(_tree(2.0), {'history': [{'epoch': 0}, {'epoch': 1}]})
  run.save(_tree(3.0), {'history': [{'epoch': 0}, {'epoch': 1}, {'epoch': 2}]})
  run.close()
  with pytest.raises(RunError, match='already holds a run; pass --resume'):
    RunDir(tmp_path / 'run')
  again = RunDir(tmp_path / 'run', resume=True)
  assert again.resuming and again.latest_path() == tmp_path / 'run' / 'checkpoints' / '2'
  template = _tree(0.0)
  restored = again.restore(lambda meta: template)
  assert restored.meta['history'] == [{'epoch': 0}, {'epoch': 1}, {'epoch': 2}]
  assert restored.path == tmp_path / 'run' / 'checkpoints' / '2'
  np.testing.assert_array_equal(restored.state['params']['fc']['kernel'], np.full((3, 2), 3.0))
  np.testing.assert_array_equal(restored.state['batch_stats']['bn']['mean'], np.arange(3.0) * 3)
  assert int(restored.state['step']) == 3
  # The optimizer state comes back in optax's own structure, not as plain dicts.
  assert type(restored.state['opt_state']) is type(template['opt_state'])
  again.close()
  # The newest two (keep_checkpoints' default) are kept, so a damaged newest one has one to fall back on.
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir() if p.name.isdigit()) == ['1', '2']


def test_resume_without_a_run_starts_a_new_one_and_says_so(tmp_path):
  lines = []
  run = RunDir(tmp_path / 'new', resume=True, log=lines.append)
  assert not run.resuming and 'starting a new run' in lines[0]
  run.close()


def test_check_recipe_names_every_changed_key(tmp_path):
  run = RunDir(tmp_path / 'run')
  saved = validate({'stages': [{'name': 'a', 'epochs': 2}]}).to_dict()
  run.check_recipe(saved, saved)
  workers_only = validate({'data': {'workers': 0}, 'stages': [{'name': 'a', 'epochs': 2}]}).to_dict()
  run.check_recipe(saved, workers_only)   # how data is fed is not part of the recipe
  changed = validate({'stages': [{'name': 'a', 'epochs': 3, 'optimizer': {'name': 'sgd', 'lr': 0.1}}]}).to_dict()
  with pytest.raises(RunError, match=r"stages\[0\]\.epochs: run has 2, now 3; stages\[0\]\.optimizer\.lr: run "
                                     r'has 0\.001, now 0\.1; stages\[0\]\.optimizer\.momentum'):
    run.check_recipe(saved, changed)
  run.close()


def test_history_is_written_atomically(tmp_path):
  run = RunDir(tmp_path / 'run')
  run.write_history({'epochs': [1]})
  run.write_history({'epochs': [1, 2]})
  assert json.loads((tmp_path / 'run' / 'history.json').read_text()) == {'epochs': [1, 2]}
  assert not list((tmp_path / 'run').glob('*.tmp'))
  run.close()
