"""Flax MobileNetV2 / V3 against torchvision's, computed in the test on the same weights and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, name_table, torch_to_flax
from tl_jax.models import create_model, num_features, stage_tree
from tl_jax.models import mobilenet

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES = 5
ARCHS = ('mobilenet_v2', 'mobilenet_v3_small', 'mobilenet_v3_large')


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _native_size(arch):
  return torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]


def _no_dropout(tmodel):
  """Dropout masks cannot equal torch's; train-mode parity runs both with p=0."""
  for module in tmodel.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  return tmodel


def _eval_logits_check(arch, size, batch):
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  model = create_model(arch, NUM_CLASSES)
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  x = _images(batch, size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  ours = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert ours.dtype == jnp.float32 and ours.shape == ref.shape
  assert within(rel_err(ours, ref), 'logits_rel', f'eval logits {arch} {size}px (rel)')


@pytest.mark.parametrize('arch, batch', [('mobilenet_v3_small', 2), ('mobilenet_v2', 2),
                                         pytest.param('mobilenet_v3_large', 1, marks=pytest.mark.slow)])
def test_eval_logits_at_the_native_size(arch, batch):
  _eval_logits_check(arch, _native_size(arch), batch)


@pytest.mark.slow
def test_eval_logits_at_an_odd_size():
  """97 px: every stride-2 conv sees an odd input and floors as torch does."""
  _eval_logits_check('mobilenet_v3_small', 97, 2)


def test_activations_and_their_float64_gradients_are_torchs():
  """Values, and float64 gradients also at the kinks (-3, 0, 3, 6), where each has torch's convention."""
  x = np.concatenate([np.linspace(-7, 7, 1401), [-3, 3, 0, 6, -6]])
  for ours, theirs in [(mobilenet.hardswish, torch.nn.functional.hardswish),
                       (mobilenet.hardsigmoid, torch.nn.functional.hardsigmoid),
                       (mobilenet.relu6, torch.nn.functional.relu6)]:
    x32 = x.astype(np.float32)
    assert within(rel_err(ours(jnp.asarray(x32)), theirs(torch.from_numpy(x32)).numpy()), 'activation_rel',
                  f'{theirs.__name__} (rel)')
    t = torch.from_numpy(x).requires_grad_()
    theirs(t).sum().backward()
    with jax.enable_x64(True):
      grad = jax.vmap(jax.grad(ours))(jnp.asarray(x))
    assert within(rel_err(grad, t.grad.numpy()), 'grad_rel_f64', f'{theirs.__name__} gradient float64 (rel)')


def test_make_divisible_is_torchvisions():
  from torchvision.models._utils import _make_divisible
  for value in [3, 7.5, 16, 18, 22, 60, 72 // 4, 120 // 4, 240 // 4, 576 // 4, 83, 84, 1000.3]:
    assert mobilenet.make_divisible(value, 8) == _make_divisible(value, 8), value


@pytest.mark.parametrize('arch', ['mobilenet_v2', 'mobilenet_v3_small',
                                  pytest.param('mobilenet_v3_large', marks=pytest.mark.slow)])
def test_classifier_is_torchs_and_dropout_is_wired_in(arch):
  """from_features against torch's classifier on the same pooled features (eval), and train mode
  draws dropout masks from the 'dropout' rng."""
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  model = create_model(arch, NUM_CLASSES)
  feats = np.random.default_rng(0).standard_normal((4, num_features(arch))).astype(np.float32)
  with torch.no_grad():
    ref = tmodel.classifier(torch.from_numpy(feats)).numpy()
  head = {'params': {k: v for k, v in variables['params'].items() if k.startswith('classifier')}}
  from_features = lambda train, key: model.apply(head, jnp.asarray(feats), train, method='from_features',
                                                 rngs={'dropout': jax.random.PRNGKey(key)})
  assert within(rel_err(from_features(False, 0), ref), 'logits_rel', f'classifier eval {arch} (rel)')
  assert not np.allclose(from_features(True, 0), from_features(True, 1))
  np.testing.assert_array_equal(from_features(False, 0), from_features(False, 1))


@pytest.mark.parametrize('arch', ['mobilenet_v2', 'mobilenet_v3_small'])
def test_dropout_drops_a_fifth_scales_by_one_over_0_8_and_is_off_in_eval(arch):
  model = create_model(arch, 3)
  h = jnp.ones((64, 1280), jnp.float32)
  draw = jax.jit(lambda key: model.apply({}, h, rngs={'dropout': key},
                                         method=lambda m, x: m.dropout(x, deterministic=False)))
  draws = np.stack([np.asarray(draw(jax.random.PRNGKey(k))) for k in range(8)])
  np.testing.assert_allclose(np.unique(draws), [0.0, 1 / 0.8], rtol=1e-7)   # kept values scaled by 1 / (1 - p)
  assert abs((draws > 0).mean() - 0.8) < 0.002    # 655k draws: 4 standard deviations is 0.0020
  assert not np.array_equal(draws[0], draws[1])
  off = model.apply({}, h, method=lambda m, x: m.dropout(x, deterministic=True))
  np.testing.assert_array_equal(off, h)


@pytest.mark.parametrize('arch', ARCHS)
def test_round_trip_is_identical_and_loads_strictly(arch):
  tmodel = random_torchvision_model(arch, NUM_CLASSES)
  state_dict = state_dict_numpy(tmodel)
  back = flax_to_torch(torch_to_flax(state_dict, arch), arch)
  assert sorted(back) == sorted(state_dict)
  for name, value in state_dict.items():
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  fresh = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  # The convolutional base alone: no classifier layer (V3's classifier.0 is computed from the features).
  base = torch_to_flax(state_dict, arch, base_only=True)
  assert not [k for k in base['params'] if k.startswith('classifier')]


def test_the_flax_tree_is_the_name_tables():
  for arch in ARCHS:
    model = create_model(arch, NUM_CLASSES)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    state_dict = state_dict_numpy(random_torchvision_model(arch, NUM_CLASSES))
    converted = torch_to_flax(state_dict, arch, reference=shapes)
    assert jax.tree.structure(converted) == jax.tree.structure(
        {'params': shapes['params'], 'batch_stats': shapes['batch_stats']}), arch


def test_conversion_names_the_arch_of_another_mobilenet_and_lists_bad_keys():
  small = state_dict_numpy(random_torchvision_model('mobilenet_v3_small', NUM_CLASSES))
  with pytest.raises(ConversionError, match='this looks like a mobilenet_v3_small state dict'):
    torch_to_flax(small, 'mobilenet_v3_large')
  v2 = state_dict_numpy(random_torchvision_model('mobilenet_v2', NUM_CLASSES))
  with pytest.raises(ConversionError, match='this looks like a mobilenet_v2 state dict'):
    torch_to_flax(v2, 'mobilenet_v3_small')
  broken = dict(small)
  del broken['features.4.block.2.fc1.bias']
  broken['features.4.block.2.fc3.weight'] = small['features.4.block.2.fc2.weight']
  with pytest.raises(ConversionError, match=r'missing \(1\): features\.4\.block\.2\.fc1\.bias') as error:
    torch_to_flax(broken, 'mobilenet_v3_small')
  assert 'unexpected (1): features.4.block.2.fc3.weight' in str(error.value)


@pytest.mark.parametrize('arch', ['mobilenet_v2', 'mobilenet_v3_small'])
def test_stages_cover_every_module_and_frozen_trains_only_the_head(arch):
  model = create_model(arch, 2)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))['params']
  tree = stage_tree(params)
  family = mobilenet.FAMILY_V2 if arch == 'mobilenet_v2' else mobilenet.FAMILY_V3
  assert {tree[k] for k in params} == set(family.stages_of(arch) + ('head',))
  assert tree[family.head] == 'head'
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == [family.head]
  features = optim.trainable_mask(params, ['features'])
  assert all(features[k] == k.startswith('features_') for k in params)
  last = max((k for k in params if k.startswith('features_')), key=lambda k: int(k.split('_')[1]))
  partial = optim.trainable_mask(params, [tree[last], 'head'])
  assert sorted(k for k, v in partial.items() if v) == sorted([last, family.head])
  if arch != 'mobilenet_v2':
    classifier = optim.trainable_mask(params, ['classifier', 'head'])
    assert sorted(k for k, v in classifier.items() if v) == ['classifier_0', 'classifier_3']


def test_create_model_refuses_unknown_archs_and_fast_backward():
  with pytest.raises(ValueError, match='unknown arch'):
    mobilenet.create_v3('mobilenet_v3_medium', 2)
  with pytest.raises(ValueError, match='fast_backward'):
    create_model('mobilenet_v2', 2, fast_backward=True)
  with pytest.raises(ValueError, match='fast_backward'):
    create_model('mobilenet_v3_small', 2, fast_backward=True)


def _grad_err(grads, grads_ref, name):
  """Relative error; a BatchNorm bias has an exactly zero gradient where its output reaches the loss
  only through 1x1 convs into train-mode BatchNorms (which remove any per-channel shift), so both
  frameworks return rounding noise there: measure a bias against its BatchNorm weight's gradient too."""
  weight = name[:-len('bias')] + 'weight'
  if name.endswith('.bias') and weight in grads_ref and grads_ref[weight].ndim == 1:
    scale = max(np.max(np.abs(grads_ref[name])), np.max(np.abs(grads_ref[weight])))
    return float(np.max(np.abs(grads[name] - grads_ref[name])) / scale)
  return rel_err(grads[name], grads_ref[name])


def _running_stats(state_dict):
  return {k: v for k, v in state_dict.items() if k.endswith(('running_mean', 'running_var'))}


@pytest.mark.slow
@pytest.mark.parametrize('arch, size', [('mobilenet_v2', 128), ('mobilenet_v3_small', 64)])
def test_train_mode_forward_with_a_padded_row_updates_running_stats_like_torch(arch, size):
  """Train-mode BatchNorm on 3 images plus one padded row (mask 0) against torch on the 3 images.

  MobileNetV2 at 128 px: at 64 px its last blocks normalise over 12 values per channel, which
  amplifies float32 rounding until torch's own float32 running variances are ~2e-5 off its
  float64 ones (measured), above the tolerance; 128 px gives them 48."""
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).train()
  before = state_dict_numpy(tmodel)
  x = _images(3, size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = create_model(arch, NUM_CLASSES).clone(dropout_rate=0.0)
  variables = torch_to_flax(before, arch)
  padded = np.concatenate([x, 100 * _images(1, size, seed=9)])
  out, updates = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask_b=m, mutable=['batch_stats']))(
      variables, jnp.asarray(nchw_to_nhwc(padded)), jnp.asarray([1, 1, 1, 0]))
  assert within(rel_err(out[:3], ref), 'logits_rel', f'train-mode logits {arch} (rel)')
  ours = _running_stats(flax_to_torch({'params': variables['params'], 'batch_stats': updates['batch_stats']}, arch))
  theirs = _running_stats(state_dict_numpy(tmodel))
  worst = max(np.max(np.abs(ours[k] - theirs[k])) for k in theirs)
  assert within(worst, 'running_stat_abs', f'BN running stats after a train forward {arch} (abs)')
  moved = max(np.max(np.abs(theirs[k] - before[k])) for k in theirs)
  assert moved > 100 * TOL['running_stat_abs']   # the check above could not pass by nothing moving


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['mobilenet_v2', 'mobilenet_v3_small'])
def test_cross_entropy_gradients_match_torch_in_float64(arch):
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).double().train()
  x, labels = _images(4, 64, seed=5, dtype='float64'), np.array([0, 3, 4, 2])
  loss_ref = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(labels))
  loss_ref.backward()
  grads_ref = {name: p.grad.numpy().copy() for name, p in tmodel.named_parameters()}
  state_dict = state_dict_numpy(tmodel)
  model = create_model(arch, NUM_CLASSES).clone(dropout_rate=0.0)
  with jax.enable_x64(True):
    variables = torch_to_flax(state_dict, arch)

    def loss_fn(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))

    loss, grads = jax.device_get(jax.jit(jax.value_and_grad(loss_fn))(variables['params']))
    grads = flax_to_torch({'params': grads, 'batch_stats': variables['batch_stats']}, arch)
  assert abs(float(loss) - loss_ref.item()) <= TOL['train_loss_abs_f64']
  assert sorted(grads_ref) == sorted(e.torch_name for e in name_table(arch) if e.collection == 'params')
  worst, name = max((_grad_err(grads, grads_ref, k), k) for k in grads_ref)
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {arch} (rel)'), (name, worst)


@pytest.mark.slow
def test_bfloat16_compute_stays_close_and_returns_float32():
  arch = 'mobilenet_v3_small'
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  x = _images(2, 64)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  out = jax.jit(lambda v, x: create_model(arch, NUM_CLASSES, dtype=jnp.bfloat16).apply(v, x))(
      variables, jnp.asarray(nchw_to_nhwc(x)))
  assert out.dtype == jnp.float32
  assert within(rel_err(out, ref), 'bf16_logits_rel', f'bfloat16 logits {arch} (rel)')
