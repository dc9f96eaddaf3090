"""Orbax model checkpoints: exact round trip, metadata, and clear failures."""

import shutil

import jax
import numpy as np
import pytest

from tl_jax import checkpoint
from tl_jax.models import create_model, init_variables


@pytest.fixture(scope='module')
def variables():
  return init_variables(create_model('resnet18', 2), jax.random.PRNGKey(0), 32)


def _meta():
  return checkpoint.make_metadata('resnet18', 2, {'mean': [0.5] * 3, 'std': [0.2] * 3}, ['ants', 'bees'])


def test_round_trip_is_exact_and_keeps_metadata(tmp_path, variables):
  checkpoint.save_model(tmp_path / 'm', variables, _meta())
  loaded = checkpoint.load_model(tmp_path / 'm', num_classes=2)
  assert loaded.arch == 'resnet18' and loaded.class_names == ['ants', 'bees']
  flat_a = jax.tree_util.tree_leaves_with_path(variables)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(loaded.variables))
  assert len(flat_a) == len(flat_b)
  for path, value in flat_a:
    np.testing.assert_array_equal(flat_b[path], value)


def test_existing_directory_is_not_overwritten_without_asking(tmp_path, variables):
  checkpoint.save_model(tmp_path / 'm', variables, _meta())
  with pytest.raises(checkpoint.CheckpointError, match='already exists'):
    checkpoint.save_model(tmp_path / 'm', variables, _meta())
  checkpoint.save_model(tmp_path / 'm', variables, _meta(), overwrite=True)


def test_class_count_mismatch_and_bad_names(tmp_path, variables):
  checkpoint.save_model(tmp_path / 'm', variables, _meta())
  with pytest.raises(checkpoint.CheckpointError, match='has 2 classes but 5 were asked'):
    checkpoint.load_model(tmp_path / 'm', num_classes=5)
  with pytest.raises(checkpoint.CheckpointError, match='3 class names given for a 2-class model'):
    checkpoint.make_metadata('resnet18', 2, {}, ['a', 'b', 'c'])


def test_workdir_resolves_to_newest_best_epoch(tmp_path, variables):
  manager = checkpoint.best_manager(tmp_path / 'run')
  checkpoint.save_best(manager, 2, variables, {**_meta(), 'epoch': 2})
  checkpoint.save_best(manager, 6, variables, {**_meta(), 'epoch': 6})
  manager.close()
  assert checkpoint.resolve_model_dir(tmp_path / 'run').name == '6'
  assert checkpoint.load_model(tmp_path / 'run').metadata['epoch'] == 6
  assert [p.name for p in (tmp_path / 'run' / 'best').iterdir() if p.name.isdigit()] == ['6']


def test_missing_empty_and_damaged_checkpoints_are_named(tmp_path, variables):
  with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
    checkpoint.load_model(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='holds no tl_jax model checkpoint'):
    checkpoint.load_model(tmp_path / 'empty')
  checkpoint.save_model(tmp_path / 'm', variables, _meta())
  shutil.rmtree(tmp_path / 'm' / 'variables')
  (tmp_path / 'm' / 'variables').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='damaged'):
    checkpoint.load_model(tmp_path / 'm')
