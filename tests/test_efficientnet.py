"""Flax EfficientNets (B0..B7, V2 S/M/L) against torchvision's, computed in the test on the same weights and inputs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, guess_arch, name_table, torch_to_flax
from tl_jax.models import create_model, stage_of, stage_tree
from tl_jax.models.efficientnet import ARCHS, FAMILY, EfficientNet, StochasticDepth

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES = 5
DEFAULT_TIER = ('efficientnet_b0',)
CHEAP_ROUND_TRIP = ('efficientnet_b0', 'efficientnet_v2_s')


def _tier(archs, cheap):
  return [a if a in cheap else pytest.param(a, marks=pytest.mark.slow) for a in archs]


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _native_size(arch):
  return torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]


def _no_dropout(tmodel):
  """Dropout and stochastic-depth draws cannot equal torch's; train-mode parity runs both with p=0."""
  for module in tmodel.modules():
    if isinstance(module, (torch.nn.Dropout, torchvision.ops.StochasticDepth)):
      module.p = 0.0
  return tmodel


@functools.lru_cache(maxsize=4)
def _param_shapes(arch, num_classes=NUM_CLASSES):
  """{'params', 'batch_stats'} shapes of `init` (traced, not compiled)."""
  model = create_model(arch, num_classes)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))


def _eval_parity(arch, size, batch):
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  x = _images(batch, size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  del tmodel
  logits = jax.jit(create_model(arch, NUM_CLASSES).apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert logits.dtype == jnp.float32 and logits.shape == ref.shape
  assert within(rel_err(logits, ref), 'logits_rel', f'eval logits {arch} {size}px (rel)')


@pytest.mark.parametrize('arch', _tier(ARCHS, DEFAULT_TIER))
def test_eval_logits_at_the_native_crop_size(arch):
  """Random weights, randomised BN statistics, each arch at its weights' crop size (224 .. 600 px)."""
  _eval_parity(arch, _native_size(arch), 2 if arch in DEFAULT_TIER else 1)


@pytest.mark.slow
@pytest.mark.parametrize('arch, size', [('efficientnet_b0', 97), ('efficientnet_v2_s', 161)])
def test_eval_logits_at_an_odd_size(arch, size):
  """Odd sizes through every stride-2 conv: torch's symmetric padding, where 'SAME' would pad one side."""
  _eval_parity(arch, size, 1)


@pytest.mark.parametrize('arch', _tier(ARCHS, CHEAP_ROUND_TRIP))
def test_conversion_round_trip_and_torchvision_hyperparameters(arch):
  """torch -> Flax -> torch is bit-identical and loads strictly; every BN's eps/momentum, the classifier's
  dropout and every block's stochastic-depth rate are torchvision's for the arch."""
  tmodel = random_torchvision_model(arch, NUM_CLASSES)
  state_dict = state_dict_numpy(tmodel)
  variables = torch_to_flax(state_dict, arch, reference=_param_shapes(arch))
  back = flax_to_torch(variables, arch)
  assert sorted(back) == sorted(state_dict)
  for name, value in state_dict.items():
    if name.endswith('num_batches_tracked'):
      continue
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  assert [e.torch_name for e in name_table(arch)] == [k for k in state_dict if not k.endswith('num_batches_tracked')]

  spec = ARCHS[arch]
  assert {(m.eps, m.momentum) for m in tmodel.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {
      (spec.bn_epsilon, spec.bn_momentum)}
  model = create_model(arch, NUM_CLASSES)
  assert model.dropout_rate == tmodel.classifier[0].p
  blocks = [b for stage in model.bind({}).stages for b in stage]
  torch_rates = [m.stochastic_depth.p for m in tmodel.modules() if hasattr(m, 'stochastic_depth')]
  assert [b.stochastic_depth_rate for b in blocks] == torch_rates   # exactly: the same float arithmetic
  assert FAMILY.num_features(arch) == tmodel.classifier[1].in_features


def _names_only(arch):
  """A state dict with `arch`'s names (torchvision's: the round-trip test checks the table) and no data."""
  return {e.torch_name: np.zeros(1, np.float32) for e in name_table(arch)}


def test_conversion_errors_name_the_arch_or_list_the_names():
  with pytest.raises(ConversionError, match='this looks like a efficientnet_b1 state dict'):
    torch_to_flax(_names_only('efficientnet_b1'), 'efficientnet_b0')
  v2_s = _names_only('efficientnet_v2_s')
  with pytest.raises(ConversionError, match='this looks like a efficientnet_v2_s state dict'):
    torch_to_flax(v2_s, 'efficientnet_b0')
  b0 = state_dict_numpy(torchvision.models.efficientnet_b0(num_classes=7))
  assert guess_arch(b0) == 'efficientnet_b0'
  missing = {k: v for k, v in b0.items() if k != 'features.3.1.block.2.fc1.bias'}
  with pytest.raises(ConversionError, match=r'missing \(1\): features\.3\.1\.block\.2\.fc1\.bias'):
    torch_to_flax(missing, 'efficientnet_b0')
  extra = {**b0, 'features.9.0.weight': np.zeros((1, 1, 1, 1), np.float32)}
  with pytest.raises(ConversionError, match=r'unexpected \(1\): features\.9\.0\.weight'):
    torch_to_flax(extra, 'efficientnet_b0')
  with pytest.raises(ConversionError, match=r'(?s)wrong shape .*classifier\.1\.weight: file has \(7, 1280\), '
                                            r'efficientnet_b0 needs \(5, 1280\)'):
    torch_to_flax(b0, 'efficientnet_b0', reference=_param_shapes('efficientnet_b0'))


@pytest.mark.slow
def test_b1_and_b2_state_dicts_differ_only_in_shapes():
  """B1 and B2 have the same depth, so the same tensor names: a B2 file given as B1 fails on its shapes."""
  b2 = state_dict_numpy(torchvision.models.efficientnet_b2(num_classes=NUM_CLASSES))
  assert {e.torch_name for e in name_table('efficientnet_b1')} == {e.torch_name for e in name_table('efficientnet_b2')}
  with pytest.raises(ConversionError, match=r'(?s)wrong shape .*classifier\.1\.weight: file has \(5, 1408\), '
                                            r'efficientnet_b1 needs \(5, 1280\)'):
    torch_to_flax(b2, 'efficientnet_b1', reference=_param_shapes('efficientnet_b1'))


@pytest.mark.slow
def test_guess_arch_tells_b2_from_b1():
  b2 = state_dict_numpy(torchvision.models.efficientnet_b2(num_classes=NUM_CLASSES))
  assert guess_arch(b2) == 'efficientnet_b2'


def _torch_train_forward(tmodel, x):
  with torch.no_grad():
    return tmodel(torch.from_numpy(x)).numpy()


@pytest.mark.slow
def test_train_mode_forward_with_padded_rows_updates_running_stats_like_torch():
  """b0 in train mode (dropout and stochastic depth p=0) on 4 images, ours with 2 masked padding rows more."""
  arch = 'efficientnet_b0'
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).train()
  before = state_dict_numpy(tmodel)
  x = _images(4, 64)
  ref = _torch_train_forward(tmodel, x)
  padded = np.concatenate([x, 10 * _images(2, 64, seed=9)])
  mask = jnp.asarray([True] * 4 + [False] * 2)
  model = EfficientNet(arch, NUM_CLASSES, dropout_rate=0.0, stochastic_depth_rate=0.0)
  variables = torch_to_flax(before, arch)
  out, updates = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask_b=m, mutable=['batch_stats']))(
      variables, jnp.asarray(nchw_to_nhwc(padded)), mask)
  assert within(rel_err(out[:4], ref), 'logits_rel', f'train-mode logits {arch} (rel)')
  ours = flax_to_torch({'params': variables['params'], 'batch_stats': updates['batch_stats']}, arch)
  stats = [k for k in ours if k.endswith(('running_mean', 'running_var'))]
  after = tmodel.state_dict()
  worst = max(np.max(np.abs(ours[k] - after[k].numpy())) for k in stats)
  assert within(worst, 'running_stat_abs', f'BN running stats after a train forward {arch} (abs)')
  assert not np.allclose(before['features.8.1.running_var'], ours['features.8.1.running_var'])


def _grad_err(grads, grads_ref, name, arch):
  """Relative error; a block's project BN feeds (through identities only) a conv and a train-mode BN, which
  removes any per-channel constant: its bias has an exactly zero gradient, rounding noise in both frameworks,
  measured against the same BN's weight gradient."""
  project_biases = {f'features.{s}.{j}.block.{i}.1.bias'
                    for s, blocks in enumerate(ARCHS[arch].blocks, start=1) for j, block in enumerate(blocks)
                    for i, kind in enumerate(block.layers) if kind == 'project'}
  if name in project_biases:
    scale = np.max(np.abs(grads_ref[name.replace('.bias', '.weight')]))
    return float(np.max(np.abs(grads[name] - grads_ref[name])) / scale)
  return rel_err(grads[name], grads_ref[name])


@pytest.mark.slow
def test_cross_entropy_gradients_match_torch_in_float64():
  arch = 'efficientnet_b0'
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).double().train()
  x, labels = _images(4, 64, seed=5, dtype='float64'), np.array([0, 3, 4, 2])
  loss_ref = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(labels))
  loss_ref.backward()
  grads_ref = {name: p.grad.numpy().copy() for name, p in tmodel.named_parameters()}
  state_dict = state_dict_numpy(tmodel)
  del tmodel
  model = EfficientNet(arch, NUM_CLASSES, dropout_rate=0.0, stochastic_depth_rate=0.0)
  with jax.enable_x64(True):
    variables = torch_to_flax(state_dict, arch)

    def loss_fn(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats'])
      assert logits.dtype == jnp.float64
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))

    loss, grads = jax.device_get(jax.jit(jax.value_and_grad(loss_fn))(variables['params']))
  grads = flax_to_torch({'params': grads, 'batch_stats': variables['batch_stats']}, arch)
  worst, name = max((_grad_err(grads, grads_ref, k, arch), k) for k in grads_ref)
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {arch} (rel)'), (name, worst)
  assert abs(float(loss) - loss_ref.item()) <= TOL['train_loss_abs_f64']


@pytest.mark.slow
def test_stochastic_depth_is_on_in_train_even_with_eval_batch_norm():
  """`train` alone drives stochastic depth and dropout (bn_train=False keeps BN in eval mode)."""
  arch = 'efficientnet_b0'
  model = EfficientNet(arch, NUM_CLASSES, dropout_rate=0.0)
  variables = torch_to_flax(state_dict_numpy(random_torchvision_model(arch, NUM_CLASSES)), arch)
  x = jnp.asarray(nchw_to_nhwc(_images(2, 64)))
  forward = jax.jit(lambda v, x, key, train: model.apply(v, x, train=train, bn_train=False, rngs={'dropout': key}),
                    static_argnums=3)
  eval_logits = model.apply(variables, x)
  draws = [forward(variables, x, jax.random.PRNGKey(k), True) for k in range(2)]
  assert not np.allclose(draws[0], draws[1])
  np.testing.assert_array_equal(forward(variables, x, jax.random.PRNGKey(0), True), draws[0])
  np.testing.assert_allclose(forward(variables, x, jax.random.PRNGKey(0), False), eval_logits, rtol=1e-5, atol=1e-5)


def test_stochastic_depth_drops_whole_samples_scales_the_rest_and_is_off_in_eval():
  rate, rows = 0.25, 20000
  x = jnp.ones((rows, 2, 2, 3), jnp.float32)
  draw = jax.jit(lambda key: StochasticDepth(rate).apply({}, x, False, rngs={'dropout': key}))
  first, second = np.asarray(draw(jax.random.PRNGKey(0))), np.asarray(draw(jax.random.PRNGKey(1)))
  per_row = first.reshape(rows, -1)
  assert np.all(per_row == per_row[:, :1])                       # 'row' mode: a sample is kept or dropped whole
  assert set(np.unique(first)) == {0.0, np.float32(1.0) / np.float32(1 - rate)}
  assert abs((per_row[:, 0] > 0).mean() - (1 - rate)) < 0.013     # 4 standard deviations of 20000 draws
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(StochasticDepth(rate).apply({}, x, True), x)
  np.testing.assert_array_equal(StochasticDepth(0.0).apply({}, x, False), x)


def test_classifier_dropout_keeps_four_fifths_scales_by_five_quarters_and_is_off_in_eval():
  model = create_model('efficientnet_b0', NUM_CLASSES)
  assert model.dropout_rate == 0.2
  h = jnp.ones((64, 1280), jnp.float32)
  draw = jax.jit(lambda key: model.apply({}, h, rngs={'dropout': key},
                                         method=lambda m, x: m.dropout(x, deterministic=False)))
  draws = np.stack([np.asarray(draw(jax.random.PRNGKey(k))) for k in range(4)])
  assert set(np.unique(draws)) == {0.0, np.float32(1.0) / np.float32(0.8)}
  assert abs((draws > 0).mean() - 0.8) < 0.003    # 327680 draws: 4 standard deviations is 0.0028
  assert not np.array_equal(draws[0], draws[1])
  off = model.apply({}, h, method=lambda m, x: m.dropout(x, deterministic=True))
  np.testing.assert_array_equal(off, h)


@pytest.mark.parametrize('arch, stages', [('efficientnet_b0', 9), ('efficientnet_v2_s', 8)])
def test_stages_name_torchs_features_children_and_head(arch, stages):
  params = _param_shapes(arch)['params']
  tree = stage_tree(params)
  assert sorted(set(tree.values())) == sorted([f'features.{i}' for i in range(stages)] + ['head'])
  assert all(tree[k] == f'features.{k.split("_")[1]}' for k in params if k != 'classifier_1')
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['classifier_1']
  last = f'features.{stages - 1}'
  partial = optim.trainable_mask(params, [last, 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['classifier_1', f'features_{stages - 1}']
  stage3 = optim.trainable_mask(params, ['features.3'])
  assert sorted(k for k, v in stage3.items() if v) == sorted(k for k in params if k.startswith('features_3_'))
  features = optim.trainable_mask(params, ['features'])
  assert all(features[k] == (k != 'classifier_1') for k in params)
  assert all(optim.trainable_mask(params, 'finetune').values())


def test_stage_of_knows_only_this_familys_names():
  assert FAMILY.stage_of('features_0') == 'features.0' and FAMILY.stage_of('features_8') == 'features.8'
  assert FAMILY.stage_of('features_6_14') == 'features.6' and FAMILY.stage_of('classifier_1') == 'head'
  assert stage_of('features_3_1', 'efficientnet_b0') == 'features.3'
  for foreign in ('fc', 'layer1_0', 'conv1', 'block1_conv1', 'classifier_0', 'classifier_6', 'features_3',
                  'features_9', 'features_0_0', 'features_8_0', 'features_x_1', 'features'):
    assert FAMILY.stage_of(foreign) is None, foreign


def test_create_model_refuses_unknown_archs_and_fast_backward():
  with pytest.raises(ValueError, match='unknown arch'):
    create_model('efficientnet_b8', 3)
  with pytest.raises(ValueError, match='fast_backward'):
    create_model('efficientnet_b0', 3, fast_backward=True)
  model = create_model('efficientnet_v2_l', 3, dtype=jnp.bfloat16)
  assert model.dropout_rate == 0.4 and model.dtype == jnp.bfloat16 and isinstance(model, nn.Module)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits():
  arch = 'efficientnet_b0'
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  x = _images(2, 224)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  logits = jax.jit(create_model(arch, NUM_CLASSES, dtype=jnp.bfloat16).apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert logits.dtype == jnp.float32
  assert within(rel_err(logits, ref), 'bf16_logits_rel', f'bfloat16 eval logits {arch} (rel)')
