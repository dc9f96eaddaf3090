"""Five float64 SGD steps of the zoo's fine-tuned models, tl_jax against torch, head only and full.

For convnext_tiny, efficientnet_b0, mobilenet_v3_large, vit_b_16, swin_t, densenet121 and
inception_v3: a random torchvision model (randomised BatchNorm statistics, norm affine params,
layer scales, bias tables) with its head swapped for a fresh nn.Linear(in, K) as the fine-tuning
tutorial does, converted by `torch_to_flax`, then trained five steps on the same float64 batches:
torch's SGD (momentum, weight decay) with a StepLR halving the lr every 2-step epoch, against
`train_step` with `make_optimizer` / `make_schedule` (the code path training runs). Both models are
in train mode with dropout and stochastic depth at p=0 (their draws cannot be equal); BatchNorm
uses batch statistics and updates its running ones, the frozen backbone's too, as torch's
model.train() does. After five steps every loss, parameter and BatchNorm statistic must agree.

Small inputs keep it cheap: the CNNs at 64 px (their last BatchNorms then see 2x2 maps of 4 rows:
at 32 px they see 4 values per channel, an ill-conditioned normalisation whose gradients would
compare rounding noise), convnext_tiny and swin_t at 32 / 64 px (LayerNorm is per position),
vit_b_16 built for 32 px inputs (4 patches and the class token; every layer of the real arch),
inception_v3 at 299 px (the aux head needs Mixed_6e at 17x17). Inception v3 is torchvision's as its
ImageNet weights build it and as tl_jax's model computes by default: `transform_input=True`, and
the aux head's loss added with weight 0.4 (`models.aux_loss_weights`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import name_table, torch_to_flax
from tl_jax.models import aux_loss_weights, create_model, family_of
from tl_jax.training import create_train_state, train_step

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES, STEPS, STEPS_PER_EPOCH = 3, 5, 2
SGD = {'name': 'sgd', 'momentum': 0.9, 'weight_decay': 1e-4}
LR = 0.01
SCHEDULE = {'name': 'step', 'step_size': 1, 'gamma': 0.5}   # the lr halves after steps 2 and 4
STRATEGIES = {'head': ['head'], 'full': 'finetune'}


@dataclasses.dataclass(frozen=True)
class Case:
  size: int
  batch: int
  no_dropout: dict   # our model's attributes that set its dropout / stochastic depth rates to 0
  image_size: int | None = None   # create_model's image_size (ViT's position embedding)
  lr: float = LR


CASES = {
    'convnext_tiny': Case(32, 2, {'stochastic_depth_prob': 0.0}),
    'efficientnet_b0': Case(64, 2, {'dropout_rate': 0.0, 'stochastic_depth_rate': 0.0}),
    'mobilenet_v3_large': Case(64, 2, {'dropout_rate': 0.0}),
    'vit_b_16': Case(32, 4, {'dropout_rate': 0.0, 'attention_dropout_rate': 0.0}, image_size=32),
    'swin_t': Case(64, 2, {'stochastic_depth_prob': 0.0}),
    'densenet121': Case(64, 2, {'drop_rate': 0.0}),
    # At lr 0.01 its full fine-tune on 2 images swings (losses 1.4, 4.8, 1.0, 6.4) and the two runs part
    # ~1000x per step from step 2 on (1e-11, 1e-8, 2e-7, 2e-4): the dynamics, not the arithmetic, diverge.
    'inception_v3': Case(299, 2, {'dropout_rate': 0.0}, lr=0.001),
}
# The default tier's one case, smaller still: torch's float64 depthwise convolutions run one group at a time.
# (Head only, no gradient goes through the 1x1 maps' BatchNorms of 2 values per channel.)
CHEAP = ('mobilenet_v3_large', 'head', Case(32, 2, {'dropout_rate': 0.0}))


def _randomise(tmodel, seed=0):
  """Norm affine params, layer scales, bias tables, biases and the class token away from their init
  (ones, zeros, 1e-6, near-zero), which would hide a wrong mapping or a wrong gradient of them."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in tmodel.modules():
      if isinstance(module, torch.nn.LayerNorm):   # ConvNeXt's LayerNorm2d too
        module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
        module.bias.copy_(torch.rand(module.bias.shape, generator=gen) - 0.5)
    for name, p in tmodel.named_parameters():
      if name.endswith('layer_scale'):
        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
      elif name.endswith(('relative_position_bias_table', 'class_token')):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
      elif name.endswith('bias') and ('encoder.layers' in name or 'attn' in name):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  return tmodel


def _no_dropout(tmodel):
  """Every Dropout and StochasticDepth at p=0 (DenseNet's drop_rate is 0 already)."""
  for module in tmodel.modules():
    if isinstance(module, (torch.nn.Dropout, torchvision.ops.StochasticDepth)):
      module.p = 0.0
    if hasattr(module, 'drop_rate'):
      module.drop_rate = 0.0
  return tmodel


def _torch_heads(arch):
  """torch module paths of the layers a new task replaces: the head and the aux heads' last layers."""
  family = family_of(arch)
  return [family.head_torch] + ['.'.join(path) for path in family.aux_heads(arch)]


def _torch_model(arch, seed=0):
  """The random torchvision model in float64, its heads fresh nn.Linear(in, K) as the tutorial puts them."""
  case = CASES[arch]
  if arch == 'vit_b_16':
    torch.manual_seed(seed)
    tmodel = torchvision.models.vit_b_16(image_size=case.image_size)
  elif arch == 'inception_v3':
    # As its ImageNet weights build it; torch's default init (init_weights=False) is much faster.
    torch.manual_seed(seed)
    tmodel = torchvision.models.inception_v3(aux_logits=True, transform_input=True, init_weights=False)
    with torch.no_grad():   # BatchNorm as helpers.random_torchvision_model randomises it
      for module in tmodel.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
          module.weight.uniform_(0.5, 1.5)
          module.bias.uniform_(-0.5, 0.5)
          module.running_mean.uniform_(-0.5, 0.5)
          module.running_var.uniform_(0.5, 2.0)
  else:
    tmodel = random_torchvision_model(arch, 1000, seed)
  _randomise(tmodel, seed)
  for path in _torch_heads(arch):
    tmodel.set_submodule(path, torch.nn.Linear(tmodel.get_submodule(path).in_features, NUM_CLASSES))
  return _no_dropout(tmodel).double()


def _batches(case):
  rng = np.random.default_rng(1)
  images = rng.standard_normal((STEPS * case.batch, 3, case.size, case.size))
  labels = rng.integers(0, NUM_CLASSES, STEPS * case.batch)
  return images, labels


def _torch_run(tmodel, arch, case, strategy, images, labels):
  """torch's SGD + StepLR, five steps in train mode; (losses, final state dict)."""
  if strategy == 'head':
    heads = tuple(f'{path}.' for path in _torch_heads(arch))
    for name, p in tmodel.named_parameters():
      p.requires_grad = name.startswith(heads)
  opt = torch.optim.SGD([p for p in tmodel.parameters() if p.requires_grad], lr=case.lr,
                        **{k: v for k, v in SGD.items() if k != 'name'})
  scheduler = torch.optim.lr_scheduler.StepLR(opt, SCHEDULE['step_size'], SCHEDULE['gamma'])
  aux_weights = family_of(arch).aux_loss_weights(arch)
  tmodel.train()
  losses, batch = [], case.batch
  for step in range(STEPS):
    rows = slice(step * batch, (step + 1) * batch)
    target = torch.from_numpy(labels[rows]).long()
    opt.zero_grad()
    outputs = tmodel(torch.from_numpy(images[rows]))
    if aux_weights:   # Inception v3's InceptionOutputs(logits, aux_logits)
      loss = torch.nn.functional.cross_entropy(outputs.logits, target)
      loss = loss + aux_weights[0] * torch.nn.functional.cross_entropy(outputs.aux_logits, target)
    else:
      loss = torch.nn.functional.cross_entropy(outputs, target)
    loss.backward()
    opt.step()
    if step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
      scheduler.step()
    losses.append(loss.item())
  return losses, state_dict_numpy(tmodel)


def _jax_run(initial, arch, case, strategy, images, labels):
  """tl_jax's train_step with make_optimizer / make_schedule, five steps; (losses, final state)."""
  model = create_model(arch, NUM_CLASSES, image_size=case.image_size).clone(**case.no_dropout)
  variables = torch_to_flax(initial, arch)
  trainable = STRATEGIES[strategy]
  schedule = optim.make_schedule(SCHEDULE, case.lr, epochs=3, steps_per_epoch=STEPS_PER_EPOCH)
  state = create_train_state(model, variables, optim.make_optimizer(variables['params'], trainable, SGD, schedule))
  step_fn = jax.jit(functools.partial(train_step, model=model, trainable=optim.trainable_mask(state.params, trainable),
                                      bn_train=True, aux_weights=aux_loss_weights(model)))
  images_bhwc = np.transpose(images, (0, 2, 3, 1))
  losses = []
  for step in range(STEPS):
    rows = slice(step * case.batch, (step + 1) * case.batch)
    batch = {'images': jnp.asarray(images_bhwc[rows]), 'labels': jnp.asarray(labels[rows], jnp.int32),
             'mask': jnp.ones(case.batch, bool)}
    state, sums = step_fn(state, batch)
    losses.append(float(sums['loss_sum'] / sums['count']))
  return losses, jax.device_get(state)


def _cases():
  arch, strategy, case = CHEAP
  yield pytest.param(arch, strategy, case, id=f'{arch}-{strategy}-{case.size}px')
  for arch, case in CASES.items():
    for strategy in STRATEGIES:
      marks = [pytest.mark.slow]
      if (arch, strategy) == ('inception_v3', 'full'):
        # Ill-conditioned, not wrong: the losses part from torch's by 6e-12, 2e-9, 3e-8, 3e-3 over steps
        # 2..5, and our own run with every param scaled by 1 + 1e-14 parts from ours by the same (2e-12,
        # 7e-10, 3e-8, 3e-3; step 1 and the head-only run agree to 1e-13). Its 2-image batch leaves the
        # aux head's last BatchNorm 2 values per channel. Batch 4 parts less (step 5: 6e-9), still > 1e-9.
        # Not run: a non-strict xfail passes either way and would spend five minutes of the slow tier.
        marks.append(pytest.mark.xfail(reason='inception_v3 full fine-tune on 2 images amplifies rounding '
                                       '1e-14 -> 3e-3 in five steps (ours against ours too)', run=False))
      yield pytest.param(arch, strategy, case, marks=marks, id=f'{arch}-{strategy}')


@pytest.mark.parametrize('arch, strategy, case', list(_cases()))
def test_five_sgd_steps_match_torch_in_float64(arch, strategy, case):
  images, labels = _batches(case)
  tmodel = _torch_model(arch)
  initial = state_dict_numpy(tmodel)
  torch_losses, final_torch = _torch_run(tmodel, arch, case, strategy, images, labels)
  expected_moved = (sum(p.requires_grad for p in tmodel.parameters())
                    + sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in tmodel.modules()) * 2)
  del tmodel
  with jax.enable_x64(True):
    losses, state = _jax_run(initial, arch, case, strategy, images, labels)
  what = f'5 SGD steps float64 {arch} {case.size}px/{strategy}'
  loss_err = np.max(np.abs(np.subtract(losses, torch_losses)))
  assert within(loss_err, 'train_loss_abs_f64', f'{what}: loss per step (abs)'), (losses, torch_losses)
  moved, worst = 0, {}
  for entry in name_table(arch):
    tree = state.params if entry.collection == 'params' else state.batch_stats
    ours = np.asarray(functools.reduce(lambda t, k: t[k], entry.path, tree))
    ours = ours.transpose(3, 2, 0, 1) if entry.kind == 'conv' else ours.T if entry.kind == 'linear_w' else ours
    start, theirs = initial[entry.torch_name], final_torch[entry.torch_name]
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, entry.torch_name   # float64, or an index
    if np.array_equal(start, theirs):
      assert np.array_equal(ours, start), f'{entry.torch_name}: torch left it, we changed it'
      continue
    moved += 1
    kind = 'BN running stat' if entry.collection == 'batch_stats' else 'param'
    err = rel_err(ours - start, theirs - start)
    worst[kind] = max(worst.get(kind, 0.0), err)
    assert within(err, 'train_delta_rel_f64', f'{what}: {kind} change (rel)'), (entry.torch_name, err)
  # Every trainable tensor and every BatchNorm's running mean and variance moved, ours as torch's.
  assert moved == expected_moved, (moved, expected_moved)
