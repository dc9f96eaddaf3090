"""Flax SqueezeNets against torchvision's, computed in the test on the same weights and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, torch_to_flax
from tl_jax.models import create_model, stage_tree
from tl_jax.models.squeezenet import ARCHS, FAMILY, SqueezeNet, ceil_mode_padding

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES = 5
# The default tier compiles unoptimised: the same computation, compiled in a fraction of the time.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _native_size(arch):
  return torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]


def _no_dropout(tmodel):
  """Dropout masks cannot equal torch's; parity of train-mode passes runs both with p=0."""
  for module in tmodel.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  return tmodel


def _shapes(model, size):
  """The model's own variable tree (shapes only, nothing compiled)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return jax.tree_util.tree_map(lambda a: a.shape, {k: v for k, v in variables.items() if v})


def test_ceil_mode_padding_gives_torchs_output_sizes():
  for size in range(3, 60):
    x = torch.zeros(1, 1, size, size)
    want = torch.nn.functional.max_pool2d(x, 3, 2, ceil_mode=True).shape[-1]
    before, after = ceil_mode_padding(size, 3, 2)
    assert (size + before + after - 3) // 2 + 1 == want, size
    # The last window starts inside the input, as torch requires.
    assert (want - 1) * 2 < size, size


@pytest.mark.parametrize('arch, batch, sizes', [
    ('squeezenet1_1', 2, (224,)),
    pytest.param('squeezenet1_0', 1, (224, 160), marks=pytest.mark.slow),
])
def test_eval_logits_and_features_match_torch(arch, batch, sizes):
  """224 px (the weights' crop) gives a 13x13 map; 160 px 9x9 with other ceil-mode pads on the way."""
  assert _native_size(arch) == 224
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  model = create_model(arch, NUM_CLASSES)
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)

  def features_and_logits(m, x):
    features = m.features(x)
    return features, m.from_features(features)

  forward = jax.jit(lambda v, x: model.apply(v, x, method=features_and_logits),
                    compiler_options=FAST_COMPILE if arch == 'squeezenet1_1' else None)
  for size in sizes:
    x = _images(batch, size)
    with torch.no_grad():
      features_ref = torch.flatten(tmodel.features(torch.from_numpy(x)), 1).numpy()
      ref = tmodel(torch.from_numpy(x)).numpy()
    features, logits = forward(variables, jnp.asarray(nchw_to_nhwc(x)))
    assert features.shape == features_ref.shape
    if size == 224:
      assert features.shape[1] == FAMILY.num_features(arch)
    assert within(rel_err(features, features_ref), 'activation_rel', f'eval features {arch} {size}px (rel)')
    assert within(rel_err(logits, ref), 'logits_rel', f'eval logits {arch} {size}px (rel)')


def test_from_features_refuses_a_width_that_is_not_a_square_map():
  model = SqueezeNet('squeezenet1_1', NUM_CLASSES)
  with pytest.raises(ValueError, match='square map'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 512 * 6)), method='from_features'))


@pytest.mark.parametrize('arch', ARCHS)
def test_round_trip_is_identical_loads_strictly_and_fits_the_module(arch):
  tmodel = random_torchvision_model(arch, NUM_CLASSES)
  sd = state_dict_numpy(tmodel)
  variables = torch_to_flax(sd, arch)
  assert jax.tree_util.tree_map(np.shape, variables['params']) == _shapes(create_model(arch, NUM_CLASSES), 32)['params']
  assert variables['batch_stats'] == {}
  back = flax_to_torch(variables, arch)
  assert back.keys() == sd.keys()
  for name, value in sd.items():
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  fresh = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_conversion_errors_name_the_other_version_and_list_bad_names():
  sd = state_dict_numpy(random_torchvision_model('squeezenet1_0', NUM_CLASSES))
  with pytest.raises(ConversionError, match='looks like a squeezenet1_0 state dict'):
    torch_to_flax(sd, 'squeezenet1_1')
  del sd['features.12.expand3x3.bias']
  sd['features.13.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as info:
    torch_to_flax(sd, 'squeezenet1_0')
  assert 'features.12.expand3x3.bias' in str(info.value) and 'features.13.weight' in str(info.value)


def _loss_and_grads(model, state_dict, x_nchw, labels):
  variables = torch_to_flax(state_dict, model.arch)

  def loss_fn(params):
    logits = model.apply({'params': params}, jnp.asarray(nchw_to_nhwc(x_nchw)), train=True)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))
    return loss, logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  return float(loss), np.asarray(logits), flax_to_torch({'params': grads, 'batch_stats': {}}, model.arch)


@pytest.mark.slow
def test_train_mode_forward_matches_torch():
  """Dropout p=0 on both sides: train mode is then the eval computation (SqueezeNet has no BatchNorm)."""
  arch = 'squeezenet1_1'
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).train()
  x = _images(3, 64, seed=5)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = SqueezeNet(arch, NUM_CLASSES, dropout_rate=0.0)
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  out = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert within(rel_err(out, ref), 'logits_rel', f'train-mode logits {arch} (rel)')
  # With its dropout, train mode draws a mask from the 'dropout' rng; eval mode uses none.
  model = SqueezeNet(arch, NUM_CLASSES)
  passes = jax.jit(lambda v, x: [model.apply(v, x, train=True, rngs={'dropout': jax.random.PRNGKey(k)})
                                 for k in (0, 1)] + [model.apply(v, x)])
  first, second, eval_logits = passes(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert not np.allclose(first, second) and not np.allclose(first, eval_logits)
  assert rel_err(eval_logits, ref) <= TOL['logits_rel']


@pytest.mark.slow
def test_cross_entropy_gradients_match_torch_in_float64():
  arch = 'squeezenet1_1'
  tmodel = _no_dropout(random_torchvision_model(arch, NUM_CLASSES)).train().double()
  x64, labels = _images(3, 64, seed=5, dtype=np.float64), np.array([0, 3, 4])
  model = SqueezeNet(arch, NUM_CLASSES, dropout_rate=0.0)
  logits_ref = tmodel(torch.from_numpy(x64))
  loss_ref = torch.nn.functional.cross_entropy(logits_ref, torch.from_numpy(labels))
  loss_ref.backward()
  with jax.enable_x64(True):
    loss, logits, grads = _loss_and_grads(model, state_dict_numpy(tmodel), x64, labels)
  assert abs(loss - loss_ref.item()) <= TOL['train_loss_abs_f64']
  assert rel_err(logits, logits_ref.detach().numpy()) <= TOL['grad_rel_f64']
  worst, name = max((rel_err(grads[n], p.grad.numpy()), n) for n, p in tmodel.named_parameters())
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {arch} (rel)'), name


def test_dropout_keeps_half_scales_by_two_and_is_off_in_eval():
  model = SqueezeNet('squeezenet1_1', 3)
  h = jnp.ones((2, 13, 13, 512), jnp.float32)
  draw = jax.jit(lambda key: model.apply({}, h, rngs={'dropout': key},
                                         method=lambda m, x: m.dropout(x, deterministic=False)))
  draws = np.stack([np.asarray(draw(jax.random.PRNGKey(k))) for k in range(2)])
  assert set(np.unique(draws)) == {0.0, 2.0}      # kept values scaled by 1 / (1 - p)
  assert abs((draws > 0).mean() - 0.5) < 0.004    # 346k draws: 4 standard deviations is 0.0034
  assert not np.array_equal(draws[0], draws[1])
  off = model.apply({}, h, method=lambda m, x: m.dropout(x, deterministic=True))
  np.testing.assert_array_equal(off, h)


def test_stages_and_frozen_strategy_train_only_the_final_conv():
  for arch in ARCHS:
    params = _shapes(create_model(arch, 2), 32)['params']
    tree = stage_tree(params)
    with_params = [f'features.{i}' for i, m in enumerate(getattr(torchvision.models, arch)().features)
                   if list(m.parameters())]
    assert tree == {**{s.replace('.', '_'): s for s in with_params}, 'classifier_1': 'head'}
    assert FAMILY.stages_of(arch) == tuple(with_params)
    frozen = optim.trainable_mask(params, 'frozen')
    assert [k for k, v in frozen.items() if v] == ['classifier_1']
    partial = optim.trainable_mask(params, ['features.12', 'head'])
    assert sorted(k for k, v in partial.items() if v) == ['classifier_1', 'features_12']


@pytest.mark.slow
def test_fresh_head_is_drawn_as_a_default_conv2d():
  """The tutorial's new nn.Conv2d(512, K, 1): U(-1/sqrt(512), 1/sqrt(512)) for weight and bias."""
  model = create_model('squeezenet1_1', 20)
  # Only the classifier: from_features on a 1x1 map.
  params = jax.jit(lambda r, x: model.init(r, x, method='from_features'))(jax.random.PRNGKey(0), jnp.zeros((1, 512)))
  params = params['params']
  assert list(params) == ['classifier_1']
  bound = 1 / np.sqrt(512)
  kernel, bias = params['classifier_1']['kernel'], params['classifier_1']['bias']
  assert kernel.shape == (1, 1, 512, 20) and bound >= np.max(np.abs(kernel)) > 0.99 * bound   # 10k draws
  assert abs(float(np.std(kernel)) - bound / np.sqrt(3)) < 0.03 * bound                       # uniform's std
  assert bound >= np.max(np.abs(bias)) > 0


def test_unknown_archs_and_options_are_refused():
  with pytest.raises(ValueError, match='unknown arch'):
    create_model('squeezenet2_0', 3)
  with pytest.raises(ValueError, match='fast_backward'):
    create_model('squeezenet1_1', 3, fast_backward=True)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits():
  arch = 'squeezenet1_1'
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  x = _images(2, 224)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = create_model(arch, NUM_CLASSES, dtype=jnp.bfloat16)
  logits = jax.jit(model.apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert logits.dtype == jnp.float32
  assert within(rel_err(logits, ref), 'bf16_logits_rel', f'bfloat16 eval logits {arch} (rel)')
  assert rel_err(logits, ref) > 1e-5   # bfloat16 really computes in bfloat16
  fresh = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}
