"""Flax AlexNet against torchvision's, computed in the test on the same weights and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, replace_head, torch_to_flax
from tl_jax.models import create_model, stage_tree
from tl_jax.models.alexnet import FAMILY, AlexNet

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

ARCH = 'alexnet'
NUM_CLASSES = 5
# The default tier compiles unoptimised: the same computation, compiled in a fraction of the time.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _no_dropout(tmodel):
  """Dropout masks cannot equal torch's; parity of train-mode passes runs both with p=0."""
  for module in tmodel.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  return tmodel


def _shapes(model, size=64):
  """The model's own parameter tree (shapes only, nothing compiled)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return jax.tree_util.tree_map(lambda a: a.shape, variables['params'])


def _random_alexnet(seed=0):
  """torchvision's AlexNet with torch's default init distribution, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  drawn by NumPy: its 61M draws take torch's own init more than twice as long."""
  with torch.device('meta'):
    tmodel = torchvision.models.alexnet(num_classes=NUM_CLASSES)
  tmodel = tmodel.to_empty(device='cpu')
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, param in tmodel.named_parameters():
      weight = tmodel.get_parameter(name.replace('.bias', '.weight'))
      bound = 1 / np.sqrt(weight[0].numel())
      param.copy_(torch.from_numpy((rng.random(param.shape, dtype=np.float32) * 2 - 1) * bound))
  return tmodel


@pytest.fixture(scope='module')
def pair():
  """A random torchvision AlexNet, its state dict and the Flax variables converted from it (one
  61M-parameter init and conversion for the file)."""
  tmodel = _random_alexnet()
  sd = state_dict_numpy(tmodel)
  return tmodel, sd, torch_to_flax(sd, ARCH)


def test_eval_logits_at_224_and_at_160_px(pair):
  """224 px (the weights' crop) gives a 6x6 map before the adaptive pool; 160 px a 4x4 one, which
  the pool's overlapping bins spread to 6x6."""
  assert torchvision.models.get_model_weights(ARCH).DEFAULT.transforms().crop_size[0] == 224
  tmodel, _, variables = pair
  tmodel.eval()
  model = create_model(ARCH, NUM_CLASSES)

  def features_and_logits(m, x):
    features = m.features(x)
    return features, m.from_features(features)

  forward = jax.jit(lambda v, x: model.apply(v, x, method=features_and_logits), compiler_options=FAST_COMPILE)
  for size in (224, 160):
    x = _images(2, size)
    with torch.no_grad():
      features_ref = torch.flatten(tmodel.avgpool(tmodel.features(torch.from_numpy(x))), 1).numpy()
      ref = tmodel(torch.from_numpy(x)).numpy()
    features, logits = forward(variables, jnp.asarray(nchw_to_nhwc(x)))
    assert features.shape == (2, FAMILY.num_features(ARCH))
    assert within(rel_err(features, features_ref), 'activation_rel', f'eval features {ARCH} {size}px (rel)')
    assert within(rel_err(logits, ref), 'logits_rel', f'eval logits {ARCH} {size}px (rel)')


@pytest.mark.slow
def test_round_trip_is_identical_loads_strictly_and_fits_the_module(pair):
  tmodel, sd, variables = pair
  assert jax.tree_util.tree_map(np.shape, variables['params']) == _shapes(create_model(ARCH, NUM_CLASSES))
  assert variables['batch_stats'] == {}
  back = flax_to_torch(variables, ARCH)
  assert back.keys() == sd.keys()
  for name, value in sd.items():
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  # Into the model the weights came from (a second 61M-parameter init would only cost time): strict
  # loading checks every name and shape.
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_conversion_errors_name_alexnet_and_list_bad_names(pair):
  sd = dict(pair[1])
  with pytest.raises(ConversionError, match='looks like a alexnet state dict'):
    torch_to_flax(sd, 'vgg11')
  del sd['features.8.bias']
  sd['features.9.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as info:
    torch_to_flax(sd, ARCH)
  assert 'features.8.bias' in str(info.value) and 'features.9.weight' in str(info.value)


@pytest.mark.slow
def test_train_mode_forward_matches_torch(pair):
  """Dropout p=0 on both sides: train mode is then the eval computation (AlexNet has no BatchNorm)."""
  tmodel, _, variables = pair
  _no_dropout(tmodel).train()
  x = _images(2, 64, seed=5)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = AlexNet(ARCH, NUM_CLASSES, dropout_rate=0.0)
  out = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert within(rel_err(out, ref), 'logits_rel', f'train-mode logits {ARCH} (rel)')
  # With its dropouts, train mode draws masks from the 'dropout' rng; eval mode uses none.
  model = AlexNet(ARCH, NUM_CLASSES)
  passes = jax.jit(lambda v, x: [model.apply(v, x, train=True, rngs={'dropout': jax.random.PRNGKey(k)})
                                 for k in (0, 1)] + [model.apply(v, x)])
  first, second, eval_logits = passes(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert not np.allclose(first, second) and not np.allclose(first, eval_logits)
  assert rel_err(eval_logits, ref) <= TOL['logits_rel']


@pytest.mark.slow
def test_cross_entropy_gradients_match_torch_in_float64():
  tmodel = _no_dropout(_random_alexnet(seed=1)).train().double()
  x64, labels = _images(3, 64, seed=5, dtype=np.float64), np.array([0, 3, 4])
  loss_ref = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x64)), torch.from_numpy(labels))
  loss_ref.backward()
  model = AlexNet(ARCH, NUM_CLASSES, dropout_rate=0.0)
  with jax.enable_x64(True):
    variables = torch_to_flax(state_dict_numpy(tmodel), ARCH)

    def loss_fn(params):
      logits = model.apply({'params': params}, jnp.asarray(nchw_to_nhwc(x64)), train=True)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
    grads = flax_to_torch({'params': grads, 'batch_stats': {}}, ARCH)
  assert abs(float(loss) - loss_ref.item()) <= TOL['train_loss_abs_f64']
  worst, name = max((rel_err(grads[n], p.grad.numpy()), n) for n, p in tmodel.named_parameters())
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {ARCH} (rel)'), name


def test_dropout_keeps_half_scales_by_two_and_is_off_in_eval():
  """The classifier's Dropout(0.5): drop rate, 1 / (1 - p) scaling, nothing dropped in eval."""
  model = AlexNet(ARCH, 3)
  h = jnp.ones((128, 4096), jnp.float32)
  draw = jax.jit(lambda key: model.apply({}, h, rngs={'dropout': key},
                                         method=lambda m, x: m.dropout(x, deterministic=False)))
  draws = np.stack([np.asarray(draw(jax.random.PRNGKey(k))) for k in range(2)])
  assert set(np.unique(draws)) == {0.0, 2.0}      # kept values scaled by 1 / (1 - p)
  assert abs((draws > 0).mean() - 0.5) < 0.004    # 1M draws: 4 standard deviations is 0.002
  assert not np.array_equal(draws[0], draws[1])
  off = model.apply({}, h, method=lambda m, x: m.dropout(x, deterministic=True))
  np.testing.assert_array_equal(off, h)


def test_stages_and_the_frozen_strategy_train_only_classifier_6():
  params = _shapes(create_model(ARCH, 2))
  tree = stage_tree(params)
  convs = [f'features.{i}' for i, m in enumerate(torchvision.models.alexnet().features)
           if isinstance(m, torch.nn.Conv2d)]
  assert tree == {**{s.replace('.', '_'): s for s in convs}, 'classifier_1': 'classifier',
                  'classifier_4': 'classifier', 'classifier_6': 'head'}
  assert FAMILY.stages == tuple(convs) + ('classifier',)
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['classifier_6']
  features = optim.trainable_mask(params, ['features'])
  assert all(features[k] == k.startswith('features_') for k in params)


@pytest.mark.slow
def test_fresh_head_is_drawn_as_nn_linear_and_replaces_only_classifier_6(pair):
  model = create_model(ARCH, 3)
  # classifier_6 alone (the 9216x4096 layer's init would cost seconds).
  fresh = jax.jit(lambda r, x: model.init(r, x, method=lambda m, x: m.classifier_6(x)))(jax.random.PRNGKey(0),
                                                                                       jnp.zeros((1, 4096)))
  bound = 1 / np.sqrt(4096)
  kernel, bias = fresh['params']['classifier_6']['kernel'], fresh['params']['classifier_6']['bias']
  assert kernel.shape == (4096, 3) and bound >= np.max(np.abs(kernel)) > 0.99 * bound
  assert bound >= np.max(np.abs(bias)) > 0
  merged = replace_head(pair[2], {'params': fresh['params'], 'batch_stats': {}}, ARCH)
  assert merged['params']['classifier_6'] is fresh['params']['classifier_6']
  assert merged['params']['classifier_4'] is pair[2]['params']['classifier_4']


def test_unknown_archs_and_options_are_refused():
  with pytest.raises(ValueError, match='unknown arch'):
    create_model('alexnet2', 3)
  with pytest.raises(ValueError, match='fast_backward'):
    create_model(ARCH, 3, fast_backward=True)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_logits(pair):
  tmodel, _, variables = pair
  tmodel.eval()
  x = _images(2, 224)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = create_model(ARCH, NUM_CLASSES, dtype=jnp.bfloat16)
  logits = jax.jit(model.apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert logits.dtype == jnp.float32
  assert within(rel_err(logits, ref), 'bf16_logits_rel', f'bfloat16 eval logits {ARCH} (rel)')
  assert rel_err(logits, ref) > 1e-5   # bfloat16 really computes in bfloat16
  fresh = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}
