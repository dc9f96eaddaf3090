"""Flax ShuffleNetV2s against torchvision's, computed in the test on the same weights and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, guess_arch, name_table, torch_to_flax
from tl_jax.models import create_model, stage_tree
from tl_jax.models import shufflenet
from tl_jax.models.shufflenet import ARCHS, FAMILY, channel_shuffle

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES = 5
SMALLEST = 'shufflenet_v2_x0_5'
# shufflenet_v2_x0_5 shrunk to 1, 2 and 1 narrow blocks per stage: both kinds of block, every
# BatchNorm position and the shuffles in a fraction of the compile time.
SMALL_REPEATS, SMALL_CHANNELS = (1, 2, 1), (8, 16, 32, 64, 64)
# The default tier compiles unoptimised: the same computation, compiled in a fraction of the time.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _variable_shapes(model, size=32):
  """The model's own variable tree (shapes only, nothing compiled)."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))


def _small(monkeypatch):
  """shufflenet_v2_x0_5 shrunk to SMALL_REPEATS/SMALL_CHANNELS here and in a torchvision ShuffleNetV2 alike."""
  monkeypatch.setattr(shufflenet, 'STAGE_REPEATS', SMALL_REPEATS)
  monkeypatch.setitem(ARCHS, SMALLEST, SMALL_CHANNELS)
  torch.manual_seed(0)
  tmodel = torchvision.models.ShuffleNetV2(list(SMALL_REPEATS), list(SMALL_CHANNELS), num_classes=NUM_CLASSES)
  with torch.no_grad():
    for module in tmodel.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
  return tmodel


def _torch_features(tmodel, x):
  """torchvision's _forward_impl up to the global pool."""
  x = tmodel.stage4(tmodel.stage3(tmodel.stage2(tmodel.maxpool(tmodel.conv1(x)))))
  return tmodel.conv5(x).mean([2, 3])


def test_channel_shuffle_is_torchvisions():
  x = np.random.default_rng(0).standard_normal((2, 12, 3, 4)).astype(np.float32)
  ref = torchvision.models.shufflenetv2.channel_shuffle(torch.from_numpy(x), 2).numpy()
  np.testing.assert_array_equal(channel_shuffle(jnp.asarray(nchw_to_nhwc(x)), 2), nchw_to_nhwc(ref))


@pytest.mark.parametrize('arch, batch, sizes', [
    (SMALLEST, 2, (224,)),
    pytest.param(SMALLEST, 2, (100,), marks=pytest.mark.slow),
    *[pytest.param(arch, 1, (224,), marks=pytest.mark.slow) for arch in ARCHS if arch != SMALLEST],
])
def test_eval_logits_and_features_match_torch(arch, batch, sizes):
  """224 px is every arch's crop; 100 px halves to odd sizes (25, 13, 7, 4) on the way."""
  assert torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0] == 224
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  model = create_model(arch, NUM_CLASSES)
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)

  def features_and_logits(m, x):
    features = m.features(x)
    return features, m.from_features(features)

  forward = jax.jit(lambda v, x: model.apply(v, x, method=features_and_logits),
                    compiler_options=FAST_COMPILE if (arch, sizes) == (SMALLEST, (224,)) else None)
  for size in sizes:
    x = _images(batch, size)
    with torch.no_grad():
      features_ref = _torch_features(tmodel, torch.from_numpy(x)).numpy()
      ref = tmodel(torch.from_numpy(x)).numpy()
    features, logits = forward(variables, jnp.asarray(nchw_to_nhwc(x)))
    assert features.shape == (batch, FAMILY.num_features(arch))
    assert within(rel_err(features, features_ref), 'activation_rel', f'eval features {arch} {size}px (rel)')
    assert within(rel_err(logits, ref), 'logits_rel', f'eval logits {arch} {size}px (rel)')


@pytest.mark.parametrize('arch', [SMALLEST, *[pytest.param(a, marks=pytest.mark.slow) for a in ARCHS if a != SMALLEST]])
def test_round_trip_is_identical_loads_strictly_and_fits_the_module(arch):
  tmodel = random_torchvision_model(arch, NUM_CLASSES)
  sd = state_dict_numpy(tmodel)
  reference = _variable_shapes(create_model(arch, NUM_CLASSES))
  variables = torch_to_flax(sd, arch, reference=reference)
  assert (jax.tree_util.tree_map(np.shape, variables) ==
          jax.tree_util.tree_map(lambda a: a.shape, {k: reference[k] for k in ('params', 'batch_stats')}))
  back = flax_to_torch(variables, arch)
  assert back.keys() == sd.keys()
  for name, value in sd.items():
    if name.endswith('num_batches_tracked'):
      assert back[name].dtype == np.int64 and back[name].shape == ()   # exported as 0
      continue
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  fresh = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_conversion_errors_list_wrong_widths_and_bad_names():
  """The four widths share every tensor name: a file of another width shows in its shapes."""
  with torch.device('meta'):
    other = torchvision.models.shufflenet_v2_x1_0(num_classes=NUM_CLASSES).state_dict()
  sd = {k: np.zeros(v.shape, np.float32) for k, v in other.items()}
  reference = _variable_shapes(create_model(SMALLEST, NUM_CLASSES))
  with pytest.raises(ConversionError) as info:
    torch_to_flax(sd, SMALLEST, reference=reference)
  assert 'wrong shape' in str(info.value) and 'stage2.0.branch1.2.weight: file has (58, 24, 1, 1)' in str(info.value)
  del sd['stage3.1.branch2.4.running_var']
  sd['stage3.1.branch1.0.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as info:
    torch_to_flax(sd, 'shufflenet_v2_x1_0')
  assert 'stage3.1.branch2.4.running_var' in str(info.value) and 'stage3.1.branch1.0.weight' in str(info.value)


@pytest.mark.slow
def test_guess_arch_tells_the_widths_apart_by_their_shapes():
  with torch.device('meta'):
    sd = {k: np.zeros(v.shape, np.float32) for k, v in torchvision.models.shufflenet_v2_x1_0().state_dict().items()}
  assert guess_arch(sd) == 'shufflenet_v2_x1_0'


def _batch_stats_by_torch_name(batch_stats, arch):
  out = {}
  for entry in name_table(arch):
    if entry.collection == 'batch_stats':
      value = batch_stats
      for key in entry.path:
        value = value[key]
      out[entry.torch_name] = np.asarray(value)
  return out


def _train_forward_with_a_padded_row(tmodel, compiler_options):
  """Batch 3 padded to 4 with mask 0 on the extra row: logits of the real rows and the BatchNorm
  running statistics against torch's train-mode forward of the 3 rows."""
  arch = SMALLEST
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  x = _images(3, 64, seed=5)
  with torch.no_grad():
    ref = tmodel.train()(torch.from_numpy(x)).numpy()
  padded = np.concatenate([x, 10 * _images(1, 64, seed=6)])
  model = create_model(arch, NUM_CLASSES)
  forward = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask_b=m, mutable=['batch_stats']),
                    compiler_options=compiler_options)
  out, updates = forward(variables, jnp.asarray(nchw_to_nhwc(padded)), jnp.asarray([1, 1, 1, 0]))
  assert within(rel_err(out[:3], ref), 'logits_rel', f'train-mode logits, masked row {arch} (rel)')
  ours = _batch_stats_by_torch_name(updates['batch_stats'], arch)
  worst = max(np.max(np.abs(ours[k] - tmodel.state_dict()[k].numpy())) for k in ours)
  assert within(worst, 'running_stat_abs', f'BN running stats after a train forward {arch} (abs)')
  assert not np.allclose(ours['conv5.1.running_var'], variables['batch_stats']['conv5_1']['var'])


@pytest.mark.slow
def test_small_shufflenet_train_forward_updates_running_stats_like_torch(monkeypatch):
  _train_forward_with_a_padded_row(_small(monkeypatch), FAST_COMPILE)


@pytest.mark.slow
def test_train_forward_updates_running_stats_like_torch():
  _train_forward_with_a_padded_row(random_torchvision_model(SMALLEST, NUM_CLASSES), None)


def _grad_err(grads, grads_ref, name):
  """Relative error; the bias of a BatchNorm that feeds a 1x1 conv and a train-mode BatchNorm
  (branch1.1, branch2.4) has an exactly zero gradient (the second BatchNorm removes the constant
  it adds), so both frameworks return rounding noise there: measure it against its own weight's."""
  if name.endswith(('branch1.1.bias', 'branch2.4.bias')):
    scale = np.max(np.abs(grads_ref[name.replace('.bias', '.weight')]))
    assert np.max(np.abs(grads_ref[name])) <= 1e-12 * scale, name
    return float(np.max(np.abs(grads[name] - grads_ref[name])) / scale)
  return rel_err(grads[name], grads_ref[name])


# The stem's max-pool gradient goes to conv1 (layers.max_pool's backward, tested on its own in test_layers).
@pytest.mark.slow
def test_cross_entropy_gradients_match_torch_in_float64():
  arch = SMALLEST
  tmodel = random_torchvision_model(arch, NUM_CLASSES).train().double()
  x64, labels = _images(3, 64, seed=5, dtype=np.float64), np.array([0, 3, 4])
  loss_ref = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x64)), torch.from_numpy(labels))
  loss_ref.backward()
  model = create_model(arch, NUM_CLASSES)
  with jax.enable_x64(True):
    variables = torch_to_flax(state_dict_numpy(tmodel), arch)

    def loss_fn(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              jnp.asarray(nchw_to_nhwc(x64)), train=True, mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
    grads = flax_to_torch({'params': grads, 'batch_stats': variables['batch_stats']}, arch)
  assert abs(float(loss) - loss_ref.item()) <= TOL['train_loss_abs_f64']
  grads_ref = {n: p.grad.numpy() for n, p in tmodel.named_parameters()}
  worst, name = max((_grad_err(grads, grads_ref, n), n) for n in grads_ref)
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {arch} (rel)'), name


def test_stages_and_the_frozen_strategy_train_only_fc():
  params = _variable_shapes(create_model(SMALLEST, 2))['params']
  tree = stage_tree(params)
  assert set(tree.values()) == set(FAMILY.stages) | {'head'}
  assert [k for k, v in tree.items() if v == 'stage3'] == [f'stage3_{i}' for i in range(8)]
  assert tree['conv1_1'] == 'conv1' and tree['conv5_0'] == 'conv5' and tree['fc'] == 'head'
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['fc']
  partial = optim.trainable_mask(params, ['stage4', 'conv5', 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['conv5_0', 'conv5_1', 'fc'] + [f'stage4_{i}' for i in range(4)]


@pytest.mark.slow
def test_fresh_fc_is_drawn_as_nn_linear():
  model = create_model(SMALLEST, 10)
  params = jax.jit(lambda r, x: model.init(r, x, method='from_features'))(jax.random.PRNGKey(0), jnp.zeros((1, 1024)))
  params = params['params']
  bound = 1 / np.sqrt(1024)
  assert list(params) == ['fc']
  assert bound >= np.max(np.abs(params['fc']['kernel'])) > 0.99 * bound   # 10k draws
  assert bound >= np.max(np.abs(params['fc']['bias'])) > 0


def test_unknown_archs_and_options_are_refused():
  with pytest.raises(ValueError, match='unknown arch'):
    create_model('shufflenet_v2_x3_0', 3)
  with pytest.raises(ValueError, match='fast_backward'):
    create_model(SMALLEST, 3, fast_backward=True)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_stats_and_logits():
  arch = SMALLEST
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  x = _images(2, 224)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = create_model(arch, NUM_CLASSES, dtype=jnp.bfloat16)
  eval_and_train_stats = jax.jit(
      lambda v, x: (model.apply(v, x), model.apply(v, x, train=True, mutable=['batch_stats'])[1]))
  logits, updates = eval_and_train_stats(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert logits.dtype == jnp.float32
  assert within(rel_err(logits, ref), 'bf16_logits_rel', f'bfloat16 eval logits {arch} (rel)')
  assert rel_err(logits, ref) > 1e-5   # bfloat16 really computes in bfloat16
  fresh = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(updates))
