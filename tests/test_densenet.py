"""Flax DenseNets against torchvision's, computed in the test on the same weights and inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, guess_arch, name_table, torch_to_flax
from tl_jax.models import create_model, stage_tree
from tl_jax.models.densenet import ARCHS, FAMILY, DenseLayer, DenseNet, DenseNetSpec, modern_state_dict_names

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES = 5
SMALLEST = 'densenet121'
# densenet121 shrunk to one or two narrow layers per block: every kind of layer (stem, dense layers,
# transitions, norm5) in a fraction of the compile time; the default tier's train-mode checks run on it.
SMALL_SPEC = DenseNetSpec(growth_rate=8, block_config=(2, 1, 1, 2), num_init_features=16, bn_size=2)
# The default tier compiles unoptimised: the same computation, compiled in a third of the time.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _randomise_bn(tmodel):
  """random_torchvision_model's BatchNorm randomisation, for a torchvision DenseNet built here."""
  with torch.no_grad():
    for module in tmodel.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
  return tmodel


def _small(monkeypatch):
  """densenet121 shrunk to SMALL_SPEC here and in a torchvision DenseNet of the same settings."""
  monkeypatch.setitem(ARCHS, SMALLEST, SMALL_SPEC)
  torch.manual_seed(0)
  return _randomise_bn(torchvision.models.DenseNet(SMALL_SPEC.growth_rate, SMALL_SPEC.block_config,
                                                   SMALL_SPEC.num_init_features, SMALL_SPEC.bn_size,
                                                   num_classes=NUM_CLASSES))


@functools.lru_cache(maxsize=2)
def _variable_shapes(arch, size=32):
  """The model's own variable tree (traced, not compiled)."""
  model = create_model(arch, NUM_CLASSES)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))


def _torch_features(tmodel, x):
  """DenseNet.forward up to the flattened pool."""
  return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(tmodel.features(x)), 1), 1)


@pytest.mark.parametrize('arch, batch, size', [
    (SMALLEST, 2, 64),
    *[pytest.param(arch, 1, 224, marks=pytest.mark.slow) for arch in ARCHS],
])
def test_eval_logits_and_features_match_torch(arch, batch, size):
  """224 px is every arch's crop (the slow tier); the default tier runs densenet121 at 64 px,
  where odd maps (pool0 16 -> 8, transitions 8 -> 4 -> 2 -> 1) reach norm5 as 2x2."""
  assert torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0] == 224
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  model = create_model(arch, NUM_CLASSES)
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)

  def features_and_logits(m, x):
    features = m.features(x)
    return features, m.from_features(features)

  forward = jax.jit(lambda v, x: model.apply(v, x, method=features_and_logits),
                    compiler_options=FAST_COMPILE if size < 224 else None)
  x = _images(batch, size)
  with torch.no_grad():
    features_ref = _torch_features(tmodel, torch.from_numpy(x)).numpy()
    ref = tmodel.classifier(torch.from_numpy(features_ref)).numpy()
  features, logits = forward(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert features.shape == (batch, FAMILY.num_features(arch))
  assert within(rel_err(features, features_ref), 'activation_rel', f'eval features {arch} {size}px (rel)')
  assert within(rel_err(logits, ref), 'logits_rel', f'eval logits {arch} {size}px (rel)')


@pytest.mark.parametrize('arch', [SMALLEST, *[pytest.param(a, marks=pytest.mark.slow) for a in ARCHS if a != SMALLEST]])
def test_round_trip_is_identical_loads_strictly_and_fits_the_module(arch):
  tmodel = random_torchvision_model(arch, NUM_CLASSES)
  sd = state_dict_numpy(tmodel)
  reference = _variable_shapes(arch)
  variables = torch_to_flax(sd, arch, reference=reference)
  assert (jax.tree_util.tree_map(np.shape, variables) ==
          jax.tree_util.tree_map(lambda a: a.shape, {k: reference[k] for k in ('params', 'batch_stats')}))
  assert sd['classifier.weight'].shape[1] == FAMILY.num_features(arch)
  back = flax_to_torch(variables, arch)
  assert back.keys() == sd.keys()
  for name, value in sd.items():
    if name.endswith('num_batches_tracked'):
      assert back[name].dtype == np.int64 and back[name].shape == ()   # exported as 0
      continue
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  fresh = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def _meta_state_dict(arch):
  """torchvision's names and shapes for `arch`, zeros as values (no weights drawn)."""
  with torch.device('meta'):
    sd = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES).state_dict()
  return {k: np.zeros(v.shape, np.float32) for k, v in sd.items()}


def test_the_weight_files_old_dense_layer_names_are_renamed_as_torchvision_does():
  """torchvision's files say 'denselayer1.norm.1.weight'; torchvision loads them as 'norm1'. (They
  predate num_batches_tracked.)"""
  modern = {k: v for k, v in _meta_state_dict(SMALLEST).items() if not k.endswith('num_batches_tracked')}
  legacy = {}
  for name, value in modern.items():
    parts = name.split('.')
    if 'denselayer' in name and parts[-2][-1] in '12' and parts[-2][:-1] in ('norm', 'conv'):
      parts[-2] = f'{parts[-2][:-1]}.{parts[-2][-1]}'
    legacy['.'.join(parts)] = value
  assert 'features.denseblock1.denselayer1.norm.1.weight' in legacy
  assert 'features.denseblock4.denselayer16.conv.2.weight' in legacy
  renamed = modern_state_dict_names(legacy)
  assert list(renamed) == list(modern)
  assert all(renamed[k] is modern[k] for k in modern)
  # The converter renames them itself, so the ImageNet files convert as they are.
  from_legacy, from_modern = torch_to_flax(legacy, SMALLEST), torch_to_flax(renamed, SMALLEST)
  assert jax.tree_util.tree_structure(from_legacy) == jax.tree_util.tree_structure(from_modern)
  assert guess_arch(legacy) == SMALLEST


def test_conversion_errors_name_the_other_densenet_and_list_bad_names():
  sd = _meta_state_dict('densenet169')
  with pytest.raises(ConversionError, match='looks like a densenet169 state dict'):
    torch_to_flax(sd, SMALLEST)
  assert sd['classifier.weight'].shape[1] == FAMILY.num_features('densenet169')
  del sd['features.denseblock3.denselayer30.norm2.running_var']
  sd['features.norm6.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as info:
    torch_to_flax(sd, 'densenet169')
  msg = str(info.value)
  assert 'features.denseblock3.denselayer30.norm2.running_var' in msg and 'features.norm6.weight' in msg


def _batch_stats_by_torch_name(batch_stats, arch):
  out = {}
  for entry in name_table(arch):
    if entry.collection == 'batch_stats':
      value = batch_stats
      for key in entry.path:
        value = value[key]
      out[entry.torch_name] = np.asarray(value)
  return out


def _train_forward_with_a_padded_row(tmodel, arch, size, compiler_options):
  """Batch 3 padded to 4 with mask 0 on the extra row: logits of the real rows and the BatchNorm
  running statistics against torch's train-mode forward of the 3 rows."""
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  x = _images(3, size, seed=5)
  with torch.no_grad():
    ref = tmodel.train()(torch.from_numpy(x)).numpy()
  padded = np.concatenate([x, 10 * _images(1, size, seed=6)])
  model = create_model(arch, NUM_CLASSES)
  forward = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask_b=m, mutable=['batch_stats']),
                    compiler_options=compiler_options)
  out, updates = forward(variables, jnp.asarray(nchw_to_nhwc(padded)), jnp.asarray([1, 1, 1, 0]))
  assert within(rel_err(out[:3], ref), 'logits_rel', f'train-mode logits, masked row {arch} (rel)')
  ours = _batch_stats_by_torch_name(updates['batch_stats'], arch)
  worst = max(np.max(np.abs(ours[k] - tmodel.state_dict()[k].numpy())) for k in ours)
  assert within(worst, 'running_stat_abs', f'BN running stats after a train forward {arch} (abs)')
  assert not np.allclose(ours['features.norm5.running_var'], variables['batch_stats']['features_norm5']['var'])


def _float64_gradients(tmodel, arch, size):
  """Cross-entropy gradients of every parameter against torch's, both in float64."""
  tmodel = tmodel.train().double()
  x64, labels = _images(3, size, seed=5, dtype=np.float64), np.array([0, 3, 4])
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
  worst, name = max((rel_err(grads[n], p.grad.numpy()), n) for n, p in tmodel.named_parameters())
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {arch} (rel)'), name


def test_small_densenet_train_forward_updates_running_stats_like_torch(monkeypatch):
  _train_forward_with_a_padded_row(_small(monkeypatch), SMALLEST, 32, FAST_COMPILE)


@pytest.mark.slow
def test_small_densenet_cross_entropy_gradients_match_torch_in_float64(monkeypatch):
  _float64_gradients(_small(monkeypatch), SMALLEST, 32)


@pytest.mark.slow
def test_densenet121_train_forward_updates_running_stats_like_torch():
  _train_forward_with_a_padded_row(random_torchvision_model(SMALLEST, NUM_CLASSES), SMALLEST, 64, None)


@pytest.mark.slow
def test_densenet121_cross_entropy_gradients_match_torch_in_float64():
  """At 64 px: at 32 px denseblock4's train-mode BatchNorms see 3 values per channel, and their
  ill-conditioned gradients reach ~1e-9 relative rounding in float64."""
  _float64_gradients(random_torchvision_model(SMALLEST, NUM_CLASSES), SMALLEST, 64)


def test_dense_layer_dropout_drops_at_its_rate_scales_and_is_off_in_eval():
  """torchvision's drop_rate: F.dropout on each dense layer's new channels, only in train mode."""
  layer = DenseLayer(growth_rate=64, bn_size=1, drop_rate=0.25)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8, 8, 8)), jnp.float32)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def eval_and_two_train_passes(x):
    variables = layer.init(jax.random.PRNGKey(0), x, False, False)
    apply = lambda key, dropout_train: layer.apply(variables, x, False, dropout_train, rngs={'dropout': key})
    return apply(jax.random.PRNGKey(1), False), [apply(jax.random.PRNGKey(k), True) for k in (1, 2)]

  off, on = jax.device_get(eval_and_two_train_passes(x))
  kept = on[0] != 0
  np.testing.assert_allclose(on[0][kept], off[kept] / 0.75, rtol=1e-6)
  assert abs(1 - kept.mean() - 0.25) < 0.012    # 33k draws: 4 standard deviations is 0.0096
  assert not np.array_equal(on[0], on[1])
  with torch.device('meta'):
    assert DenseNet().drop_rate == 0.0 == torchvision.models.densenet121().features.denseblock1.denselayer1.drop_rate


def test_stages_and_the_frozen_strategy_train_only_the_classifier():
  params = _variable_shapes(SMALLEST)['params']
  tree = stage_tree(params)
  assert set(tree.values()) == set(FAMILY.stages) | {'head'}
  with torch.device('meta'):
    torch_order = [n for n, m in torchvision.models.densenet121().features.named_children() if list(m.parameters())]
  assert [tree[f'features_{n}'] for n in torch_order] == ['stem', 'stem', *FAMILY.stages[1:]]
  assert tree['features_conv0'] == tree['features_norm0'] == 'stem'
  assert tree['features_transition2'] == 'transition2' and tree['classifier'] == 'head'
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['classifier']
  partial = optim.trainable_mask(params, ['denseblock4', 'norm5', 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['classifier', 'features_denseblock4', 'features_norm5']


@pytest.mark.slow
def test_fresh_classifier_is_drawn_as_nn_linear():
  model = create_model(SMALLEST, 10)
  params = jax.jit(lambda r, x: model.init(r, x, method='from_features'))(jax.random.PRNGKey(0), jnp.zeros((1, 1024)))
  params = params['params']
  bound = 1 / np.sqrt(1024)
  assert list(params) == ['classifier']
  assert bound >= np.max(np.abs(params['classifier']['kernel'])) > 0.99 * bound   # 10k draws
  assert bound >= np.max(np.abs(params['classifier']['bias'])) > 0


def test_unknown_archs_and_options_are_refused():
  with pytest.raises(ValueError, match='unknown arch'):
    create_model('densenet264', 3)
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
