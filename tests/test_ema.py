"""The moving average of the weights against torch's AveragedModel(get_ema_multi_avg_fn, use_buffers=True).

Default tier: the averaging alone, on a Linear + BatchNorm1d whose values we set before each update
(the first update copies, buffers are averaged, `every` counts within each epoch as torchvision's
reference script's `i % model_ema_steps`). Slow tier: five float64 SGD steps of a ResNet-18 at 64 px,
batch 4, through our train step against torch's training loop, params and BN statistics.
"""

import copy
import re
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (compilation_cache, head_only_values, random_torchvision_model, rel_err,  # noqa: F401
                     state_dict_numpy, two_class_folder, within)
from tl_jax import optim
from tl_jax.config import ConfigError, validate
from tl_jax.convert import name_table, torch_to_flax
from tl_jax.models import create_model
from tl_jax.training import ema as ema_lib
from tl_jax.training.state import create_train_state, eval_variables, state_tree
from tl_jax.training.steps import eval_step, train_step

torch = pytest.importorskip('torch')
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

pytestmark = pytest.mark.usefixtures('compilation_cache')


def _torch_net():
  return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()


def _as_variables(net) -> dict:
  sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
  return {'params': {'dense': {'kernel': sd['0.weight'].T, 'bias': sd['0.bias']},
                     'bn': {'scale': sd['1.weight'], 'bias': sd['1.bias']}},
          'batch_stats': {'bn': {'mean': sd['1.running_mean'], 'var': sd['1.running_var']}}}


@pytest.mark.parametrize('decay,every,steps_per_epoch,accumulate', [(0.9998, 1, 4, 1), (0.6, 2, 3, 1), (0.2, 1, 5, 1),
                                                                    (0.5, 1, 5, 2), (0.3, 2, 7, 2)])
def test_update_matches_averaged_model(decay, every, steps_per_epoch, accumulate):
  """Each batch calls our update; torch's loop updates after an optimizer step (every `accumulate`
  batches, and at the epoch's end) whose index in the epoch is a multiple of `every`."""
  rng = np.random.default_rng(0)
  net = _torch_net()
  torch_ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
  settings = ema_lib.Settings(decay, every, steps_per_epoch, accumulate)
  with jax.enable_x64(True):
    ours = ema_lib.init(_as_variables(net))
    for step in range(2 * steps_per_epoch + 1):
      batch = step % steps_per_epoch
      if (batch + 1) % accumulate == 0 or batch == steps_per_epoch - 1:   # the optimizer steps
        with torch.no_grad():   # new values for every param and buffer
          for value in list(net.parameters()) + [net[1].running_mean, net[1].running_var]:
            value.copy_(torch.from_numpy(rng.standard_normal(tuple(value.shape))))
        if (batch // accumulate) % every == 0:   # torchvision's reference script's i % model_ema_steps
          torch_ema.update_parameters(net)
      ours = ema_lib.update(ours, _as_variables(net), jnp.asarray(step), settings)
    theirs = _as_variables(torch_ema.module)
    err = max(rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(ema_lib.variables(ours)),
                                            jax.tree_util.tree_leaves(theirs)))
  assert int(ours['n_averaged']) == int(torch_ema.n_averaged)
  assert within(err, 'ema_rel_f64', f'EMA update decay {decay} every {every} accumulate {accumulate}: '
                'params and BN stats (rel)'), err


def test_frozen_params_keep_their_copy():
  variables = {'params': {'a': jnp.ones(2), 'b': jnp.zeros(2)}, 'batch_stats': {}}
  ema = ema_lib.init(variables)
  moved = {'params': {'a': jnp.full(2, 3.0), 'b': jnp.full(2, 5.0)}, 'batch_stats': {}}
  for step in range(3):
    ema = ema_lib.update(ema, moved, jnp.asarray(step), ema_lib.Settings(0.5, 1, 10), {'a': True, 'b': False})
  np.testing.assert_array_equal(ema['params']['b'], 0.0)   # not learning: averaging it is skipped
  np.testing.assert_array_equal(ema['params']['a'], 3.0)


def test_schema_errors_name_the_key():
  base = {'stages': [{'name': 'all', 'epochs': 1, 'ema': {'decay': 0.999, 'every': 2}}]}
  assert validate(base).stages[0].ema.every == 2
  for bad, where in [({'decay': 1.5}, 'stages[0].ema.decay'), ({'every': 0}, 'stages[0].ema.every'),
                     ({'decy': 0.9}, 'stages[0].ema')]:
    with pytest.raises(ConfigError, match=re.escape(where)):
      validate({'stages': [{'name': 'all', 'epochs': 1, 'ema': bad}]})


SIZE, BATCH, STEPS = 64, 4, 5


def _torch_run(tmodel, decay, every, steps_per_epoch, images, labels):
  opt = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
  averaged = AveragedModel(tmodel, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
  tmodel.train()
  for step in range(STEPS):
    rows = slice(step * BATCH, (step + 1) * BATCH)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(images[rows])),
                                      torch.from_numpy(labels[rows]).long()).backward()
    opt.step()
    if (step % steps_per_epoch) % every == 0:
      averaged.update_parameters(tmodel)
  return state_dict_numpy(averaged.module)


def _jax_run(initial, decay, every, steps_per_epoch, images, labels):
  model = create_model('resnet18', 2)
  variables = torch_to_flax(initial, 'resnet18')
  tx = optim.make_optimizer(variables['params'], 'finetune',
                            {'name': 'sgd', 'momentum': 0.9, 'weight_decay': 0.01}, 0.05)
  state = create_train_state(model, variables, tx, ema=ema_lib.init(variables))
  step_fn = jax.jit(functools.partial(train_step, model=model, trainable=True, bn_train=True,
                                      ema=ema_lib.Settings(decay, every, steps_per_epoch)), donate_argnums=0)
  images_bhwc = np.transpose(images, (0, 2, 3, 1))
  for step in range(STEPS):
    rows = slice(step * BATCH, (step + 1) * BATCH)
    state, _ = step_fn(state, {'images': jnp.asarray(images_bhwc[rows]),
                               'labels': jnp.asarray(labels[rows], jnp.int32), 'mask': jnp.ones(BATCH, bool)})
  return model, jax.device_get(state)


@pytest.mark.slow
@pytest.mark.parametrize('decay,every,steps_per_epoch', [(0.9998, 1, 5), (0.6, 2, 3)])
def test_five_sgd_steps_match_torch_in_float64(decay, every, steps_per_epoch):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((STEPS * BATCH, 3, SIZE, SIZE))
  labels = rng.integers(0, 2, STEPS * BATCH)
  tmodel = random_torchvision_model('resnet18', 2, seed=3).double()
  initial = state_dict_numpy(tmodel)
  theirs = _torch_run(copy.deepcopy(tmodel), decay, every, steps_per_epoch, images, labels)
  with jax.enable_x64(True):
    model, state = _jax_run(initial, decay, every, steps_per_epoch, images, labels)
    tree = state_tree(state)
    assert 'ema' in tree   # the run checkpoint holds the average beside the weights
    # The val phase reads the average.
    batch = {'images': jnp.asarray(np.transpose(images[:BATCH], (0, 2, 3, 1))),
             'labels': jnp.asarray(labels[:BATCH], jnp.int32), 'mask': jnp.ones(BATCH, bool)}
    with torch.no_grad():
      torch_ema_model = copy.deepcopy(tmodel)
      torch_ema_model.load_state_dict({k: torch.from_numpy(v) for k, v in theirs.items()})
      torch_loss = torch.nn.functional.cross_entropy(torch_ema_model.eval()(torch.from_numpy(images[:BATCH])),
                                                     torch.from_numpy(labels[:BATCH]).long()).item()
    sums = eval_step(state, batch, model=model)
  what = f'EMA after 5 SGD steps float64, decay {decay} every {every}'
  assert within(abs(float(sums['loss_sum'] / sums['count']) - torch_loss), 'train_loss_abs_f64',
                f'{what}: val loss of the average (abs)')
  averaged = eval_variables(state)
  moved = 0
  for entry in name_table('resnet18'):
    tree = averaged['params'] if entry.collection == 'params' else averaged['batch_stats']
    ours = np.asarray(functools.reduce(lambda t, k: t[k], entry.path, tree))
    ours = ours.transpose(3, 2, 0, 1) if entry.kind == 'conv' else ours.T if entry.kind == 'linear_w' else ours
    start, ref = initial[entry.torch_name], theirs[entry.torch_name]
    if np.array_equal(start, ref):
      continue
    moved += 1
    err = rel_err(ours - start, ref - start)
    assert within(err, 'train_delta_rel_f64', f'{what}: param/BN-stat change (rel)'), (entry.torch_name, err)
  assert moved == 62 + 2 * 20


# ------------------------------------------------------------------------------------ in the run loop


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return two_class_folder(tmp_path_factory.mktemp('data'))


class _Averages:
  """Keeps each epoch's moving average (and crashes after train step `crash_step` of epoch `crash_epoch`)."""

  def __init__(self, crash_epoch=None, crash_step=None):
    self.ema, self.crash, self.epoch = {}, (crash_epoch, crash_step), None

  def on_epoch_start(self, run, epoch):
    self.epoch = epoch

  def on_step_end(self, run, phase, step, sums):
    if (self.epoch, step) == self.crash and phase == 'train':
      raise RuntimeError('crash')

  def on_epoch_end(self, run, epoch, state, row):
    self.ema[epoch] = jax.device_get(state.ema)

  def __getattr__(self, name):
    return lambda *args: None


def _ema_config(folder, **top):
  return validate(head_only_values(folder, [{'name': 'head', 'epochs': 2, 'ema': {'decay': 0.5, 'every': 2}}],
                                   **top))


@pytest.mark.slow
def test_a_run_validates_and_keeps_the_average_on_cached_features(folder, tmp_path):
  from tl_jax.checkpoint import load_model
  from tl_jax.training import train_and_evaluate
  averages, lines = _Averages(), []
  result = train_and_evaluate(_ema_config(folder), tmp_path / 'run', log=lines.append, callbacks=[averages],
                              progress=False, plots=False, report=False)
  assert any('cached backbone features for train and val' in line for line in lines), lines
  best = load_model(tmp_path / 'run')
  assert best.metadata['ema'] is True   # best/ holds the average
  ema = averages.ema[result.best_epoch]
  assert int(ema['n_averaged']) == result.best_epoch * 2 + 2   # 3 steps an epoch: batches 0 and 2 of each
  for ours, saved in zip(jax.tree_util.tree_leaves(ema_lib.variables(ema)), jax.tree_util.tree_leaves(best.variables)):
    np.testing.assert_array_equal(ours, saved)


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_restores_the_average(folder, tmp_path):
  from tl_jax.training import train_and_evaluate
  quiet = dict(log=lambda _: None, progress=False, plots=False, report=False)
  config = _ema_config(folder, checkpoint_every={'steps': 2})
  straight = _Averages()
  expected = train_and_evaluate(config, tmp_path / 'straight', callbacks=[straight], **quiet)
  with pytest.raises(RuntimeError, match='crash'):
    train_and_evaluate(config, tmp_path / 'run', callbacks=[_Averages(crash_epoch=1, crash_step=2)], **quiet)
  resumed = _Averages()
  result = train_and_evaluate(config, tmp_path / 'run', resume=True, callbacks=[resumed], **quiet)
  for ours, theirs in zip(result.history, expected.history):
    for key in ('train_loss', 'val_loss', 'val_acc'):
      assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
  for ours, theirs in zip(jax.tree_util.tree_leaves(resumed.ema[1]), jax.tree_util.tree_leaves(straight.ema[1])):
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
