"""Flax ConvNeXts against torchvision's, computed in the test on the same weights and inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, name_table, torch_to_flax
from tl_jax.models import HEAD, create_model, stage_tree
from tl_jax.models import convnext
from tl_jax.models.convnext import ARCHS, FAMILY, ConvNeXt, ConvNeXtSpec, StochasticDepth, block_rates

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES = 5
CHEAP = ('convnext_tiny',)   # the others take seconds just to build in torch
# convnext_tiny shrunk to two stages of one narrow block: every layer kind (stem, CNBlock, downsampling,
# classifier) in a fraction of the compile time.
SMALL_SPEC = ConvNeXtSpec((8, 16), (1, 1), 0.1)
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _tier(archs, cheap=CHEAP):
  return [a if a in cheap else pytest.param(a, marks=pytest.mark.slow) for a in archs]


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _native_size(arch):
  return torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]


def _randomise(tmodel):
  """LayerNorm affine params and layer scales away from their init: LayerNorm at (1, 0) and layer
  scales at 1e-6 (every block nearly the identity) would hide a wrong mapping or a wrong block."""
  with torch.no_grad():
    for module in tmodel.modules():
      if isinstance(module, torch.nn.LayerNorm):   # LayerNorm2d too
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    for name, p in tmodel.named_parameters():
      if name.endswith('layer_scale'):
        p.uniform_(0.5, 1.5)
  return tmodel


@functools.lru_cache(maxsize=1)
def _torch_tiny():
  return _randomise(random_torchvision_model('convnext_tiny', NUM_CLASSES)).eval()


def _torch_model(arch, seed=0):
  return _randomise(random_torchvision_model(arch, NUM_CLASSES, seed)).eval()


def _no_stochastic_depth(tmodel):
  """Stochastic depth draws cannot equal torch's: train-mode parity runs both with p=0."""
  for module in tmodel.modules():
    if isinstance(module, torchvision.ops.StochasticDepth):
      module.p = 0.0
  return tmodel


@pytest.fixture
def small(monkeypatch):
  """convnext_tiny shrunk to SMALL_SPEC here and in a torchvision ConvNeXt of the same settings."""
  monkeypatch.setitem(ARCHS, 'convnext_tiny', SMALL_SPEC)
  cfg = torchvision.models.convnext.CNBlockConfig
  widths, depths = SMALL_SPEC.widths, SMALL_SPEC.depths
  settings = [cfg(w, widths[i + 1] if i + 1 < len(widths) else None, d) for i, (w, d) in enumerate(zip(widths, depths))]
  torch.manual_seed(0)
  tmodel = torchvision.models.convnext.ConvNeXt(settings, stochastic_depth_prob=SMALL_SPEC.stochastic_depth_prob,
                                                num_classes=NUM_CLASSES)
  return _randomise(tmodel).eval()


def _param_shapes(arch):
  """{'params'} shapes of `init` (traced, not compiled)."""
  model = create_model(arch, NUM_CLASSES)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))


def _eval_parity(tmodel, arch, size, batch):
  """Logits through `features` + `from_features` (a feature cache's two halves), the features against
  torch's pooled, flattened ones."""
  x = _images(batch, size)
  pooled = []
  hook = tmodel.avgpool.register_forward_hook(lambda _m, _i, out: pooled.append(out.flatten(1).numpy()))
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  hook.remove()
  model = create_model(arch, NUM_CLASSES)
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  features = jax.jit(functools.partial(model.apply, method='features'))(variables, jnp.asarray(nchw_to_nhwc(x)))
  logits = jax.jit(functools.partial(model.apply, method='from_features'))(variables, features)
  assert logits.dtype == jnp.float32 and logits.shape == ref.shape
  assert within(rel_err(features, pooled[0]), 'activation_rel', f'pooled features {arch} {size}px (rel)')
  assert within(rel_err(logits, ref), 'logits_rel', f'eval logits {arch} {size}px (rel)')


def test_eval_logits_of_convnext_tiny_at_an_odd_size():
  """100 px: 25x25 after the stem, then downsamplings that drop a row and column as torch's floor does.
  (The default tier's forward: the compile, not the size, is what costs; 224 px is in the slow tier.)"""
  _eval_parity(_torch_tiny(), 'convnext_tiny', 100, 2)


@pytest.mark.slow
@pytest.mark.parametrize('arch', list(ARCHS))
def test_eval_logits_at_the_native_crop_size(arch):
  tmodel = _torch_tiny() if arch == 'convnext_tiny' else _torch_model(arch)
  _eval_parity(tmodel, arch, _native_size(arch), 2 if arch == 'convnext_tiny' else 1)


@pytest.mark.parametrize('arch', _tier(ARCHS))
def test_conversion_round_trip_is_bit_identical_and_loads_strictly(arch):
  tmodel = _torch_tiny() if arch == 'convnext_tiny' else _torch_model(arch)
  state_dict = state_dict_numpy(tmodel)
  table = name_table(arch)
  # The table is torchvision's state dict, key for key and in order.
  assert [e.torch_name for e in table] == list(state_dict)
  shapes = _param_shapes(arch)
  variables = torch_to_flax(state_dict, arch, reference=shapes)
  assert jax.tree_util.tree_map(np.shape, variables['params']) == jax.tree_util.tree_map(np.shape, shapes['params'])
  assert variables['batch_stats'] == {}
  back = flax_to_torch(variables, arch)
  assert list(back) == list(state_dict)
  for name, value in state_dict.items():
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  # Strictly loadable into torchvision's module (the one it came from: building another costs seconds).
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  # Every block's stochastic depth rate is torchvision's linear ramp.
  theirs = [m.p for m in tmodel.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
  ours = [r for rates in block_rates(arch, ARCHS[arch].stochastic_depth_prob) for r in rates]
  assert ours == pytest.approx(theirs, rel=1e-12, abs=0)


def test_conversion_errors_name_the_arch_or_the_keys():
  state_dict = state_dict_numpy(_torch_tiny())
  with pytest.raises(ConversionError, match='this looks like a convnext_tiny state dict'):
    torch_to_flax(state_dict, 'convnext_small')
  broken = dict(state_dict)
  del broken['features.3.1.layer_scale']
  broken['features.3.1.gamma'] = state_dict['features.3.1.layer_scale']
  with pytest.raises(ConversionError) as info:
    torch_to_flax(broken, 'convnext_tiny')
  assert 'missing (1): features.3.1.layer_scale' in str(info.value)
  assert 'unexpected (1): features.3.1.gamma' in str(info.value)
  # A file without its head is still recognised.
  headless = {k: v for k, v in state_dict.items() if not k.startswith('classifier.2.')}
  with pytest.raises(ConversionError, match='this looks like a convnext_tiny state dict'):
    torch_to_flax(headless, 'convnext_base')


def test_family_record_is_torchvisions():
  for arch in ARCHS:
    enum = torchvision.models.get_model_weights(arch)
    assert FAMILY.archs[arch] == enum.IMAGENET1K_V1.url.rsplit('/', 1)[1]
    assert FAMILY.init_size(arch) == 32
  assert FAMILY.num_features('convnext_tiny') == _torch_tiny().classifier[2].in_features
  assert FAMILY.head_torch == 'classifier.2' and not FAMILY.features_have_batch_norm('convnext_tiny')
  with pytest.raises(ValueError, match='unknown arch'):
    create_model('convnext_huge', 3)
  with pytest.raises(ValueError, match='fast_backward'):
    create_model('convnext_tiny', 3, fast_backward=True)


def _loss_and_grads(model, state_dict, x, labels, arch):
  """Loss, logits and gradients (by torch name) of train-mode cross-entropy, in one compile."""
  variables = torch_to_flax(state_dict, arch)

  def loss_fn(params):
    logits = model.apply({'params': params}, jnp.asarray(nchw_to_nhwc(x)), train=True,
                         rngs={'dropout': jax.random.PRNGKey(0)})
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))
    return loss, logits

  # The backend's optimisation level changes how fast the compiled code runs, not what it computes
  # (no fast-math either way); at level 0 this compile takes about half the time.
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
  (loss, logits), grads = jax.device_get(step(variables['params']))
  return float(loss), logits, flax_to_torch({'params': grads}, arch)


def _check_train_mode_and_gradients(tmodel, arch, size, label=None):
  tmodel = _no_stochastic_depth(tmodel).double().train()
  x, labels = _images(2, size, seed=5, dtype=np.float64), np.array([1, 3])
  logits_ref = tmodel(torch.from_numpy(x))
  loss_ref = torch.nn.functional.cross_entropy(logits_ref, torch.from_numpy(labels))
  loss_ref.backward()
  grads_ref = {name: p.grad.numpy() for name, p in tmodel.named_parameters()}
  with jax.enable_x64(True):
    loss, logits, grads = _loss_and_grads(ConvNeXt(arch, NUM_CLASSES, stochastic_depth_prob=0.0),
                                          state_dict_numpy(tmodel), x, labels, arch)
  assert logits.dtype == np.float64
  assert within(rel_err(logits, logits_ref.detach().numpy()), 'logits_rel', f'train-mode logits {label or arch} (rel)')
  assert abs(loss - loss_ref.item()) <= TOL['train_loss_abs_f64']
  worst, name = max((rel_err(grads[k], g), k) for k, g in grads_ref.items())
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {label or arch} (rel)'), (name, worst)


@pytest.mark.slow
def test_train_mode_forward_and_float64_gradients_match_torch(small):
  """Every parameter's gradient, layer scales and LayerNorms included, on the shrunk convnext_tiny."""
  _check_train_mode_and_gradients(small, 'convnext_tiny', 64, 'shrunk convnext_tiny')


@pytest.mark.slow
def test_train_mode_forward_and_float64_gradients_of_convnext_tiny():
  _check_train_mode_and_gradients(_torch_model('convnext_tiny'), 'convnext_tiny', 32)


@pytest.mark.slow
def test_bfloat16_compute_stays_close_with_float32_logits(small):
  variables = torch_to_flax(state_dict_numpy(small), 'convnext_tiny')
  x = _images(2, 64)
  with torch.no_grad():
    ref = small(torch.from_numpy(x)).numpy()
  logits = jax.jit(create_model('convnext_tiny', NUM_CLASSES, dtype=jnp.bfloat16).apply)(
      variables, jnp.asarray(nchw_to_nhwc(x)))
  assert logits.dtype == jnp.float32
  assert within(rel_err(logits, ref), 'bf16_logits_rel', 'bfloat16 logits shrunk convnext_tiny (rel)')


def test_stochastic_depth_drops_rows_scales_survivors_and_is_off_in_eval():
  rate, rows = 0.3, 40000
  x = jnp.ones((rows, 2, 2, 3), jnp.float32)
  layer = StochasticDepth(rate)
  out = np.asarray(layer.apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(0)}))
  # Whole rows: every value of a sample is dropped or kept together.
  per_row = out.reshape(rows, -1)
  assert np.all(per_row == per_row[:, :1])
  assert set(np.unique(out)) == {0.0, np.float32(1 / (1 - rate))}
  kept = float(np.mean(per_row[:, 0] > 0))
  assert abs(kept - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / rows)   # 4 standard deviations
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  assert np.all(np.asarray(StochasticDepth(1.0).apply({}, x, deterministic=False,
                                                      rngs={'dropout': jax.random.PRNGKey(1)})) == 0)


def test_stochastic_depth_is_on_in_train_mode_only(small):
  """The model's `train` flag drives the blocks' stochastic depth, drawing from the 'dropout' rng
  (eval mode, where it is off, is every other test's forward)."""
  variables = torch_to_flax(state_dict_numpy(small), 'convnext_tiny')
  x = _images(16, 32)
  with torch.no_grad():
    ref = small(torch.from_numpy(x)).numpy()
  model = ConvNeXt('convnext_tiny', NUM_CLASSES, stochastic_depth_prob=0.5)
  forward = jax.jit(lambda k: model.apply(variables, jnp.asarray(nchw_to_nhwc(x)), train=True, rngs={'dropout': k}))
  train_a, train_b = forward(jax.random.PRNGKey(0)), forward(jax.random.PRNGKey(1))
  # 16 rows, the second block dropped at rate 0.5: two draws agree on every row with probability 2^-16.
  assert rel_err(train_a, ref) > 1e-3 and rel_err(train_a, train_b) > 1e-3
  np.testing.assert_array_equal(train_a, forward(jax.random.PRNGKey(0)))


def test_stages_and_frozen_training_of_the_head_only():
  params = _param_shapes('convnext_tiny')['params']
  tree = stage_tree(params)
  assert tree == {**{f'features_{i}': f'features.{i}' for i in range(8)}, 'classifier_0': 'classifier',
                  'classifier_2': HEAD}
  assert set(tree.values()) == set(FAMILY.stages + (HEAD,))
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['classifier_2']
  partial = optim.trainable_mask(params, ['features.7', 'classifier', 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['classifier_0', 'classifier_2', 'features_7']
  features = optim.trainable_mask(params, ['features'])
  assert all(features[k] == k.startswith('features_') for k in params)
  assert all(optim.trainable_mask(params, 'finetune').values())
  # A backbone without the classifier converts without classifier.0 / classifier.2.
  base = {e.torch_name for e in name_table('convnext_tiny', base_only=True)}
  assert not any(n.startswith('classifier.') for n in base) and 'features.7.2.layer_scale' in base
  assert convnext.stage_of('classifier_1') is None and convnext.stage_of('features_8') is None
