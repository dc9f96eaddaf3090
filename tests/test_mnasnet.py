"""Flax MNASNets against torchvision's, computed in the test on the same weights and inputs."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, name_table, torch_to_flax
from tl_jax.models import create_model, stage_tree
from tl_jax.models import mnasnet

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES = 5
ARCHS = tuple(mnasnet.ARCHS)


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


def _loadable(state_dict):
  """The state dict with torchvision's MNASNet version (its _load_from_state_dict refuses a dict
  without one; version 2 is the current layout, which the name table follows)."""
  tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items())
  tensors._metadata = {'': {'version': 2}}
  return tensors


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


@pytest.mark.parametrize('arch, batch', [('mnasnet0_5', 2)] + [pytest.param(a, 1, marks=pytest.mark.slow)
                                                               for a in ARCHS[1:]])
def test_eval_logits_at_the_native_size(arch, batch):
  _eval_logits_check(arch, _native_size(arch), batch)


@pytest.mark.slow
def test_eval_logits_at_an_odd_size():
  """97 px: every stride-2 conv sees an odd input and floors as torch does."""
  _eval_logits_check('mnasnet1_0', 97, 2)


def test_depths_are_torchvisions():
  from torchvision.models.mnasnet import _get_depths
  for arch, alpha in mnasnet.ARCHS.items():
    assert mnasnet.depths(arch) == _get_depths(alpha), arch


def test_classifier_is_torchs_and_dropout_is_wired_in():
  arch = 'mnasnet0_5'
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  model = create_model(arch, NUM_CLASSES)
  feats = np.random.default_rng(0).standard_normal((4, mnasnet.NUM_FEATURES)).astype(np.float32)
  with torch.no_grad():
    ref = tmodel.classifier(torch.from_numpy(feats)).numpy()
  head = {'params': {mnasnet.HEAD: variables['params'][mnasnet.HEAD]}}
  from_features = lambda train, key: model.apply(head, jnp.asarray(feats), train, method='from_features',
                                                 rngs={'dropout': jax.random.PRNGKey(key)})
  assert within(rel_err(from_features(False, 0), ref), 'logits_rel', f'classifier eval {arch} (rel)')
  assert not np.allclose(from_features(True, 0), from_features(True, 1))
  np.testing.assert_array_equal(from_features(False, 0), from_features(False, 1))


def test_dropout_drops_a_fifth_scales_by_one_over_0_8_and_is_off_in_eval():
  model = create_model('mnasnet0_5', 3)
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
  model = create_model(arch, NUM_CLASSES)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  variables = torch_to_flax(state_dict, arch, reference=shapes)
  assert jax.tree.structure(variables) == jax.tree.structure(
      {'params': shapes['params'], 'batch_stats': shapes['batch_stats']})
  back = flax_to_torch(variables, arch)
  assert sorted(back) == sorted(state_dict)
  for name, value in state_dict.items():
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  fresh = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
  fresh.load_state_dict(_loadable(back), strict=True)


def test_conversion_names_another_family_and_lists_bad_keys_and_shapes():
  small = state_dict_numpy(random_torchvision_model('mnasnet0_5', NUM_CLASSES))
  with pytest.raises(ConversionError, match='this looks like a mnasnet0_5 state dict'):
    torch_to_flax(small, 'mobilenet_v2')
  v2 = state_dict_numpy(random_torchvision_model('mobilenet_v2', NUM_CLASSES))
  with pytest.raises(ConversionError, match='this looks like a mobilenet_v2 state dict'):
    torch_to_flax(v2, 'mnasnet1_0')
  broken = dict(small)
  del broken['layers.9.1.layers.4.running_var']
  broken['layers.9.1.layers.5.weight'] = small['layers.9.1.layers.4.weight']
  with pytest.raises(ConversionError, match=r'missing \(1\): layers\.9\.1\.layers\.4\.running_var') as error:
    torch_to_flax(broken, 'mnasnet0_5')
  assert 'unexpected (1): layers.9.1.layers.5.weight' in str(error.value)
  # The four widths share every name: only the shapes tell them apart.
  model = create_model('mnasnet1_0', NUM_CLASSES)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  with pytest.raises(ConversionError, match=r'layers\.0\.weight: file has \(16, 3, 3, 3\), mnasnet1_0 needs '
                                            r'\(32, 3, 3, 3\)'):
    torch_to_flax(small, 'mnasnet1_0', reference=shapes)


def test_stages_cover_every_module_and_frozen_trains_only_the_head():
  model = create_model('mnasnet0_5', 2)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))['params']
  tree = stage_tree(params)
  assert sorted(set(tree.values())) == sorted(mnasnet.STAGES + ('head',))
  assert tree['layers_8'] == 'layers.8' and tree['classifier_1'] == 'head'
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['classifier_1']
  partial = optim.trainable_mask(params, ['layers.13', 'layers.14', 'layers.15', 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['classifier_1', 'layers_13', 'layers_14', 'layers_15']
  features = optim.trainable_mask(params, ['features'])
  assert all(features[k] == k.startswith('layers_') for k in params)


def test_create_model_refuses_unknown_archs_and_fast_backward():
  with pytest.raises(ValueError, match='unknown arch'):
    mnasnet.create_model('mnasnet2_0', 2)
  with pytest.raises(ValueError, match='fast_backward'):
    create_model('mnasnet0_5', 2, fast_backward=True)


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
def test_train_mode_forward_with_a_padded_row_updates_running_stats_like_torch():
  """Train-mode BatchNorm (momentum 1 - 0.9997) on 3 images plus one padded row (mask 0) against
  torch on the 3 images."""
  arch = 'mnasnet0_5'
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).train()
  before = state_dict_numpy(tmodel)
  x = _images(3, 64)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = create_model(arch, NUM_CLASSES).clone(dropout_rate=0.0)
  variables = torch_to_flax(before, arch)
  padded = np.concatenate([x, 100 * _images(1, 64, seed=9)])
  out, updates = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask_b=m, mutable=['batch_stats']))(
      variables, jnp.asarray(nchw_to_nhwc(padded)), jnp.asarray([1, 1, 1, 0]))
  assert within(rel_err(out[:3], ref), 'logits_rel', f'train-mode logits {arch} (rel)')
  ours = _running_stats(flax_to_torch({'params': variables['params'], 'batch_stats': updates['batch_stats']}, arch))
  theirs = _running_stats(state_dict_numpy(tmodel))
  worst = max(np.max(np.abs(ours[k] - theirs[k])) for k in theirs)
  assert within(worst, 'running_stat_abs', f'BN running stats after a train forward {arch} (abs)')
  # Torch's momentum 3e-4 moves them little; a momentum of 0.1 would be off by ~300x this.
  moved = max(np.max(np.abs(theirs[k] - before[k])) for k in theirs)
  assert moved > 10 * TOL['running_stat_abs'], moved


@pytest.mark.slow
def test_cross_entropy_gradients_match_torch_in_float64():
  arch = 'mnasnet0_5'
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
def test_an_exported_pth_loads_into_torchvision_as_saved(tmp_path):
  """export_torch_weights writes MNASNet's module version, so torch.load + load_state_dict(strict) takes
  the file as it is (torchvision's MNASNet refuses a state dict without it)."""
  from tl_jax import export
  tmodel = random_torchvision_model('mnasnet0_5', NUM_CLASSES).eval()
  src = tmp_path / 'm.pth'
  torch.save(_loadable(state_dict_numpy(tmodel)), src)
  export.import_torch_weights(src, tmp_path / 'ckpt', arch='mnasnet0_5')
  export.export_torch_weights(tmp_path / 'ckpt', tmp_path / 'back.pth')
  loaded = torch.load(tmp_path / 'back.pth')
  fresh = __import__('torchvision').models.mnasnet0_5(num_classes=NUM_CLASSES)
  fresh.load_state_dict(loaded, strict=True)
  for name, value in tmodel.state_dict().items():
    assert torch.equal(fresh.state_dict()[name], value), name
