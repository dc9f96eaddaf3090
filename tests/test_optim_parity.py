"""Five training steps of torch's SGD / Adam / AdamW on a ResNet-18, tl_jax against torch, in float64.

Every optimizer with a non-zero weight decay, head only and full fine-tune, with a StepLR that
halves the lr every 2-step epoch, so the schedule changes inside the five steps. Adam's changes
agree less tightly than SGD's (~1e-9 against ~1e-13): where |g| is near eps, m / (sqrt(v) + eps)
turns the gradients' last-bit differences into ~1 / (4 eps) times larger ones.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import name_table, torch_to_flax
from tl_jax.models import create_model
from tl_jax.training import create_train_state, train_step

torch = pytest.importorskip('torch')

SIZE, BATCH, STEPS, STEPS_PER_EPOCH = 64, 4, 5, 2  # at 32 px layer4 BN sees 4 values: ill-conditioned
SCHEDULE = {'name': 'step', 'step_size': 1, 'gamma': 0.5}
OPTIMIZERS = {  # (our spec with torch's argument names, lr)
    'SGD momentum dampening': ({'name': 'sgd', 'momentum': 0.9, 'dampening': 0.2, 'weight_decay': 0.01}, 0.01),
    'SGD nesterov': ({'name': 'sgd', 'momentum': 0.9, 'nesterov': True, 'weight_decay': 0.01}, 0.01),
    'Adam': ({'name': 'adam', 'betas': (0.8, 0.99), 'weight_decay': 0.01}, 0.001),
    'Adam amsgrad': ({'name': 'adam', 'amsgrad': True, 'weight_decay': 0.01}, 0.001),
    'AdamW': ({'name': 'adamw', 'weight_decay': 0.1}, 0.001),
}


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((STEPS * BATCH, 3, SIZE, SIZE))
  labels = rng.integers(0, 2, STEPS * BATCH)
  tmodel = random_torchvision_model('resnet18', 2, seed=3).double()
  return images, labels, tmodel


def _torch_run(tmodel, spec, lr, strategy, images, labels):
  if strategy == 'frozen':
    for name, p in tmodel.named_parameters():
      p.requires_grad = name.startswith('fc.')
  cls = {'sgd': torch.optim.SGD, 'adam': torch.optim.Adam, 'adamw': torch.optim.AdamW}[spec['name']]
  opt = cls([p for p in tmodel.parameters() if p.requires_grad], lr=lr,
            **{k: v for k, v in spec.items() if k != 'name'})
  scheduler = torch.optim.lr_scheduler.StepLR(opt, SCHEDULE['step_size'], SCHEDULE['gamma'])
  tmodel.train()
  losses = []
  for step in range(STEPS):
    rows = slice(step * BATCH, (step + 1) * BATCH)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(images[rows])),
                                             torch.from_numpy(labels[rows]).long())
    loss.backward()
    opt.step()
    if step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
      scheduler.step()
    losses.append(loss.item())
  return losses, state_dict_numpy(tmodel)


def _jax_run(initial, spec, lr, strategy, images, labels):
  model = create_model('resnet18', 2)
  variables = torch_to_flax(initial, 'resnet18')
  schedule = optim.make_schedule(SCHEDULE, lr, epochs=3, steps_per_epoch=STEPS_PER_EPOCH)
  state = create_train_state(model, variables, optim.make_optimizer(variables['params'], strategy, spec, schedule))
  step_fn = jax.jit(functools.partial(train_step, model=model, trainable=optim.trainable_mask(state.params, strategy),
                                      bn_train=True))
  images_bhwc = np.transpose(images, (0, 2, 3, 1))
  losses = []
  for step in range(STEPS):
    rows = slice(step * BATCH, (step + 1) * BATCH)
    batch = {'images': jnp.asarray(images_bhwc[rows]), 'labels': jnp.asarray(labels[rows], jnp.int32),
             'mask': jnp.ones(BATCH, bool)}
    state, sums = step_fn(state, batch)
    losses.append(float(sums['loss_sum'] / sums['count']))
  return losses, jax.device_get(state)


@pytest.mark.parametrize('strategy', ['frozen', 'finetune'])
@pytest.mark.parametrize('case', list(OPTIMIZERS))
@pytest.mark.slow
def test_five_steps_match_torch_in_float64(data, case, strategy):
  images, labels, tmodel = data
  tmodel, initial = copy.deepcopy(tmodel), state_dict_numpy(tmodel)
  spec, lr = OPTIMIZERS[case]
  torch_losses, final_torch = _torch_run(tmodel, spec, lr, strategy, images, labels)
  with jax.enable_x64(True):
    losses, state = _jax_run(initial, spec, lr, strategy, images, labels)
  what = f'5 steps float64 {case}/{strategy}'
  loss_err = np.max(np.abs(np.subtract(losses, torch_losses)))
  assert within(loss_err, 'train_loss_abs_f64', f'{what}: loss per step (abs)'), (losses, torch_losses)
  moved = 0
  for entry in name_table('resnet18'):
    tree = state.params if entry.collection == 'params' else state.batch_stats
    ours = np.asarray(functools.reduce(lambda t, k: t[k], entry.path, tree))
    ours = ours.transpose(3, 2, 0, 1) if entry.kind == 'conv' else ours.T if entry.kind == 'linear_w' else ours
    start, theirs = initial[entry.torch_name], final_torch[entry.torch_name]
    if np.array_equal(start, theirs):
      assert np.array_equal(ours, start), f'{entry.torch_name}: torch left it, we changed it'
      continue
    moved += 1
    err = rel_err(ours - start, theirs - start)
    assert within(err, 'train_delta_rel_f64', f'{what}: param/BN-stat change (rel)'), (entry.torch_name, err)
  # Head only: fc's 2 tensors and the 20 BNs' running stats (train-mode BN); full: all 62 params too.
  assert moved == {'frozen': 2, 'finetune': 62}[strategy] + 2 * 20
