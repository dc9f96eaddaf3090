"""Strategies and label trees; torch's optimizers and lr schedulers against torch itself."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import TOL, within
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


@pytest.mark.parametrize('optimizer', [{'name': 'sgd', 'momentum': 0.9}, {'name': 'adam', 'weight_decay': 0.1}])
def test_frozen_strategy_updates_only_the_head_and_keeps_no_backbone_state(params, optimizer):
  tx = optim.make_optimizer(params, 'frozen', optimizer, 0.1)
  opt_state = tx.init(params)
  grads = jax.tree_util.tree_map(np.ones_like, params)
  updates, _ = tx.update(grads, opt_state, params)
  for name, sub in updates.items():
    for leaf in jax.tree_util.tree_leaves(sub):
      assert np.all(leaf != 0) if name == 'fc' else not np.any(leaf)
  # State (momentum buffer; Adam's two moments) exists for fc only: fc has 512*2 + 2 parameters.
  buffers = sum(np.size(x) for x in jax.tree_util.tree_leaves(opt_state) if np.ndim(x) > 0)
  assert buffers == (512 * 2 + 2) * (1 if optimizer['name'] == 'sgd' else 2)


# ---------------------------------------------------------------------------------- schedules

LR = 0.001


def _schedule_cases():
  S = pytest.importorskip('torch').optim.lr_scheduler

  def warm(opt, factor, epochs, main):
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=factor, total_iters=epochs), main], milestones=[epochs])

  one = lambda opt: S.LambdaLR(opt, lambda _: 1.0)
  return {  # id: (our spec, stage epochs, torch's scheduler on `opt`)
      'StepLR(7, 0.1)': ({'name': 'step', 'step_size': 7, 'gamma': 0.1}, 25, lambda o: S.StepLR(o, 7, 0.1)),
      'StepLR(5, 0.9)': ({'name': 'step', 'step_size': 5, 'gamma': 0.9}, 30, lambda o: S.StepLR(o, 5, 0.9)),
      'MultiStepLR([20,50,80,120,150], 0.7)': (
          {'name': 'multistep', 'milestones': [20, 50, 80, 120, 150], 'gamma': 0.7}, 160,
          lambda o: S.MultiStepLR(o, [20, 50, 80, 120, 150], 0.7)),
      'ExponentialLR(0.9)': ({'name': 'exponential', 'gamma': 0.9}, 160, lambda o: S.ExponentialLR(o, 0.9)),
      'CosineAnnealingLR(10, 1e-5) for 35 epochs': (
          {'name': 'cosine', 'T_max': 10, 'eta_min': 1e-5}, 35, lambda o: S.CosineAnnealingLR(o, 10, 1e-5)),
      'CosineAnnealingLR(T_max=epochs)': ({'name': 'cosine'}, 12, lambda o: S.CosineAnnealingLR(o, 12)),
      'constant': (None, 5, one),
      'constant by name': ({'name': 'constant'}, 5, one),
      'warm-up 3 + StepLR(5, 0.9)': (
          {'name': 'step', 'step_size': 5, 'gamma': 0.9, 'warmup_epochs': 3}, 20,
          lambda o: warm(o, 1 / 4, 3, S.StepLR(o, 5, 0.9))),
      'warm-up 5 + MultiStepLR': (
          {'name': 'multistep', 'milestones': [20, 50, 80, 120, 150], 'gamma': 0.7, 'warmup_epochs': 5}, 160,
          lambda o: warm(o, 1 / 6, 5, S.MultiStepLR(o, [20, 50, 80, 120, 150], 0.7))),
      'warm-up 1 + ExponentialLR(0.9)': (
          {'name': 'exponential', 'gamma': 0.9, 'warmup_epochs': 1}, 10,
          lambda o: warm(o, 1 / 2, 1, S.ExponentialLR(o, 0.9))),
      'warm-up 2 + CosineAnnealingLR(T_max=rest, 1e-5)': (
          {'name': 'cosine', 'eta_min': 1e-5, 'warmup_epochs': 2}, 15,
          lambda o: warm(o, 1 / 3, 2, S.CosineAnnealingLR(o, 13, 1e-5))),
      'warm-up 4 from 0.1 + constant': (
          {'name': 'constant', 'warmup_epochs': 4, 'warmup_start_factor': 0.1}, 8,
          lambda o: warm(o, 0.1, 4, one(o))),
  }


def _torch_epoch_lrs(build, epochs):
  torch = pytest.importorskip('torch')
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=LR)
  scheduler = build(opt)
  lrs = []
  for _ in range(epochs):
    lrs.append(scheduler.get_last_lr()[0])
    opt.step()
    scheduler.step()
  return np.array(lrs)


def _lr_err(ours, theirs):
  """Worst relative error per epoch (torch's lr can be 0: the floor keeps that an absolute check)."""
  return float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-12 * LR)))


@pytest.mark.filterwarnings('ignore::UserWarning')  # SequentialLR calls the deprecated step(epoch)
@pytest.mark.parametrize('case', list(_schedule_cases()))
def test_lr_of_every_epoch_matches_torchs_scheduler(case):
  spec, epochs, build = _schedule_cases()[case]
  theirs = _torch_epoch_lrs(build, epochs)
  steps_per_epoch = 3
  first = np.arange(epochs) * steps_per_epoch  # first, second and last step of every epoch
  picks = np.stack([first, first + 1, first + steps_per_epoch - 1])
  with jax.enable_x64(True):
    schedule = optim.make_schedule(spec, LR, epochs, steps_per_epoch)
    ours64 = np.broadcast_to(schedule(jnp.arange(epochs * steps_per_epoch)), (epochs * steps_per_epoch,))
  assert ours64.dtype == np.float64
  assert within(_lr_err(ours64[picks], theirs), 'lr_rel_f64', f'lr schedule float64: {case}'), (ours64[picks], theirs)
  assert within(_lr_err(np.array(optim.epoch_lrs(spec, LR, epochs)), theirs), 'lr_rel_f64',
                f'epoch_lrs: {case}')
  # The float32 schedule the trainer runs.
  ours32 = np.broadcast_to(optim.make_schedule(spec, LR, epochs, steps_per_epoch)(jnp.arange(epochs * steps_per_epoch)),
                           (epochs * steps_per_epoch,))
  assert within(_lr_err(ours32[picks], theirs), 'lr_rel_f32', f'lr schedule float32: {case}'), (ours32[picks], theirs)


def test_step_lr_schedule_is_make_schedules_step():
  old = optim.step_lr_schedule(0.001, 7, 0.1, 61, 25)
  new = optim.make_schedule({'name': 'step', 'step_size': 7, 'gamma': 0.1}, 0.001, 25, 61)
  steps = jnp.arange(25 * 61)
  np.testing.assert_array_equal(old(steps), new(steps))


def test_cosine_rises_again_past_t_max_as_torch_does_where_optax_holds():
  lrs = optim.epoch_lrs({'name': 'cosine', 'T_max': 4}, 1.0, 9)
  assert lrs[4] == pytest.approx(0.0, abs=1e-15) and lrs[8] == pytest.approx(1.0)
  assert float(optax.cosine_decay_schedule(1.0, 4)(8)) == 0.0


def test_schedule_warnings_name_what_is_never_reached():
  assert optim.schedule_warnings({'name': 'multistep', 'milestones': [2, 5], 'gamma': 0.5}, 6) == []
  notes = optim.schedule_warnings({'name': 'multistep', 'milestones': [2, 5, 9], 'gamma': 0.5}, 6)
  assert notes == ['schedule multistep: milestones [9] are never reached in a stage of 6 epochs']
  # Milestones count from the end of the warm-up (SequentialLR), so 5 is now epoch 7.
  notes = optim.schedule_warnings({'name': 'multistep', 'milestones': [2, 5], 'warmup_epochs': 2}, 6)
  assert notes == ['schedule multistep: milestones [5] are never reached in a stage of 6 epochs (2 of them warm-up)']
  assert 'step_size 7' in optim.schedule_warnings({'name': 'step', 'step_size': 7}, 7)[0]
  assert 'covers the whole stage' in optim.schedule_warnings({'name': 'constant', 'warmup_epochs': 3}, 3)[0]


@pytest.mark.parametrize('spec, message', [
    ({'name': 'linear'}, "unknown schedule 'linear'; choose one of ['constant', 'cosine', 'exponential', "
                         "'multistep', 'step']"),
    ({'step_size': 3}, "schedule: expected a mapping with a 'name'"),
    ({'name': 'step'}, "schedule step: missing argument(s) ['step_size']"),
    ({'name': 'step', 'step_size': 3, 'warmup': 2}, "schedule step: unknown argument(s) ['warmup']; step takes"),
    ({'name': 'step', 'step_size': 0}, 'schedule step: step_size must be >= 1, got 0'),
    ({'name': 'step', 'step_size': 2.5}, 'schedule step: step_size must be an integer, got 2.5'),
    ({'name': 'step', 'step_size': 2, 'gamma': '0.1'}, "schedule step: gamma must be a number, got '0.1'"),
    ({'name': 'exponential', 'gamma': 0}, 'schedule exponential: gamma must be > 0, got 0'),
    ({'name': 'multistep', 'milestones': [5, 3]}, 'schedule multistep: milestones must be increasing epochs >= 1, '
                                                  'got [5, 3]'),
    ({'name': 'multistep', 'milestones': [0, 3]}, 'milestones must be increasing epochs >= 1, got [0, 3]'),
    ({'name': 'multistep', 'milestones': []}, 'milestones must be a non-empty list of epochs, got []'),
    ({'name': 'cosine', 'T_max': 0}, 'schedule cosine: T_max must be >= 1, got 0'),
    ({'name': 'cosine', 'eta_min': -1e-5}, 'schedule cosine: eta_min must be >= 0, got -1e-05'),
    ({'name': 'constant', 'warmup_epochs': -1}, 'schedule constant: warmup_epochs must be >= 0, got -1'),
    ({'name': 'constant', 'warmup_epochs': 2, 'warmup_start_factor': 0},
     "warmup_start_factor must be in (0, 1] (torch's LinearLR start_factor), got 0"),
])
def test_bad_schedule_arguments_are_named(spec, message):
  with pytest.raises(optim.OptimError) as info:
    optim.make_schedule(spec, LR, 10, 5)
  assert message in str(info.value)
  with pytest.raises(optim.OptimError, match='epochs must be >= 1, got 0'):
    optim.make_schedule(None, LR, 0, 5)
  with pytest.raises(optim.OptimError, match='steps_per_epoch must be >= 1, got 0'):
    optim.make_schedule(None, LR, 10, 0)


def test_tables_list_torchs_defaults():
  torch = pytest.importorskip('torch')
  import inspect
  for name, cls in (('sgd', torch.optim.SGD), ('adam', torch.optim.Adam), ('adamw', torch.optim.AdamW)):
    signature = inspect.signature(cls).parameters
    assert optim.OPTIMIZERS[name] == {k: signature[k].default for k in optim.OPTIMIZERS[name]}, name
  S = torch.optim.lr_scheduler
  for name, cls in (('step', S.StepLR), ('multistep', S.MultiStepLR), ('exponential', S.ExponentialLR),
                    ('cosine', S.CosineAnnealingLR)):
    signature = inspect.signature(cls).parameters
    for key, default in optim.SCHEDULES[name].items():
      if not key.startswith('warmup') and default is not None:
        expected = signature[key].default
        assert default == (optim.REQUIRED if expected is inspect.Parameter.empty else expected), (name, key)


# ---------------------------------------------------------------------------------- optimizers

OPTIMIZERS = {
    'SGD': {'name': 'sgd'},
    'SGD momentum wd': {'name': 'sgd', 'momentum': 0.9, 'weight_decay': 0.05},
    'SGD momentum dampening wd': {'name': 'sgd', 'momentum': 0.8, 'dampening': 0.3, 'weight_decay': 0.05},
    'SGD nesterov wd': {'name': 'sgd', 'momentum': 0.9, 'nesterov': True, 'weight_decay': 0.05},
    'Adam betas eps wd': {'name': 'adam', 'betas': (0.8, 0.99), 'eps': 1e-6, 'weight_decay': 0.05},
    'Adam amsgrad wd': {'name': 'adam', 'amsgrad': True, 'weight_decay': 0.05},
    'AdamW default wd': {'name': 'adamw'},
    'AdamW amsgrad wd': {'name': 'adamw', 'amsgrad': True, 'weight_decay': 0.1},
}
STEPS_PER_EPOCH, STEPS = 3, 12
# Gradient scales that shrink and grow, so AMSGrad's running max matters.
GRAD_SCALES = [1.0, 1.0, 1e-2, 1e-3, 3.0, 1e-2, 1e-3, 1e-3, 2.0, 1e-4, 1e-4, 1.0]


def _torch_optimizer(spec, params):
  torch = pytest.importorskip('torch')
  cls = {'sgd': torch.optim.SGD, 'adam': torch.optim.Adam, 'adamw': torch.optim.AdamW}[spec['name']]
  return cls(params, **{k: v for k, v in spec.items() if k != 'name'})


def _run_both(spec, tx_of_schedule):
  """Our transform and torch's optimizer on the same gradients, StepLR(1, 0.5) per 3-step epoch."""
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  w0 = {'kernel': rng.standard_normal((4, 3)), 'bias': rng.standard_normal(3)}
  grads = [{k: s * rng.standard_normal(v.shape) for k, v in w0.items()} for s in GRAD_SCALES]
  tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in w0.items()}
  opt = _torch_optimizer({**spec, 'lr': 0.1}, list(tparams.values()))
  scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
  with jax.enable_x64(True):
    tx = tx_of_schedule(optim.make_schedule({'name': 'step', 'step_size': 1, 'gamma': 0.5}, 0.1, 4,
                                            STEPS_PER_EPOCH))
    params = {'fc': {k: jnp.asarray(v) for k, v in w0.items()}}
    state = tx.init(params)
    worst = 0.0
    for step, g in enumerate(grads):
      for k, p in tparams.items():
        p.grad = torch.from_numpy(g[k].copy())
      opt.step()
      if step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
        scheduler.step()
      updates, state = tx.update({'fc': {k: jnp.asarray(v) for k, v in g.items()}}, state, params)
      params = optax.apply_updates(params, updates)
      for k, p in tparams.items():
        theirs = p.detach().numpy() - w0[k]
        ours = np.asarray(params['fc'][k]) - w0[k]
        worst = max(worst, float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))))
  return worst


@pytest.mark.parametrize('case', list(OPTIMIZERS))
def test_optimizer_matches_torch_step_by_step_in_float64(case):
  spec = OPTIMIZERS[case]
  params_like = {'fc': dict.fromkeys(('kernel', 'bias'))}
  err = _run_both(spec, lambda schedule: optim.make_optimizer(params_like, 'finetune', spec, schedule))
  assert within(err, 'optim_rel_f64', f'{STEPS} optimizer steps float64, one tensor: {case}'), err


@pytest.mark.parametrize('case, stock', [
    # Why dampened_trace and scale_by_torch_amsgrad exist: optax's own transforms differ from torch here.
    ('SGD momentum dampening wd', lambda s: optax.chain(optax.add_decayed_weights(0.05),
                                                       optax.sgd(s, momentum=0.8))),
    ('Adam amsgrad wd', lambda s: optax.chain(optax.add_decayed_weights(0.05), optax.amsgrad(s))),
])
def test_stock_optax_transforms_differ_from_torch_where_ours_are_used(case, stock):
  assert _run_both(OPTIMIZERS[case], stock) > 1e3 * TOL['optim_rel_f64']


def test_frozen_labels_keep_their_params_and_have_no_state():
  # A ResNet's names (conv1 and fc alone would also be GoogLeNet's, whose conv1 is a stage of its own).
  params = {'conv1': {'kernel': np.ones((2, 2))}, 'bn1': {'scale': np.ones(2)}, 'fc': {'kernel': np.ones((2, 2))}}
  tx = optim.make_optimizer(params, 'frozen', {'name': 'adamw', 'weight_decay': 0.5}, 0.1)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree_util.tree_map(np.ones_like, params), state, params)
  assert not np.any(updates['conv1']['kernel']) and np.all(updates['fc']['kernel'] < 0)


@pytest.mark.parametrize('spec, message, torch_rejects', [
    ({'name': 'sgd', 'lr': -0.1}, 'optimizer sgd: lr must be >= 0, got -0.1', True),
    ({'name': 'adam', 'lr': math.nan}, 'optimizer adam: lr must be >= 0, got nan', True),
    ({'name': 'sgd', 'lr': math.nan}, 'optimizer sgd: lr must be >= 0, got nan', False),  # torch's SGD lets NaN in
    ({'name': 'sgd', 'momentum': -0.5}, 'optimizer sgd: momentum must be >= 0, got -0.5', True),
    ({'name': 'sgd', 'weight_decay': -1e-4}, 'optimizer sgd: weight_decay must be >= 0, got -0.0001', True),
    ({'name': 'sgd', 'nesterov': True}, 'optimizer sgd: momentum must be > 0 with nesterov=True, got 0.0', True),
    ({'name': 'sgd', 'nesterov': True, 'momentum': 0.9, 'dampening': 0.1},
     'optimizer sgd: dampening must be 0 with nesterov=True, got 0.1', True),
    ({'name': 'adam', 'betas': (1.0, 0.999)}, 'optimizer adam: betas[0] must be in [0, 1), got 1.0', True),
    ({'name': 'adamw', 'betas': (0.9, -0.1)}, 'optimizer adamw: betas[1] must be in [0, 1), got -0.1', True),
    ({'name': 'adam', 'eps': -1e-8}, 'optimizer adam: eps must be >= 0, got -1e-08', True),
    ({'name': 'adamw', 'weight_decay': -0.01}, 'optimizer adamw: weight_decay must be >= 0, got -0.01', True),
    ({'name': 'adam', 'betas': 0.9}, 'optimizer adam: betas must be a pair [beta1, beta2], got 0.9', False),
    ({'name': 'adam', 'amsgrad': 'yes'}, "optimizer adam: amsgrad must be true or false, got 'yes'", False),
    ({'name': 'sgd', 'momentum': '0.9'}, "optimizer sgd: momentum must be a number, got '0.9'", False),
    ({'name': 'rmsprop'}, "unknown optimizer 'rmsprop'; choose one of ['adam', 'adamw', 'sgd']", False),
    ({'name': 'adam', 'momentum': 0.9},
     "optimizer adam: unknown argument(s) ['momentum']; adam takes ['amsgrad', 'betas', 'eps', 'lr', "
     "'weight_decay']", False),
    ({'lr': 0.1}, "optimizer: expected a mapping with a 'name' (one of ['adam', 'adamw', 'sgd'])", False),
])
def test_bad_optimizer_arguments_are_named(params, spec, message, torch_rejects):
  with pytest.raises(optim.OptimError) as info:
    optim.make_optimizer(params, 'frozen', spec, 0.1)
  assert message in str(info.value)
  assert isinstance(info.value, ValueError)
  if torch_rejects:
    torch = pytest.importorskip('torch')
    with pytest.raises(ValueError):
      _torch_optimizer(spec, [torch.nn.Parameter(torch.zeros(1))])
