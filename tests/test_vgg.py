"""Flax VGGs against torchvision's, computed in the test on the same weights and inputs."""

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import flax_to_torch, name_table, torch_to_flax
from tl_jax.models import VGG, BatchNorm, create_model, init_variables
from tl_jax.models.vgg import ARCHS
from tl_jax.models.vgg import adaptive_avg_pool
from tl_jax.training import create_train_state, train_step

torch = pytest.importorskip('torch')

NUM_CLASSES = 5


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _no_dropout(tmodel):
  """Dropout masks cannot equal torch's; parity of train-mode passes runs both with p=0."""
  for module in tmodel.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  return tmodel


def test_adaptive_avg_pool_uses_torchs_bins():
  for h, w in [(14, 14), (12, 12), (6, 6), (3, 3), (1, 1), (9, 5), (7, 7)]:
    x = np.random.default_rng(h * 31 + w).standard_normal((2, 3, h, w)).astype(np.float32)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), (7, 7)).numpy()
    ours = adaptive_avg_pool(jnp.asarray(nchw_to_nhwc(x)), 7)
    np.testing.assert_allclose(ours, nchw_to_nhwc(ref), rtol=1e-6, atol=1e-6, err_msg=f'{h}x{w}')


@pytest.mark.parametrize('arch, sizes', [pytest.param('vgg11', (224, 192, 96), marks=pytest.mark.slow),
                                         ('vgg11_bn', (96,)),
                                         pytest.param('vgg11_bn', (224, 192), marks=pytest.mark.slow),
                                         pytest.param('vgg16', (224, 192, 96), marks=pytest.mark.slow)])
def test_eval_logits_at_224_and_at_sizes_that_do_not_give_7x7(arch, sizes):
  """224 px gives a 7x7 map; 192 px 6x6 and 96 px 3x3 go through the overlapping adaptive bins."""
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  model = create_model(arch, NUM_CLASSES)
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  forward = jax.jit(lambda v, x: model.apply(v, x))
  for size in sizes:
    x = _images(1 if arch == 'vgg16' else 2, size)
    with torch.no_grad():
      ref = tmodel(torch.from_numpy(x)).numpy()
    assert within(rel_err(forward(variables, jnp.asarray(nchw_to_nhwc(x))), ref), 'logits_rel',
                  f'eval logits {arch} {size}px (rel)')
    # Dropout is off in eval mode: the same rng-free call twice gives the same logits.
  np.testing.assert_array_equal(forward(variables, jnp.asarray(nchw_to_nhwc(x))),
                                forward(variables, jnp.asarray(nchw_to_nhwc(x))))


@pytest.mark.slow
def test_train_mode_forward_updates_running_stats_like_torch():
  arch = 'vgg11_bn'
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).train()
  x = _images(4, 64)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = VGG(arch, NUM_CLASSES, dropout_rate=0.0)
  variables = torch_to_flax(state_dict_numpy(random_torchvision_model(arch, NUM_CLASSES)), arch)
  out, updates = model.apply(variables, jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats'])
  assert within(rel_err(out, ref), 'logits_rel', f'train-mode logits {arch} (rel)')
  ours = flax_to_torch({'params': variables['params'], 'batch_stats': updates['batch_stats']}, arch)
  stats = [k for k in ref_names(arch) if k.endswith(('running_mean', 'running_var'))]
  worst = max(np.max(np.abs(ours[k] - tmodel.state_dict()[k].numpy())) for k in stats)
  assert within(worst, 'running_stat_abs', f'BN running stats after a train forward {arch} (abs)')
  before = state_dict_numpy(random_torchvision_model(arch, NUM_CLASSES))
  assert not np.allclose(before['features.26.running_var'], ours['features.26.running_var'])


def ref_names(arch):
  return [e.torch_name for e in name_table(arch)]


def _grad_err(grads, grads_ref, name):
  """Relative error; a conv bias that feeds a BatchNorm has an exactly zero gradient (BN removes
  the mean), so both frameworks return rounding noise there: measure it against its conv's weight."""
  parts = name.split('.')
  if parts[0] == 'features' and parts[2] == 'bias' and f'features.{int(parts[1]) + 1}.running_mean' in grads_ref:
    scale = np.max(np.abs(grads_ref[name.replace('.bias', '.weight')]))
    return float(np.max(np.abs(grads[name] - grads_ref[name])) / scale)
  return rel_err(grads[name], grads_ref[name])


def _torch_grads(tmodel, x, labels):
  """Loss and gradients by torch name, with the running-stat names too (for _grad_err)."""
  loss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(labels))
  loss.backward()
  grads = {name: p.grad.numpy().copy() for name, p in tmodel.named_parameters()}
  return loss.item(), {**grads, **{k: None for k in tmodel.state_dict() if k.endswith('running_mean')}}


def _worst(grads, grads_ref):
  return max((_grad_err(grads, grads_ref, k), k) for k, v in grads_ref.items() if v is not None)


@pytest.mark.slow
def test_cross_entropy_gradients_match_torch_in_float64():
  arch = 'vgg11_bn'
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).double().train()
  x, labels = _images(4, 64, seed=5, dtype='float64'), np.array([0, 3, 4, 2])
  loss_ref, grads_ref = _torch_grads(tmodel, x, labels)
  state_dict = state_dict_numpy(tmodel)
  del tmodel
  with jax.enable_x64(True):
    loss, grads, _ = _jax_grads(VGG(arch, NUM_CLASSES, dropout_rate=0.0), state_dict, x, labels, arch)
  worst, name = _worst(grads, grads_ref)
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {arch} (rel)'), (name, worst)
  assert abs(loss - loss_ref) <= TOL['train_loss_abs_f64']


class _Replay(torch.nn.Module):
  """One branch point of the float64 reference, fixed to the branch a float32 run took: a ReLU as
  its 0/1 mask, a max-pool as the input positions it picked (torch's return_indices)."""

  def __init__(self, kind, taken):
    super().__init__()
    self.kind, self.taken = kind, torch.from_numpy(taken)

  def forward(self, x):
    if self.kind == 'relu':
      return x * self.taken.to(x.dtype)
    return x.flatten(2).gather(2, self.taken.flatten(2)).view(self.taken.shape)


def _branch_points(tmodel):
  """(Sequential, index) of every ReLU and MaxPool2d of a torchvision VGG, in forward order."""
  return [(seq, i) for seq in (tmodel.features, tmodel.classifier) for i, m in enumerate(seq)
          if isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d))]


def _torch_branches(tmodel, x):
  """The branch a torch forward takes at each ReLU (input > 0) and max-pool (argmax indices), and
  every ReLU's input (None at the max-pools)."""
  taken, inputs, hooks = [], [], []

  def hook(module, args):
    inp = args[0].detach().clone()   # ReLU(inplace=True) overwrites it after the hook
    if isinstance(module, torch.nn.ReLU):
      taken.append(('relu', (inp > 0).numpy()))
      inputs.append(inp.numpy())
    else:
      taken.append(('pool', torch.nn.functional.max_pool2d(inp, 2, 2, return_indices=True)[1].numpy()))
      inputs.append(None)

  for seq, i in _branch_points(tmodel):
    hooks.append(seq[i].register_forward_pre_hook(hook))
  with torch.no_grad():
    tmodel(torch.from_numpy(x))
  for h in hooks:
    h.remove()
  return taken, inputs


def _pool_indices_nchw(x_bhwc):
  """torch's MaxPool2d(2, 2) return_indices (flat h * W + w per plane, the first maximum in
  row-major window order, as torch and XLA's select-and-scatter take it) of an NHWC array."""
  b, h, w, c = x_bhwc.shape
  windows = x_bhwc[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
  windows = windows.transpose(0, 5, 1, 3, 2, 4).reshape(b, c, h // 2, w // 2, 4)
  k = np.argmax(windows, axis=-1)
  rows = 2 * np.arange(h // 2)[:, None] + k // 2
  cols = 2 * np.arange(w // 2)[None, :] + k % 2
  return (rows * w + cols).astype(np.int64)


def _jax_grads(model, state_dict, x, labels, arch):
  """Loss, gradients by torch name, and the branches that same compiled gradient took: the
  BatchNorm and hidden Dense outputs come back as aux of the one jitted value_and_grad, so the ReLU
  masks and pool choices are those its backward pass used, not a separate compile's."""
  variables = torch_to_flax(state_dict, arch)
  captured = lambda mdl, _: isinstance(mdl, BatchNorm) or (isinstance(mdl, nn.Dense) and mdl.name != 'classifier_6')

  def loss_fn(params):
    logits, state = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats', 'intermediates'],
                                capture_intermediates=captured)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))
    return loss, state['intermediates']

  (loss, inter), grads = jax.device_get(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params']))
  taken = []
  for b, widths in enumerate(ARCHS[arch].blocks, start=1):
    for i in range(1, len(widths) + 1):
      pre = inter[f'block{b}_bn{i}']['__call__'][0]
      taken.append(('relu', np.transpose(pre > 0, (0, 3, 1, 2))))
    taken.append(('pool', _pool_indices_nchw(np.maximum(pre, 0))))
  taken += [('relu', inter[name]['__call__'][0] > 0) for name in ('classifier_0', 'classifier_3')]
  return float(loss), flax_to_torch({'params': grads, 'batch_stats': variables['batch_stats']}, arch), taken


def _grads_on_branches(tmodel64, x64, labels, taken):
  """torch's float64 gradients with every branch point fixed to `taken`."""
  replay = copy.deepcopy(tmodel64)
  for (seq, i), (kind, branch) in zip(_branch_points(replay), taken, strict=True):
    seq[i] = _Replay(kind, branch)
  return _torch_grads(replay, x64, labels)[1]


def _branch_differences(taken, reference, pre64):
  """How many ReLU masks and pool choices differ from the float64 forward's, and the largest
  |float64 ReLU input| among the flipped masks (a flip is a rounding event only near 0)."""
  flips, worst = 0, 0.0
  for (kind, ours), (_, ref), pre in zip(taken, reference, pre64, strict=True):
    diff = ours != ref
    flips += int(diff.sum())
    if kind == 'relu' and diff.any():
      worst = max(worst, float(np.max(np.abs(pre[diff]))))
  return flips, worst


@pytest.mark.slow
def test_cross_entropy_gradients_in_float32_are_as_accurate_as_torchs():
  """Float32 gradients of vgg11_bn (train-mode BN, batch 4) against torch's float64 ones, ours held
  to torch float32's own accuracy. The gradient jumps at every ReLU kink and max-pool tie: a value
  within float32 rounding of one (this input has ReLU inputs ~1e-6 from 0 among its 2.4M) may land
  on either side, and one flipped element moves whole kernels' gradients by ~1e-2 (measured; which
  run flips depends on the kernels' rounding, so it varies across CPUs). So each float32 run is
  compared with the float64 gradient on the branches that run took, and its branches may differ
  from float64's only at values within 1e-4 of a ReLU kink."""
  arch = 'vgg11_bn'
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).train()
  x, labels = _images(4, 64, seed=5), np.array([0, 3, 4, 2])
  torch_taken, _ = _torch_branches(tmodel, x)
  _, grads_torch32 = _torch_grads(tmodel, x, labels)
  state_dict = state_dict_numpy(tmodel)
  tmodel64 = tmodel.double()
  x64 = x.astype(np.float64)
  ref_taken, pre64 = _torch_branches(tmodel64, x64)
  _, grads, ours_taken = _jax_grads(VGG(arch, NUM_CLASSES, dropout_rate=0.0), state_dict, x, labels, arch)
  ours_flips, ours_near = _branch_differences(ours_taken, ref_taken, pre64)
  torch_flips, torch_near = _branch_differences(torch_taken, ref_taken, pre64)
  ours, name = _worst(grads, _grads_on_branches(tmodel64, x64, labels, ours_taken))
  theirs, _ = _worst(grads_torch32, _grads_on_branches(tmodel64, x64, labels, torch_taken))
  print(f'float32 gradients, worst error against float64 torch on the same branches: ours {ours:.3e} ({name}), '
        f'torch {theirs:.3e}; branch points unlike float64: ours {ours_flips} (|x| <= {ours_near:.1e}), '
        f'torch {torch_flips} (|x| <= {torch_near:.1e})')
  assert ours_near <= 1e-4 and torch_near <= 1e-4, (ours_near, torch_near)
  assert ours_flips <= 20, ours_flips
  assert within(ours / theirs, 'grad_f32_error_ratio',
                f'gradients float32 vs float64 reference, ours/torch worst error {arch}'), (name, ours, theirs)


@pytest.mark.parametrize('strategy', ['frozen', 'finetune'])
@pytest.mark.slow
def test_five_sgd_steps_match_pytorch_in_float64(strategy):
  """vgg11_bn, dropout p=0, train-mode BN, SGD(0.001, 0.9): 'frozen' trains classifier[6] only."""
  arch, batch, steps, lr = 'vgg11_bn', 4, 5, 0.001
  tmodel = _no_dropout(random_torchvision_model(arch, 2, seed=3)).double().train()
  initial = state_dict_numpy(tmodel)
  x = _images(batch * steps, 32, seed=7, dtype='float64')
  labels = np.random.default_rng(8).integers(0, 2, batch * steps)
  if strategy == 'frozen':
    for name, p in tmodel.named_parameters():
      p.requires_grad = name.startswith('classifier.6.')
    opt = torch.optim.SGD(tmodel.classifier[6].parameters(), lr=lr, momentum=0.9)
  else:
    opt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=0.9)
  torch_losses = []
  for s in range(steps):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x[s * batch:(s + 1) * batch])),
                                             torch.from_numpy(labels[s * batch:(s + 1) * batch]))
    loss.backward()
    opt.step()
    torch_losses.append(loss.item())
  final_ref = state_dict_numpy(tmodel)
  del tmodel, opt

  model = VGG(arch, 2, dropout_rate=0.0)
  with jax.enable_x64(True):
    variables = torch_to_flax(initial, arch)
    tx = optim.make_optimizer(variables['params'], strategy, {'name': 'sgd', 'momentum': 0.9}, lr)
    state = create_train_state(model, variables, tx, jax.random.PRNGKey(0))
    trainable = optim.trainable_mask(state.params, strategy)
    step = jax.jit(functools.partial(train_step, model=model, trainable=trainable, bn_train=True),
                   donate_argnums=0)
    losses = []
    for s in range(steps):
      state, sums = step(state, {'images': jnp.asarray(nchw_to_nhwc(x[s * batch:(s + 1) * batch])),
                                 'labels': jnp.asarray(labels[s * batch:(s + 1) * batch]),
                                 'mask': jnp.ones(batch, bool)})
      losses.append(float(sums['loss_sum'] / sums['count']))
    final = flax_to_torch(jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}), arch)
  assert within(max(abs(a - b) for a, b in zip(losses, torch_losses)), 'train_loss_abs_f64',
                f'5 float64 SGD steps {arch} {strategy}: loss (abs)')
  deltas = {name: final[name] - initial[name] for name in ref_names(arch)}
  deltas_ref = {name: final_ref[name] - initial[name] for name in ref_names(arch)}
  param_names = [n for n in ref_names(arch) if not n.endswith(('running_mean', 'running_var'))]
  worst, changed = 0.0, 0
  for name in ref_names(arch):
    if not np.any(deltas_ref[name]):
      assert not np.any(deltas[name]), f'{name} moved but torch kept it'
      continue
    changed += name in param_names
    # Running stats move in both strategies (train-mode BN); conv biases feeding a BN only by rounding noise.
    worst = max(worst, _grad_err(deltas, deltas_ref, name))
  assert within(worst, 'train_delta_rel_f64', f'5 float64 SGD steps {arch} {strategy}: param change (rel)')
  assert changed == (2 if strategy == 'frozen' else len(param_names))


def test_dropout_keeps_half_scales_by_two_and_is_off_in_eval():
  model = VGG('vgg11', 3)
  h = jnp.ones((64, 4096), jnp.float32)
  draw = jax.jit(lambda key: model.apply({}, h, rngs={'dropout': key},
                                         method=lambda m, x: m.dropout(x, deterministic=False)))
  draws = np.stack([np.asarray(draw(jax.random.PRNGKey(k))) for k in range(8)])
  assert set(np.unique(draws)) == {0.0, 2.0}      # kept values scaled by 1 / (1 - p)
  assert abs((draws > 0).mean() - 0.5) < 0.002    # 2M draws: 4 standard deviations is 0.0014
  assert not np.array_equal(draws[0], draws[1])
  off = model.apply({}, h, method=lambda m, x: m.dropout(x, deterministic=True))
  np.testing.assert_array_equal(off, h)


@pytest.mark.slow
def test_train_step_draws_new_dropout_masks_each_step_and_reproducibly():
  """Same state -> same masks; the next step -> other masks (lr 0 keeps the weights equal)."""
  model = create_model('vgg11', 2)
  variables = init_variables(model, jax.random.PRNGKey(0), 32)
  state = create_train_state(model, variables, optax.sgd(0.0), jax.random.PRNGKey(1))
  assert state.batch_stats == {}
  step = jax.jit(functools.partial(train_step, model=model, bn_train=True,
                                   trainable=optim.trainable_mask(state.params, 'finetune')))
  batch = {'images': jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32),
           'labels': jnp.asarray([0, 1]), 'mask': jnp.ones(2, bool)}
  next_state, first = step(state, batch)
  _, again = step(state, batch)
  _, second = step(next_state, batch)
  assert float(first['loss_sum']) == float(again['loss_sum'])
  assert float(first['loss_sum']) != float(second['loss_sum'])


def test_stages_name_blocks_classifier_and_head():
  params = init_variables(create_model('vgg11_bn', 2), jax.random.PRNGKey(0), 32)['params']
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['classifier_6']
  recipe = optim.trainable_mask(params, ['classifier', 'head'])
  assert sorted(k for k, v in recipe.items() if v) == ['classifier_0', 'classifier_3', 'classifier_6']
  partial = optim.trainable_mask(params, ['block5', 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['block5_bn1', 'block5_bn2', 'block5_conv1',
                                                        'block5_conv2', 'classifier_6']
  features = optim.trainable_mask(params, ['features'])
  assert all(features[k] == k.startswith('block') for k in params)
  assert all(optim.trainable_mask(params, 'finetune').values())
  with pytest.raises(ValueError, match='unknown stages'):
    optim.trainable_mask(params, ['layer4'])


@pytest.mark.slow
def test_vgg_checkpoint_converts_predicts_and_exports_back(tmp_path):
  """A plain VGG (no batch_stats at all) through the file-level tools used by the scripts."""
  from PIL import Image
  from tl_jax import export, predict, weights
  from tl_jax.data.transforms import EvalTransform
  tmodel = random_torchvision_model('vgg11', 3).eval()
  src = tmp_path / 'vgg11.pth'
  torch.save(tmodel.state_dict(), src)
  model = export.import_torch_weights(src, tmp_path / 'ckpt', class_names=['a', 'b', 'c'])
  assert model.arch == 'vgg11' and model.num_classes == 3 and model.variables['batch_stats'] == {}
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 300, 3), dtype=np.uint8))
  image.save(tmp_path / 'x.png')
  [prediction] = predict.predict_files(tmp_path / 'ckpt', [tmp_path / 'x.png'])
  x = EvalTransform()(image)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))).numpy()[0]
  assert within(rel_err(prediction.logits, ref), 'logits_rel', 'predict.py logits vgg11 (rel)')
  assert prediction.class_name == 'abc'[int(np.argmax(ref))]
  back = export.export_torch_weights(tmp_path / 'ckpt', tmp_path / 'back.pth')
  for name, value in tmodel.state_dict().items():
    assert np.array_equal(back[name], value.numpy()), name
  reloaded = weights.load_state_dict(tmp_path / 'back.pth')
  fresh = __import__('torchvision').models.vgg11(num_classes=3)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in reloaded.items()}, strict=True)
