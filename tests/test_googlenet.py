"""Flax GoogLeNet against torchvision's, computed in the test on the same weights and inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import nchw_to_nhwc, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, name_table, torch_to_flax
from tl_jax.models import create_model, stage_tree
from tl_jax.models.googlenet import AUX_HEADS, FAMILY, GoogLeNet, ceil_max_pool
from tl_jax.models.inception import transform_input

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')


ARCH = 'googlenet'
NUM_CLASSES = 5


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _torch_model(transform_input=True, seed=0, num_classes=NUM_CLASSES):
  """torchvision's GoogLeNet as its ImageNet weights build it (its aux heads, transform_input on), with
  random weights and randomised BatchNorm affine params and running statistics (as
  helpers.random_torchvision_model; torch's default init is much faster than torchvision's
  truncated normal here)."""
  torch.manual_seed(seed)
  tmodel = torchvision.models.googlenet(num_classes=num_classes, aux_logits=True, transform_input=transform_input,
                                     init_weights=False)
  with torch.no_grad():
    for module in tmodel.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
  return tmodel


def _no_dropout(tmodel):
  for module in tmodel.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  return tmodel


@functools.lru_cache
def _param_shapes(num_classes=NUM_CLASSES):
  """init's {'params', 'batch_stats'} shapes (traced, not compiled)."""
  model = create_model(ARCH, num_classes)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))


def _eval_parity(size, batch, transform_input):
  tmodel = _torch_model(transform_input).eval()
  x = _images(batch, size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  variables = torch_to_flax(state_dict_numpy(tmodel), ARCH)
  model = GoogLeNet(num_classes=NUM_CLASSES, transform_input=transform_input)
  logits = jax.jit(model.apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert logits.dtype == jnp.float32 and logits.shape == ref.shape
  assert within(rel_err(logits, ref), 'logits_rel',
                f'eval logits {ARCH} {size}px transform_input={transform_input} (rel)')


def test_eval_logits_at_the_native_crop_size():
  """224 px (the weights' crop), transform_input on as torchvision builds it with ImageNet weights."""
  assert torchvision.models.get_model_weights(ARCH).DEFAULT.transforms().crop_size[0] == 224
  _eval_parity(224, 2, transform_input=True)


@pytest.mark.slow
@pytest.mark.parametrize('size, transform_input', [(224, False), (97, True), (15, False)])
def test_eval_logits_at_other_sizes_and_without_transform_input(size, transform_input):
  """97 px: odd maps through every ceil-mode pool; 15 px: torchvision's smallest input (1x1 at the end)."""
  _eval_parity(size, 1, transform_input)


def test_transform_input_is_torchvisions():
  x = _images(2, 8)
  ref = torchvision.models.GoogLeNet(aux_logits=False, transform_input=True, init_weights=False)._transform_input(
      torch.from_numpy(x)).numpy()
  assert within(float(np.max(np.abs(transform_input(jnp.asarray(nchw_to_nhwc(x))) - nchw_to_nhwc(ref)))),
                'pixel_abs', 'GoogLeNet/Inception transform_input (abs)')


def test_ceil_mode_max_pool_is_torchs():
  """Sizes where the last window is partial (kept), lies in the padding (dropped), or fits exactly."""
  for size, window, stride, padding in [(56, 3, 2, 0), (15, 3, 2, 0), (7, 2, 2, 0), (1, 2, 2, 0), (8, 3, 1, 1),
                                        (6, 3, 2, 1)]:
    x = np.random.default_rng(size).standard_normal((2, 3, size, size + 1)).astype(np.float32)
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(x), window, stride, padding, ceil_mode=True).numpy()
    ours = ceil_max_pool(jnp.asarray(nchw_to_nhwc(x)), window, stride, padding)
    np.testing.assert_array_equal(ours, nchw_to_nhwc(ref), err_msg=f'{size} {window} {stride} {padding}')


def test_conversion_round_trip_and_errors():
  """torch -> Flax -> torch is bit-identical and loads strictly; the name table is the state dict's, in
  order, aux heads included; wrong files are named or listed."""
  tmodel = _torch_model()
  state_dict = state_dict_numpy(tmodel)
  assert [e.torch_name for e in name_table(ARCH)] == [k for k in state_dict if not k.endswith('num_batches_tracked')]
  variables = torch_to_flax(state_dict, ARCH, reference=_param_shapes())
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      jax.tree_util.tree_map(lambda s: 0, _param_shapes()))
  back = flax_to_torch(variables, ARCH)
  assert back.keys() == state_dict.keys()
  for name, value in state_dict.items():
    assert np.array_equal(back[name], value), name
  fresh = torchvision.models.googlenet(num_classes=NUM_CLASSES, aux_logits=True, init_weights=False)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)

  with pytest.raises(ConversionError, match=r'missing \(1\): inception4a.branch2.1.conv.weight'):
    torch_to_flax({k: v for k, v in state_dict.items() if k != 'inception4a.branch2.1.conv.weight'}, ARCH)
  with pytest.raises(ConversionError, match=r'unexpected \(1\): aux3.fc.weight'):
    torch_to_flax({**state_dict, 'aux3.fc.weight': state_dict['fc.weight']}, ARCH)
  with pytest.raises(ConversionError, match='looks like a googlenet state dict'):
    torch_to_flax(state_dict, 'resnet18')


def test_without_the_head_the_aux_heads_last_layers_are_left_out_too():
  """A 1000-class file converts into a 5-class model's backbone: fc and both aux fc2 are num_classes wide."""
  torch.manual_seed(0)
  state_dict = state_dict_numpy(torchvision.models.googlenet(num_classes=1000, aux_logits=True, init_weights=False))
  loaded = torch_to_flax(state_dict, ARCH, reference=_param_shapes(), include_head=False)
  assert 'fc' not in loaded['params']
  for path in AUX_HEADS:
    assert path[-1] not in loaded['params'][path[0]] and 'fc1' in loaded['params'][path[0]]
  params = _param_shapes()['params']
  assert AUX_HEADS == (('aux1', 'fc2'), ('aux2', 'fc2'))
  for aux, layer in AUX_HEADS:
    assert params[aux][layer]['kernel'].shape == (1024, NUM_CLASSES)
  assert FAMILY.aux_loss_weights(ARCH) == (0.3, 0.3)


@pytest.mark.slow
def test_train_mode_outputs_running_stats_and_float64_gradients_with_aux_losses():
  """torch's train mode (dropout p=0): GoogLeNetOutputs(logits, aux_logits2, aux_logits1) is our
  (logits, (aux2, aux1)); BN running statistics after it; float64 gradients of
  CE(logits) + 0.3 CE(aux1) + 0.3 CE(aux2) w.r.t. every parameter. 96 px: the aux heads' 4x4
  adaptive pool reads a 6x6 map (overlapping bins)."""
  x, labels = _images(2, 96, seed=5), np.array([0, 3])
  tmodel = _no_dropout(_torch_model()).train()
  initial = state_dict_numpy(tmodel)
  with torch.no_grad():
    out_ref = tmodel(torch.from_numpy(x))
  assert type(out_ref).__name__ == 'GoogLeNetOutputs'
  stats_ref = state_dict_numpy(tmodel)
  model = GoogLeNet(num_classes=NUM_CLASSES, dropout_rate=0.0, dropout_aux_rate=0.0)
  variables = torch_to_flax(initial, ARCH)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=True, with_aux=True, mutable=['batch_stats']))
  (logits, auxes), updates = forward(variables, jnp.asarray(nchw_to_nhwc(x)))
  for what, ours, ref in [('logits', logits, out_ref.logits), ('aux2', auxes[0], out_ref.aux_logits2),
                          ('aux1', auxes[1], out_ref.aux_logits1)]:
    assert within(rel_err(ours, ref.numpy()), 'logits_rel', f'train-mode {what} {ARCH} (rel)'), what
  ours = flax_to_torch({'params': variables['params'], 'batch_stats': updates['batch_stats']}, ARCH)
  stat_names = [k for k in stats_ref if k.endswith(('running_mean', 'running_var'))]
  assert any(k.startswith('aux1.') for k in stat_names)
  worst = max(np.max(np.abs(ours[k] - stats_ref[k])) for k in stat_names)
  assert within(worst, 'running_stat_abs', f'BN running stats after a train forward {ARCH} (abs)')
  assert not np.allclose(initial['aux2.conv.bn.running_var'], ours['aux2.conv.bn.running_var'])

  tmodel = _no_dropout(_torch_model()).double().train()
  x64 = x.astype(np.float64)
  weights = FAMILY.aux_loss_weights(ARCH)
  out = tmodel(torch.from_numpy(x64))
  ce = lambda logits: torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
  (ce(out.logits) + weights[0] * ce(out.aux_logits2) + weights[1] * ce(out.aux_logits1)).backward()
  grads_ref = {name: p.grad.numpy() for name, p in tmodel.named_parameters()}
  with jax.enable_x64(True):
    variables = torch_to_flax(state_dict_numpy(tmodel), ARCH)

    def loss_fn(params):
      (logits, auxes), _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                       jnp.asarray(nchw_to_nhwc(x64)), train=True, with_aux=True,
                                       mutable=['batch_stats'])
      ce = lambda z: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), jnp.asarray(labels)[:, None], axis=1))
      return ce(logits) + sum(w * ce(a) for w, a in zip(weights, auxes))

    grads = jax.device_get(jax.jit(jax.grad(loss_fn))(variables['params']))
  grads = flax_to_torch({'params': grads, 'batch_stats': variables['batch_stats']}, ARCH)
  assert grads_ref.keys() <= grads.keys() and any(k.startswith('aux1.fc2') for k in grads_ref)
  worst, name = max((rel_err(grads[k], grads_ref[k]), k) for k in grads_ref)
  assert within(worst, 'grad_rel_f64', f'gradients float64 with aux losses, worst tensor {ARCH} (rel)'), name


def test_outputs_by_mode_and_bfloat16_dtypes():
  """Only train mode with `with_aux` adds the aux outputs (torch's eval returns logits only); with
  bfloat16 compute, params, BN statistics and every output stay float32."""
  model = create_model(ARCH, NUM_CLASSES, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 32, 32, 3))
  shapes = _param_shapes()
  call = lambda **kw: jax.eval_shape(lambda v: model.apply(v, x, mutable=['batch_stats'],
                                                           rngs={'dropout': jax.random.PRNGKey(0)}, **kw), shapes)
  logits, _ = call(train=False, with_aux=True)
  assert logits.shape == (2, NUM_CLASSES)
  (logits, auxes), updates = call(train=True, with_aux=True)
  assert logits.shape == (2, NUM_CLASSES) and [a.shape for a in auxes] == [(2, NUM_CLASSES)] * 2
  assert {a.dtype for a in (logits,) + tuple(auxes)} == {jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((shapes, updates))} == {jnp.dtype(jnp.float32)}


def test_dropout_rates_scaling_and_off_in_eval():
  """Main dropout 0.2 before fc, the aux heads' 0.7 after fc1; kept values scaled by 1 / (1 - p)."""
  model = GoogLeNet(num_classes=NUM_CLASSES)
  assert model.bind({}).aux2.dropout.rate == 0.7   # aux2 is aux1's module with aux1's rate
  h = jnp.ones((256, 1024), jnp.float32)
  for layer, p in [(lambda m: m.dropout, 0.2), (lambda m: m.aux1.dropout, 0.7)]:
    draws = np.asarray(model.apply({}, h, rngs={'dropout': jax.random.PRNGKey(0)},
                                   method=lambda m, x: layer(m)(x, deterministic=False)))
    np.testing.assert_allclose(np.unique(draws), [0.0, 1 / (1 - p)], rtol=1e-6)
    # 262k draws: 4 standard deviations of the kept fraction is under 0.0036.
    assert abs((draws > 0).mean() - (1 - p)) < 0.0036, p
    off = model.apply({}, h, method=lambda m, x: layer(m)(x, deterministic=True))
    np.testing.assert_array_equal(off, h)
  # from_features draws from it in train mode only.
  params = {'fc': {'kernel': jnp.eye(1024, NUM_CLASSES), 'bias': jnp.zeros(NUM_CLASSES)}}
  features = jnp.ones((4, 1024))
  one, two = (model.apply({'params': params}, features, train=True, method='from_features',
                          rngs={'dropout': jax.random.PRNGKey(k)}) for k in (0, 1))
  assert not np.array_equal(one, two)
  np.testing.assert_array_equal(model.apply({'params': params}, features, method='from_features'),
                                np.ones((4, NUM_CLASSES)))


def test_stages_and_the_frozen_strategy():
  """Every top-level name has a stage (torchvision's top-level modules, aux1/aux2 their own, their
  last layers fc2 the head's, as PyTorch's recipe replaces and trains them); 'frozen' trains fc and
  the aux heads' fc2."""
  params = _param_shapes()['params']
  tree = stage_tree(params)
  assert set(tree) == set(FAMILY.stages) | {'fc'}
  assert tree['fc'] == 'head' and tree['inception4e'] == 'inception4e'
  assert tree['aux1'] == {'conv': 'aux1', 'fc1': 'aux1', 'fc2': 'head'}
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v is True] == ['fc']
  assert frozen['aux1'] == frozen['aux2'] == {'conv': False, 'fc1': False, 'fc2': True}
  partial = optim.trainable_mask(params, ['inception5b', 'aux2', 'head'])
  assert sorted(k for k, v in partial.items() if v is True) == ['fc', 'inception5b']
  assert partial['aux2'] == {'conv': True, 'fc1': True, 'fc2': True} and partial['aux1']['fc1'] is False
  with pytest.raises(ValueError, match='fast_backward'):
    create_model(ARCH, 2, fast_backward=True)
  with pytest.raises(ValueError, match='unknown arch'):
    FAMILY.create('googlenet_v2', 2, None, None)


@pytest.mark.slow
def test_a_new_task_replaces_and_trains_the_aux_heads_last_layers_as_pytorchs_recipe():
  """From a 1000-class file to 3 classes: fc and both aux heads' fc2 are fresh 3-way layers, the frozen
  strategy trains exactly those (PyTorch's recipe replaces and trains them), and a train step with
  the auxiliary losses moves them and nothing else."""
  from tl_jax.training import create_train_state, train_step
  from tl_jax.training.stages import initial_variables
  state_dict = state_dict_numpy(_torch_model(num_classes=1000))
  variables = initial_variables('googlenet', 3, seed=0, state_dict=state_dict)
  params = variables['params']
  assert params['fc']['kernel'].shape[-1] == 3
  for module, layer in AUX_HEADS:
    assert params[module][layer]['kernel'].shape[-1] == 3
  mask = optim.trainable_mask(params, 'frozen')
  assert mask['fc'] is True and mask['aux1']['fc2'] is True and mask['aux2']['fc2'] is True
  assert mask['aux1']['fc1'] is False and mask['inception5b'] is False
  model = create_model('googlenet', 3)
  tx = optim.make_optimizer(params, 'frozen', {'name': 'sgd', 'momentum': 0.9}, 0.01)
  state = create_train_state(model, variables, tx, jax.random.PRNGKey(0))
  batch = {'images': jnp.asarray(nchw_to_nhwc(_images(2, 64))), 'labels': jnp.asarray([0, 2]),
           'mask': jnp.ones(2, bool)}
  step = jax.jit(functools.partial(train_step, model=model, trainable=mask, bn_train=True, aux_weights=(0.3, 0.3)))
  new_state, sums = step(state, batch)
  assert np.isfinite(float(sums['loss_sum']))
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params,
                                 new_state.params)
  assert moved['fc']['kernel'] and moved['aux1']['fc2']['kernel'] and moved['aux2']['fc2']['kernel']
  assert not moved['aux1']['fc1']['kernel'] and not moved['inception5b']['branch1']['conv']['kernel']
