"""Param groups, layer-wise lr decay, weight-decay masks, gradient clipping and accumulation (issue 24,
items 1-4), each against torch in float64.

The default tier runs them on a toy model whose parameters carry ResNet names (so every stage rule
applies) with torch's optimizers and schedulers built from per-parameter groups written out in the
test; the slow tier runs five ResNet-18 steps through `train_step` (bn frozen, so 32 px is well
conditioned), the whole-family check of the norm rule, and scripts/train.py end to end.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from helpers import random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import models, optim
from tl_jax.config import ConfigError, validate

torch = pytest.importorskip('torch')

# ------------------------------------------------------------------------------- the toy model

# name -> shape; names as a ResNet's, so conv1/bn1 are 'stem', layer1_0 'layer1', fc 'head'.
TOY = {'conv1.kernel': (6, 5), 'bn1.scale': (5,), 'bn1.bias': (5,), 'layer1_0.conv1.kernel': (5, 5),
       'layer4_0.conv1.kernel': (5, 5), 'fc.kernel': (5, 3), 'fc.bias': (3,)}
BATCH, FEATURES, CLASSES = 4, 6, 3


def _toy_forward(p, x, xp):
  h = xp.tanh((x @ p['conv1.kernel']) * p['bn1.scale'] + p['bn1.bias'])
  h = xp.tanh(h @ p['layer1_0.conv1.kernel'])
  h = xp.tanh(h @ p['layer4_0.conv1.kernel'])
  return h @ p['fc.kernel'] + p['fc.bias']


def _toy_data(batches, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(0, 0.7, s) + (1.0 if k == 'bn1.scale' else 0.0) for k, s in TOY.items()}
  xs = rng.normal(0, 1, (batches, BATCH, FEATURES))
  ys = rng.integers(0, CLASSES, (batches, BATCH))
  return params, xs, ys


def _nested(flat):
  return unflatten_dict({tuple(k.split('.')): jnp.asarray(v) for k, v in flat.items()})


def _flat(tree):
  return {'.'.join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}


def _jax_loss(params, x, y):
  logits = _toy_forward(_flat_jax(params), x, jnp)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _flat_jax(tree):
  return {'.'.join(k): v for k, v in flatten_dict(tree).items()}


def _torch_scheduler(opt, schedule):
  name = schedule['name']
  if name == 'step':
    main = torch.optim.lr_scheduler.StepLR(opt, schedule['step_size'], schedule['gamma'])
  elif name == 'cosine':
    main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, schedule['T_max'], schedule['eta_min'])
  else:
    raise AssertionError(name)
  warmup = schedule.get('warmup_epochs', 0)
  if not warmup:
    return main
  ramp = torch.optim.lr_scheduler.LinearLR(opt, schedule['warmup_start_factor'], total_iters=warmup)
  return torch.optim.lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[warmup])


def _torch_toy_run(params, xs, ys, cls, per_param, schedule, batches_per_epoch, accumulate=1, max_norm=None):
  """torch's loop: `per_param` name -> that parameter's group arguments (lr, weight_decay, ...); names
  left out are frozen. Per batch `loss / k` backward, a step after every `accumulate` batches and at
  the epoch's end (k: the batches of that step), the scheduler stepped once per epoch. Returns the
  params after every batch and the clipping norms."""
  tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in per_param) for k, v in params.items()}
  opt = cls([{'params': [tensors[k]], **kw} for k, kw in per_param.items()])
  scheduler = _torch_scheduler(opt, schedule)
  after, norms = [], []
  epochs = len(xs) // batches_per_epoch
  for epoch in range(epochs):
    for i in range(batches_per_epoch):
      group_start = i - i % accumulate
      size = min(accumulate, batches_per_epoch - group_start)
      b = epoch * batches_per_epoch + i
      logits = _toy_forward(tensors, torch.from_numpy(xs[b]), torch)
      loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ys[b]))
      (loss / size).backward()
      if i == group_start + size - 1:
        if max_norm is not None:
          norms.append(float(torch.nn.utils.clip_grad_norm_([tensors[k] for k in per_param], max_norm)))
        opt.step()
        opt.zero_grad()
      after.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    scheduler.step()
  return after, norms


def _jax_toy_run(params, xs, ys, trainable, optimizer, schedule, batches_per_epoch, accumulate=1, max_norm=None):
  """The same with tl_jax's stage optimizer, one update per batch (the gradient of its mean loss)."""
  tree = _nested(params)
  steps = optim.optimizer_steps_per_epoch(batches_per_epoch, accumulate)
  epochs = len(xs) // batches_per_epoch
  tx = optim.make_stage_optimizer(tree, trainable, optimizer,
                                  lambda lr: optim.make_schedule(schedule, lr, epochs, steps), arch='resnet18',
                                  clip_grad_norm_to=max_norm, accumulate=accumulate,
                                  batches_per_epoch=batches_per_epoch)
  state = tx.init(tree)

  @jax.jit
  def step(tree, state, x, y):
    grads = jax.grad(_jax_loss)(tree, x, y)
    updates, state = tx.update(grads, state, tree)
    return optax.apply_updates(tree, updates), state

  after = []
  for x, y in zip(xs, ys):
    tree, state = step(tree, state, jnp.asarray(x), jnp.asarray(y))
    after.append(_flat(tree))
  return after


def _compare(ours, theirs, start, what):
  worst = 0.0
  for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
    for k in start:
      if np.array_equal(b[k], start[k]):
        assert np.array_equal(a[k], start[k]), f'{what}: torch left {k} at step {step}, we changed it'
        continue
      worst = max(worst, rel_err(a[k] - start[k], b[k] - start[k]))
  assert within(worst, 'optim_toy_rel_f64', what), worst
  return worst


STEP_SCHEDULE = {'name': 'step', 'step_size': 1, 'gamma': 0.5}
COSINE_SCHEDULE = {'name': 'cosine', 'T_max': 3, 'eta_min': 0.001, 'warmup_epochs': 2, 'warmup_start_factor': 0.25}


def test_param_groups_and_weight_decay_masks_match_torch_param_groups_with_a_warm_cosine():
  """Each group's lr follows the schedule from its own lr (torch's schedulers: eta_min is absolute, so
  it is not a common factor); a bias takes bias_weight_decay even inside a norm layer (torchvision
  checks its custom key first); layer1 is frozen although no group names it."""
  params, xs, ys = _toy_data(10)
  optimizer = {'name': 'sgd', 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 0.01,
               'groups': [{'stages': ['stem'], 'lr': 0.02, 'weight_decay': 0.05},
                          {'stages': ['head'], 'momentum': 0.5, 'nesterov': True}],
               'norm_weight_decay': 0.0, 'bias_weight_decay': 0.001}
  base, stem, head = (dict(lr=0.1, momentum=0.9, weight_decay=0.01), dict(lr=0.02, momentum=0.9, weight_decay=0.05),
                      dict(lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.01))
  per_param = {'conv1.kernel': stem, 'bn1.scale': {**stem, 'weight_decay': 0.0},
               'bn1.bias': {**stem, 'weight_decay': 0.001}, 'layer4_0.conv1.kernel': base,
               'fc.kernel': head, 'fc.bias': {**head, 'weight_decay': 0.001}}
  schedule = COSINE_SCHEDULE
  theirs, _ = _torch_toy_run(params, xs, ys, torch.optim.SGD, per_param, schedule, 2)
  with jax.enable_x64(True):
    ours = _jax_toy_run(params, xs, ys, ['stem', 'layer4', 'head'], optimizer, schedule, 2)
  _compare(ours, theirs, params, 'toy float64 SGD: 2 groups + norm/bias weight decay, warm cosine')


def test_layer_decay_matches_torch_built_with_a_group_per_stage():
  """resnet18's stages stem, layer1..4, head: the head gets lr, layer4 lr * d, ..., stem lr * d ** 5."""
  params, xs, ys = _toy_data(6, seed=1)
  decay, lr = 0.5, 0.01
  depth = {'conv1.kernel': 5, 'bn1.scale': 5, 'bn1.bias': 5, 'layer1_0.conv1.kernel': 4,
           'layer4_0.conv1.kernel': 1, 'fc.kernel': 0, 'fc.bias': 0}
  per_param = {k: dict(lr=lr * decay ** d, weight_decay=0.0 if k.startswith('bn1') else 0.1) for k, d in depth.items()}
  optimizer = {'name': 'adamw', 'lr': lr, 'weight_decay': 0.1, 'layer_decay': decay, 'norm_weight_decay': 0.0}
  theirs, _ = _torch_toy_run(params, xs, ys, torch.optim.AdamW, per_param, STEP_SCHEDULE, 2)
  with jax.enable_x64(True):
    ours = _jax_toy_run(params, xs, ys, 'finetune', optimizer, STEP_SCHEDULE, 2)
  _compare(ours, theirs, params, 'toy float64 AdamW: layer decay 0.5 + norm weight decay')


@pytest.mark.parametrize('max_norm', [0.05, pytest.param(1e3, marks=pytest.mark.slow)],
                         ids=['triggers', 'does-not-trigger'])
def test_clipping_matches_torchs_clip_grad_norm_over_the_trainable_params(max_norm):
  params, xs, ys = _toy_data(6, seed=2)
  per_param = {k: dict(lr=0.1, momentum=0.9) for k in TOY if not k.startswith('layer1')}
  theirs, norms = _torch_toy_run(params, xs, ys, torch.optim.SGD, per_param, STEP_SCHEDULE, 2, max_norm=max_norm)
  # The test means what it says: the norm is above max_norm at every step, or at none.
  assert all(n > max_norm for n in norms) if max_norm < 1 else all(n < max_norm for n in norms), norms
  with jax.enable_x64(True):
    ours = _jax_toy_run(params, xs, ys, ['stem', 'layer4', 'head'], {'name': 'sgd', 'lr': 0.1, 'momentum': 0.9},
                        STEP_SCHEDULE, 2, max_norm=max_norm)
  _compare(ours, theirs, params, f'toy float64 SGD: clip_grad_norm ({"triggers" if max_norm < 1 else "not"})')


def test_clip_grad_norm_is_torchs_formula_not_optaxs():
  grads = {'a': jnp.array([3.0, 4.0])}   # norm 5
  clipped, _ = optim.clip_grad_norm(1.0).update(grads, optax.EmptyState())
  torch_grad = torch.tensor([3.0, 4.0], requires_grad=True)
  torch_grad.grad = torch.tensor([3.0, 4.0])
  torch.nn.utils.clip_grad_norm_([torch_grad], 1.0)
  np.testing.assert_allclose(clipped['a'], torch_grad.grad.numpy(), rtol=1e-7)
  stock, _ = optax.clip_by_global_norm(1.0).update(grads, optax.clip_by_global_norm(1.0).init(grads))
  assert not np.array_equal(np.asarray(stock['a']), torch_grad.grad.numpy())   # 1 / 5 vs 1 / (5 + 1e-6)


@pytest.mark.parametrize('batches_per_epoch, max_norm', [pytest.param(4, 1.2, marks=pytest.mark.slow), (5, 0.9)],
                         ids=['divisible', 'remainder'])
def test_accumulation_matches_torchs_loop_with_a_step_at_each_epochs_end(batches_per_epoch, max_norm):
  """3 batches per step, 3 epochs, StepLR per epoch, clipping on the accumulated gradient: an epoch of
  5 batches steps after batches 3 and 5 (the last step the mean of 2), of 4 after 3 and 4; the lr
  changes on the epoch boundaries."""
  params, xs, ys = _toy_data(3 * batches_per_epoch, seed=3)
  per_param = {k: dict(lr=0.1, momentum=0.9) for k in TOY}
  theirs, norms = _torch_toy_run(params, xs, ys, torch.optim.SGD, per_param, STEP_SCHEDULE, batches_per_epoch,
                                 accumulate=3, max_norm=max_norm)
  assert len(norms) == 3 * 2 and max(norms) > max_norm > min(norms), norms   # clipping on some steps only
  with jax.enable_x64(True):
    ours = _jax_toy_run(params, xs, ys, 'finetune', {'name': 'sgd', 'lr': 0.1, 'momentum': 0.9}, STEP_SCHEDULE,
                        batches_per_epoch, accumulate=3, max_norm=max_norm)
  _compare(ours, theirs, params, 'toy float64 SGD: accumulate 3 (+ clipping), epoch boundaries')


def test_accumulation_sizes_end_each_epoch():
  sizes = optim.accumulation_sizes(3, batches_per_epoch=7)   # steps of 3, 3, 1
  assert [int(sizes(s)) for s in range(6)] == [3, 3, 1, 3, 3, 1]
  assert optim.optimizer_steps_per_epoch(7, 3) == 3 and optim.optimizer_steps_per_epoch(6, 3) == 2


def test_a_skipped_batch_adds_nothing_to_the_accumulated_gradient():
  """on_nonfinite: skip_step restores the float state (the accumulated sum) and lets the counts move
  on: the step still comes after `accumulate` batches and divides by it, as torch's loop whose
  skipped batch ran no backward()."""
  params = {'fc': {'kernel': jnp.ones((2,)), 'bias': jnp.zeros((2,))}}
  tx = optim.make_stage_optimizer(params, 'finetune', {'name': 'sgd'}, lambda lr: 1.0, accumulate=3)
  state = tx.init(params)
  grads = [{'fc': {'kernel': jnp.full(2, g), 'bias': jnp.zeros(2)}} for g in (3.0, 100.0, 6.0)]
  _, kept = tx.update(grads[0], state, params)
  _, dropped = tx.update(grads[1], kept, params)
  restored = jax.tree.map(lambda new, old: old if jnp.issubdtype(new.dtype, jnp.inexact) else new, dropped, kept)
  updates, _ = tx.update(grads[2], restored, params)
  np.testing.assert_allclose(updates['fc']['kernel'], -(3.0 + 6.0) / 3)


# ---------------------------------------------------------------------------------- the labels


@pytest.mark.parametrize('arch', ['resnet18', pytest.param('vit_b_16', marks=pytest.mark.slow)])
def test_norm_and_bias_masks_are_torchvisions_set_weight_decay_classes(arch):
  _check_masks_against_torchvision(arch)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['convnext_tiny', 'alexnet', 'vgg11_bn', 'densenet121', 'efficientnet_b0',
                                  'efficientnet_v2_s', 'googlenet', 'inception_v3', 'maxvit_t', 'mnasnet0_5', 'mobilenet_v2',
                                  'mobilenet_v3_small', 'regnet_y_400mf', 'shufflenet_v2_x0_5', 'squeezenet1_1',
                                  'swin_t', 'resnext50_32x4d'])
def test_norm_and_bias_masks_hold_for_every_family(arch):
  _check_masks_against_torchvision(arch)


def _check_masks_against_torchvision(arch):
  """Our norm/bias masks, mapped to torch names by the arch's name table, against torchvision's
  reference script's rule: a parameter of a norm_classes module; a parameter named 'bias'."""
  torchvision = pytest.importorskip('torchvision')
  norm_classes = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
                  torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)
  model = models.create_model(arch, 3)
  params = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0)))['params']
  norms, biases = flatten_dict(optim.norm_mask(params)), flatten_dict(optim.bias_mask(params))
  tmodel = getattr(torchvision.models, arch)(num_classes=3)
  torch_norm, torch_bias = {}, {}
  for module_name, module in tmodel.named_modules():
    for name, _ in module.named_parameters(recurse=False):
      full = f'{module_name}.{name}' if module_name else name
      torch_norm[full], torch_bias[full] = isinstance(module, norm_classes), name == 'bias'
  table = [e for e in models.family_of(arch).name_table(arch, True) if e.collection == 'params']
  assert len(table) == len(norms) == len(torch_norm)
  for entry in table:
    assert norms[entry.path] == torch_norm[entry.torch_name], entry
    assert biases[entry.path] == torch_bias[entry.torch_name], entry
  assert any(torch_norm.values()) or arch in ('alexnet', 'squeezenet1_1')


def test_layer_decay_depths_count_the_archs_stages_from_the_head():
  assert optim.stage_depths(models.arch_stages('resnet18'), ['head']) == {
      'stem': 5, 'layer1': 4, 'layer2': 3, 'layer3': 2, 'layer4': 1, 'head': 0}
  vit = optim.stage_depths(models.arch_stages('vit_b_16'), ['head'])
  assert (vit['conv_proj'], vit['encoder.layers.encoder_layer_0'], vit['encoder.ln'], vit['head']) == (14, 13, 1, 0)
  convnext = optim.stage_depths(models.arch_stages('convnext_tiny'), ['head'])
  assert (convnext['features.0'], convnext['features.7'], convnext['classifier']) == (9, 2, 1)


def test_a_plain_optimizer_keeps_its_state_structure_and_clipping_adds_none():
  """No groups: the optimizer state is the one tl_jax always had (old checkpoints resume); clipping
  adds no state, so --resume after a non-finite stop may turn it on (NONFINITE_RETRY_KEYS)."""
  params, _, _ = _toy_data(1)
  tree = _nested(params)
  spec = {'name': 'sgd', 'lr': 0.1, 'momentum': 0.9}
  old = optax.partition({optim.TRAINABLE: optim.torch_optimizer(spec, 0.1), optim.FROZEN: optax.set_to_zero()},
                        optim.param_labels(tree, ['layer4', 'head']))
  structure = jax.tree.structure(old.init(tree))
  for clip in (None, 1.0):
    tx = optim.make_stage_optimizer(tree, ['layer4', 'head'], spec, lambda lr: lr, clip_grad_norm_to=clip)
    assert jax.tree.structure(tx.init(tree)) == structure


def test_make_optimizer_scales_a_given_schedule_by_each_groups_lr():
  params, _, _ = _toy_data(1)
  tree = _nested(params)
  tx = optim.make_optimizer(tree, 'finetune', {'name': 'sgd', 'lr': 0.1, 'groups': [{'stages': ['head'], 'lr': 0.4}]},
                            lambda step: 0.1 * 0.5 ** step)
  grads = jax.tree.map(jnp.ones_like, tree)
  updates, _ = tx.update(grads, tx.init(tree), tree)
  assert float(updates['fc']['bias'][0]) == pytest.approx(-0.4)
  assert float(updates['bn1']['bias'][0]) == pytest.approx(-0.1)


# ---------------------------------------------------------------------------------- the schema


def _recipe(optimizer=None, **stage):
  return {'model': {'arch': 'resnet18', 'weights': 'random'},
          'stages': [{'name': 'a', 'epochs': 2, 'optimizer': optimizer or {'name': 'sgd'}, **stage}]}


@pytest.mark.parametrize('optimizer, stage, message', [
    ({'name': 'sgd', 'groups': [{'stages': ['layer9']}]}, {},
     "stages[0].optimizer.groups[0].stages: no stage 'layer9'"),
    ({'name': 'sgd', 'groups': [{'stages': ['features']}, {'stages': ['layer4']}]}, {},
     "stages[0].optimizer.groups[1].stages: stage 'layer4' is already in groups[0]"),
    ({'name': 'sgd', 'groups': [{'stages': []}]}, {},
     'stages[0].optimizer.groups[0].stages: List should have at least 1'),
    ({'name': 'sgd', 'groups': [{'stages': ['head'], 'betas': [0.9, 0.9]}]}, {},
     'stages[0].optimizer.groups[0].betas: unknown key'),
    ({'name': 'sgd', 'groups': [{'stages': ['head'], 'lr': -1}]}, {},
     'stages[0].optimizer.groups[0].lr: Input should be'),
    ({'name': 'sgd', 'groups': [{'stages': ['head'], 'nesterov': True}]}, {},
     'stages[0].optimizer.groups[0]: optimizer sgd: momentum must be > 0 with nesterov=True'),
    ({'name': 'adamw', 'layer_decay': -0.5}, {}, 'stages[0].optimizer.layer_decay: Input should be greater than 0'),
    ({'name': 'adamw', 'layer_decay': 1.5}, {},
     'stages[0].optimizer.layer_decay: Input should be less than or equal to 1'),
    ({'name': 'adamw', 'layer_decay': 0.7, 'groups': [{'stages': ['head']}]}, {},
     'stages[0].optimizer: give groups or layer_decay, not both'),
    ({'name': 'adam', 'norm_weight_decay': -1}, {}, 'stages[0].optimizer.norm_weight_decay: Input should be greater'),
    ({'name': 'sgd', 'bias_weight_decay': 'none'}, {},
     'stages[0].optimizer.bias_weight_decay: Input should be a valid number'),
    (None, {'accumulate': 0}, 'stages[0].accumulate: Input should be greater than or equal to 1'),
    (None, {'accumulate': 2.5}, 'stages[0].accumulate: Input should be a valid integer'),
    (None, {'clip_grad_norm': -1.0}, 'stages[0].clip_grad_norm: Input should be greater than 0'),
])
def test_bad_values_are_one_line_errors_naming_the_key(optimizer, stage, message):
  with pytest.raises(ConfigError) as error:
    validate(_recipe(optimizer, **stage))
  assert str(error.value).startswith(message) and '\n' not in str(error.value), str(error.value)


def test_the_library_names_bad_groups_too():
  params, _, _ = _toy_data(1)
  with pytest.raises(optim.OptimError, match="optimizer.groups.0..stages: no stage 'layer9'"):
    optim.make_stage_optimizer(_nested(params), 'finetune', {'name': 'sgd', 'groups': [{'stages': ['layer9']}]},
                               lambda lr: lr)
  with pytest.raises(optim.OptimError, match='layer_decay needs the arch'):
    optim.make_stage_optimizer(_nested(params), 'finetune', {'name': 'sgd', 'layer_decay': 0.5}, lambda lr: lr)


# ------------------------------------------------------------------- ResNet-18 through train_step

SIZE, RN_BATCH, RN_STEPS = 32, 4, 5


def _resnet_data(batches, batch=RN_BATCH):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batches * batch, 3, SIZE, SIZE))
  labels = rng.integers(0, 2, batches * batch)
  return images, labels


def _torch_resnet_run(tmodel, per_param_kwargs, cls, images, labels, batch, max_norm=None):
  """Eval-mode BN (bn: frozen); one torch param group per trainable parameter, StepLR(1, 0.5) over
  2-step epochs. Returns the params after the last step and the clipping norms."""
  tmodel.eval()
  named = dict(tmodel.named_parameters())
  groups = []
  for name, p in named.items():
    kwargs = per_param_kwargs(name)
    p.requires_grad = kwargs is not None
    if kwargs is not None:
      groups.append({'params': [p], **kwargs})
  opt = cls(groups)
  scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
  norms = []
  for step in range(len(labels) // batch):
    rows = slice(step * batch, (step + 1) * batch)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(images[rows])), torch.from_numpy(labels[rows]))
    loss.backward()
    if max_norm is not None:
      norms.append(float(torch.nn.utils.clip_grad_norm_([g['params'][0] for g in groups], max_norm)))
    opt.step()
    if step % 2 == 1:
      scheduler.step()
  return state_dict_numpy(tmodel), norms


def _jax_resnet_run(initial, trainable, optimizer, images, labels, batch, max_norm=None, accumulate=1):
  from tl_jax.convert import torch_to_flax
  from tl_jax.training import create_train_state, train_step
  model = models.create_model('resnet18', 2)
  variables = torch_to_flax(initial, 'resnet18')
  batches = len(labels) // batch
  tx = optim.make_stage_optimizer(
      variables['params'], trainable, optimizer,
      lambda lr: optim.make_schedule({'name': 'step', 'step_size': 1, 'gamma': 0.5}, lr, 3, 2), arch='resnet18',
      clip_grad_norm_to=max_norm, accumulate=accumulate)
  state = create_train_state(model, variables, tx)
  step_fn = jax.jit(functools.partial(train_step, model=model, trainable=optim.trainable_mask(state.params, trainable),
                                      bn_train=False))
  images_bhwc = np.transpose(images, (0, 2, 3, 1))
  for step in range(batches):
    rows = slice(step * batch, (step + 1) * batch)
    state, _ = step_fn(state, {'images': jnp.asarray(images_bhwc[rows]), 'labels': jnp.asarray(labels[rows], jnp.int32),
                               'mask': jnp.ones(batch, bool)})
  return jax.device_get(state)


def _compare_resnet(state, initial, final_torch, what, expect_moved):
  from tl_jax.convert import name_table
  moved = 0
  for entry in name_table('resnet18'):
    if entry.collection != 'params':
      continue
    ours = np.asarray(functools.reduce(lambda t, k: t[k], entry.path, state.params))
    ours = ours.transpose(3, 2, 0, 1) if entry.kind == 'conv' else ours.T if entry.kind == 'linear_w' else ours
    start, theirs = initial[entry.torch_name], final_torch[entry.torch_name]
    if np.array_equal(start, theirs):
      assert np.array_equal(ours, start), f'{entry.torch_name}: torch left it, we changed it'
      continue
    moved += 1
    err = rel_err(ours - start, theirs - start)
    assert within(err, 'train_delta_rel_f64', what), (entry.torch_name, err)
  assert moved == expect_moved


def _stage_of_torch_name(name):
  from tl_jax.convert import name_table
  paths = {e.torch_name: e.path for e in name_table('resnet18')}
  return models.stage_of(paths[name][0], 'resnet18')


def _is_norm(tmodel, name):
  module = tmodel.get_submodule(name.rsplit('.', 1)[0])
  return isinstance(module, torch.nn.BatchNorm2d)


@pytest.mark.slow
@pytest.mark.parametrize('max_norm', [0.5, None], ids=['clip-triggers', 'no-clip'])
def test_resnet18_param_groups_masks_and_clipping_match_torch_in_float64(max_norm):
  images, labels = _resnet_data(RN_STEPS)
  tmodel = random_torchvision_model('resnet18', 2, seed=3).double()
  initial = state_dict_numpy(tmodel)
  optimizer = {'name': 'sgd', 'lr': 0.02, 'momentum': 0.9, 'weight_decay': 0.01,
               'groups': [{'stages': ['layer3'], 'lr': 0.002, 'weight_decay': 0.05},
                          {'stages': ['head'], 'momentum': 0.5, 'weight_decay': 0.0}],
               'norm_weight_decay': 0.0, 'bias_weight_decay': 0.003}
  trainable = ['layer3', 'layer4', 'head']

  def kwargs(name):
    stage = _stage_of_torch_name(name)
    if stage not in trainable:
      return None
    out = {'lr': 0.02, 'momentum': 0.9, 'weight_decay': 0.01}
    overrides = {'layer3': {'lr': 0.002, 'weight_decay': 0.05}, 'head': {'momentum': 0.5, 'weight_decay': 0.0}}
    out.update(overrides.get(stage, {}))
    if name.endswith('.bias'):
      out['weight_decay'] = 0.003
    elif _is_norm(tmodel, name):
      out['weight_decay'] = 0.0
    return out

  final_torch, norms = _torch_resnet_run(copy.deepcopy(tmodel), kwargs, torch.optim.SGD, images, labels, RN_BATCH,
                                         max_norm)
  if max_norm is not None:
    assert all(n > max_norm for n in norms), norms
  with jax.enable_x64(True):
    state = _jax_resnet_run(initial, trainable, optimizer, images, labels, RN_BATCH, max_norm)
  what = f'resnet18 5 steps float64: groups + norm/bias wd{" + clip (triggers)" if max_norm else ""}'
  _compare_resnet(state, initial, final_torch, what, expect_moved=15 + 15 + 2)


@pytest.mark.slow
def test_resnet18_layer_decay_matches_torch_in_float64():
  images, labels = _resnet_data(RN_STEPS)
  tmodel = random_torchvision_model('resnet18', 2, seed=4).double()
  initial = state_dict_numpy(tmodel)
  depth = {'stem': 5, 'layer1': 4, 'layer2': 3, 'layer3': 2, 'layer4': 1, 'head': 0}

  def kwargs(name):
    return {'lr': 0.001 * 0.6 ** depth[_stage_of_torch_name(name)], 'weight_decay': 0.05}

  final_torch, _ = _torch_resnet_run(copy.deepcopy(tmodel), kwargs, torch.optim.AdamW, images, labels, RN_BATCH)
  with jax.enable_x64(True):
    state = _jax_resnet_run(initial, 'finetune', {'name': 'adamw', 'lr': 0.001, 'weight_decay': 0.05,
                                                  'layer_decay': 0.6}, images, labels, RN_BATCH)
  _compare_resnet(state, initial, final_torch, 'resnet18 5 steps float64: AdamW layer decay 0.6', expect_moved=62)


@pytest.mark.slow
def test_resnet18_accumulation_equals_the_big_batch_in_float64():
  """bn: frozen: 2 batches of 4 per step equal one batch of 8 (torch), every parameter, 5 steps."""
  images, labels = _resnet_data(RN_STEPS, batch=2 * RN_BATCH)
  tmodel = random_torchvision_model('resnet18', 2, seed=5).double()
  initial = state_dict_numpy(tmodel)
  final_torch, _ = _torch_resnet_run(copy.deepcopy(tmodel), lambda name: {'lr': 0.01, 'momentum': 0.9},
                                     torch.optim.SGD, images, labels, 2 * RN_BATCH)
  with jax.enable_x64(True):
    state = _jax_resnet_run(initial, 'finetune', {'name': 'sgd', 'lr': 0.01, 'momentum': 0.9}, images, labels,
                            RN_BATCH, accumulate=2)
  _compare_resnet(state, initial, final_torch, 'resnet18 5 steps float64: accumulate 2x4 = batch 8', expect_moved=62)


# ------------------------------------------------------------------------------ end to end

TOOLKIT_RECIPE = """
model: {arch: resnet18, weights: random}
data:
  batch_size: 4
  workers: 0
  # Deterministic train transforms: the head stage trains on cached features, with accumulation.
  train_transforms: [{Resize: {size: 32}}, {CenterCrop: {size: 32}}, {ToTensor: {}},
                     {Normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}]
  val_transforms: [{Resize: {size: 32}}, {CenterCrop: {size: 32}}, {ToTensor: {}},
                   {Normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}]
stages:
  - name: head
    epochs: 1
    trainable: [head]
    bn: frozen
    accumulate: 2
    clip_grad_norm: 1.0
    optimizer: {name: sgd, lr: 0.01, momentum: 0.9, bias_weight_decay: 0.0, weight_decay: 0.0001}
  - name: groups
    epochs: 2
    accumulate: 2
    clip_grad_norm: 1.0
    on_nonfinite: skip_step
    optimizer:
      name: adamw
      lr: 0.001
      groups: [{stages: [stem, layer1], lr: 0.0001}, {stages: [head], weight_decay: 0}]
      norm_weight_decay: 0
      bias_weight_decay: 0
    schedule: {name: step, step_size: 1, gamma: 0.5}
  - name: decay
    epochs: 1
    trainable: [layer4, head]
    optimizer: {name: sgd, lr: 0.01, momentum: 0.9, layer_decay: 0.7, norm_weight_decay: 0}
"""


@pytest.mark.slow
def test_scripts_train_runs_a_recipe_with_every_optimisation_key(tmp_path, capsys, monkeypatch):
  import json
  import runpy
  import sys
  from pathlib import Path
  from PIL import Image
  rng = np.random.default_rng(5)
  data = tmp_path / 'data'
  for split, n in (('train', 6), ('val', 2)):   # 12 train images: 3 batches per epoch, steps of 2 + 1
    for label, cls in enumerate(('ants', 'bees')):
      (data / split / cls).mkdir(parents=True)
      for i in range(n):
        pixels = np.clip(rng.normal(70 + 110 * label, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / split / cls / f'{cls}_{i}.png')
  recipe = tmp_path / 'toolkit.yaml'
  recipe.write_text(TOOLKIT_RECIPE)
  workdir = tmp_path / 'run'
  script = Path(__file__).resolve().parents[1] / 'scripts' / 'train.py'
  monkeypatch.setattr(sys, 'argv', [str(script), '--config', str(recipe), '--data', str(data), '--workdir',
                                    str(workdir), '--no-progress', '--no-tensorboard'])
  with pytest.raises(SystemExit) as info:
    runpy.run_path(str(script), run_name='__main__')
  out = capsys.readouterr()
  assert info.value.code == 0, out.err
  assert 'stage head: cached backbone features for train and val' in out.out
  history = json.loads((workdir / 'history.json').read_text())
  rows = history['epochs']
  assert [r['stage'] for r in rows] == ['head', 'groups', 'groups', 'decay']
  assert [r['lr'] for r in rows] == pytest.approx([0.01, 0.001, 0.0005, 0.01])
  assert all(np.isfinite(r['train_loss']) and r['train_steps'] == 3 for r in rows)
