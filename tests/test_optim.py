"""Strategies, label trees and the StepLR schedule against torch's scheduler."""

import jax
import numpy as np
import optax
import pytest

from tl_jax import optim
from tl_jax.models import create_model, init_variables


@pytest.fixture(scope='module')
def params():
  return init_variables(create_model('resnet18', 2), jax.random.PRNGKey(0), 32)['params']


def test_labels_per_strategy(params):
  frozen = optim.param_labels(params, 'frozen')
  assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(params)
  assert set(jax.tree_util.tree_leaves(frozen['fc'])) == {optim.TRAINABLE}
  assert set(jax.tree_util.tree_leaves({k: v for k, v in frozen.items() if k != 'fc'})) == {optim.FROZEN}
  assert set(jax.tree_util.tree_leaves(optim.param_labels(params, 'finetune'))) == {optim.TRAINABLE}
  partial = optim.trainable_mask(params, ['layer4', 'head'])
  assert partial['layer4_1'] and partial['fc'] and not partial['layer3_0'] and not partial['conv1']


def test_unknown_strategy_and_stage_are_rejected(params):
  with pytest.raises(ValueError, match='unknown strategy'):
    optim.trainable_stages('freeze')
  with pytest.raises(ValueError, match='unknown stages'):
    optim.trainable_stages(['layer5'])


def test_frozen_strategy_updates_only_the_head_and_keeps_no_backbone_momentum(params):
  tx = optim.make_optimizer(params, 'frozen', 0.1)
  opt_state = tx.init(params)
  grads = jax.tree_util.tree_map(np.ones_like, params)
  updates, _ = tx.update(grads, opt_state, params)
  for name, sub in updates.items():
    for leaf in jax.tree_util.tree_leaves(sub):
      if name == 'fc':
        np.testing.assert_allclose(leaf, -0.1)
      else:
        assert not np.any(leaf)
  # Momentum buffers exist for fc only: fc has 512*2 + 2 parameters.
  buffers = sum(np.size(x) for x in jax.tree_util.tree_leaves(opt_state) if np.ndim(x) > 0)
  assert buffers == 512 * 2 + 2


def test_step_lr_matches_torch_for_25_epochs_on_both_sides_of_each_boundary():
  torch = pytest.importorskip('torch')
  steps_per_epoch, epochs = 61, 25
  schedule = optim.step_lr_schedule(0.001, 7, 0.1, steps_per_epoch, epochs)
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=0.001, momentum=0.9)
  scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
  for epoch in range(epochs):
    torch_lr = scheduler.get_last_lr()[0]
    first, last = epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1
    for step in (first, first + 1, last):
      np.testing.assert_allclose(float(schedule(step)), torch_lr, rtol=1e-6, err_msg=f'epoch {epoch} step {step}')
    opt.step()
    scheduler.step()


def test_sgd_momentum_matches_torch_sgd():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  w0 = rng.standard_normal(5).astype(np.float32)
  grads = [rng.standard_normal(5).astype(np.float32) for _ in range(4)]
  param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  opt = torch.optim.SGD([param], lr=0.01, momentum=0.9)
  tx = optim.make_optimizer({'fc': {'w': w0}}, 'finetune', 0.01, momentum=0.9)
  params = {'fc': {'w': w0}}
  state = tx.init(params)
  for g in grads:
    param.grad = torch.from_numpy(g.copy())
    opt.step()
    updates, state = tx.update({'fc': {'w': g}}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params['fc']['w'], param.detach().numpy(), rtol=1e-6, atol=1e-7)
