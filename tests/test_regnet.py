"""Flax RegNets (X and Y) against torchvision's, computed in the test on the same weights and inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, name_table, torch_to_flax
from tl_jax.models import HEAD, create_model, stage_tree
from tl_jax.models import regnet
from tl_jax.models.regnet import ARCHS, FAMILY, RegNetSpec

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

NUM_CLASSES = 5
CHEAP = ('regnet_y_400mf',)   # the smallest; the others' round trips are in the slow tier
# regnet_y_400mf shrunk to two narrow one-block stages: stem, grouped convs, squeeze-excitation,
# projections and fc in a fraction of the compile time.
SMALL_SPEC = RegNetSpec((1, 1), (16, 24), (8, 8), True)
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _tier(archs, cheap=CHEAP):
  return [a if a in cheap else pytest.param(a, marks=pytest.mark.slow) for a in archs]


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _native_size(arch):
  return torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]


def _randomise_bn(tmodel):
  """As helpers.random_torchvision_model: BN at its init is nearly the identity in eval mode."""
  with torch.no_grad():
    for module in tmodel.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
  return tmodel


@pytest.fixture
def small(monkeypatch):
  """regnet_y_400mf shrunk to SMALL_SPEC here and in a torchvision RegNet of the same settings."""
  monkeypatch.setitem(ARCHS, 'regnet_y_400mf', SMALL_SPEC)
  stages = len(SMALL_SPEC.depths)
  params = torchvision.models.regnet.BlockParams(list(SMALL_SPEC.depths), list(SMALL_SPEC.widths),
                                                 list(SMALL_SPEC.group_widths), [1.0] * stages, [2] * stages, 0.25)
  torch.manual_seed(0)
  return _randomise_bn(torchvision.models.regnet.RegNet(params, num_classes=NUM_CLASSES))


@functools.lru_cache(maxsize=2)
def _torch_model(arch):
  return random_torchvision_model(arch, NUM_CLASSES).eval()


def _param_shapes(arch):
  """{'params', 'batch_stats'} shapes of `init` (traced, not compiled)."""
  model = create_model(arch, NUM_CLASSES)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))


def _eval_parity(tmodel, arch, size, batch):
  """Logits through `features` + `from_features`, and the features against torch's pooled, flattened ones."""
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


def test_eval_logits_of_regnet_y_400mf_at_its_crop_size():
  _eval_parity(_torch_model('regnet_y_400mf'), 'regnet_y_400mf', _native_size('regnet_y_400mf'), 2)


@pytest.mark.slow
@pytest.mark.parametrize('arch', [a for a in ARCHS if a != 'regnet_y_400mf'])
def test_eval_logits_at_the_native_crop_size(arch):
  """Every other arch at its weights' crop size (224 px; regnet_y_128gf's SWAG weights 384 px)."""
  tmodel = random_torchvision_model(arch, NUM_CLASSES).eval()
  _eval_parity(tmodel, arch, _native_size(arch), 1)


@pytest.mark.slow
def test_eval_logits_at_an_odd_size():
  """97 px: every stride-2 conv on an odd map, torch's symmetric padding (where 'SAME' would pad one side)."""
  _eval_parity(_torch_model('regnet_x_400mf'), 'regnet_x_400mf', 97, 2)


@pytest.mark.parametrize('arch', _tier(ARCHS))
def test_conversion_round_trip_is_bit_identical_and_loads_strictly(arch):
  tmodel = _torch_model(arch) if arch in CHEAP else random_torchvision_model(arch, NUM_CLASSES)
  state_dict = state_dict_numpy(tmodel)
  table = name_table(arch)
  # The table is torchvision's state dict (num_batches_tracked aside), key for key and in order.
  assert [e.torch_name for e in table] == [k for k in state_dict if not k.endswith('num_batches_tracked')]
  shapes = _param_shapes(arch)
  variables = torch_to_flax(state_dict, arch, reference=shapes)
  assert jax.tree_util.tree_map(np.shape, variables) == jax.tree_util.tree_map(np.shape, dict(shapes))
  back = flax_to_torch(variables, arch)
  assert list(back) == list(state_dict)
  for name, value in state_dict.items():
    if name.endswith('num_batches_tracked'):
      assert back[name] == 0
      continue
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  # Strictly loadable into torchvision's module (the one it came from: building another costs seconds).
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  # Every BatchNorm is torchvision's eps 1e-5 / momentum 0.1, as regnet._bn builds ours.
  assert {(m.eps, m.momentum) for m in tmodel.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {(1e-5, 0.1)}


def test_conversion_errors_name_the_arch_or_the_keys():
  state_dict = state_dict_numpy(_torch_model('regnet_y_400mf'))
  with pytest.raises(ConversionError, match='this looks like a regnet_y_400mf state dict'):
    torch_to_flax(state_dict, 'regnet_x_400mf')
  headless = {k: v for k, v in state_dict.items() if not k.startswith('fc.')}
  with pytest.raises(ConversionError, match='this looks like a regnet_y_400mf state dict'):
    torch_to_flax(headless, 'regnet_y_800mf')
  broken = dict(state_dict)
  broken['trunk_output.block2.block2-1.proj.0.weight'] = broken.pop('trunk_output.block2.block2-1.f.a.0.weight')
  with pytest.raises(ConversionError) as info:
    torch_to_flax(broken, 'regnet_y_400mf')
  assert 'missing (1): trunk_output.block2.block2-1.f.a.0.weight' in str(info.value)
  assert 'unexpected (1): trunk_output.block2.block2-1.proj.0.weight' in str(info.value)


def test_family_record_is_torchvisions():
  """V1 weight files (DEFAULT's for regnet_y_128gf, which has no V1); stages and widths from the
  settings torchvision computes (BlockParams, without building a model)."""
  for arch in ARCHS:
    enum = torchvision.models.get_model_weights(arch)
    weights = enum.IMAGENET1K_V1 if 'IMAGENET1K_V1' in enum.__members__ else enum.DEFAULT
    assert FAMILY.archs[arch] == weights.url.rsplit('/', 1)[1], arch
  captured = {}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(torchvision.models.regnet, '_regnet', lambda params, *args, **kwargs: params)
    for arch in ARCHS:
      captured[arch] = getattr(torchvision.models.regnet, arch)()
  for arch, params in captured.items():
    spec = ARCHS[arch]
    assert (spec.depths, spec.widths, spec.group_widths, spec.se) == (
        tuple(params.depths), tuple(params.widths), tuple(params.group_widths), params.se_ratio == 0.25), arch
    assert set(params.bottleneck_multipliers) == {1.0} and set(params.strides) == {2}, arch
    assert FAMILY.num_features(arch) == params.widths[-1]
  with pytest.raises(ValueError, match='unknown arch'):
    create_model('regnet_z_400mf', 3)
  with pytest.raises(ValueError, match='fast_backward'):
    create_model('regnet_x_400mf', 3, fast_backward=True)


def _train_loss_and_grads(model, variables, x, labels, mask=None):
  """Loss, train-mode logits, updated batch_stats and gradients of the cross-entropy, in one compile."""

  def loss_fn(params):
    logits, state = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                jnp.asarray(nchw_to_nhwc(x)), train=True, mask_b=mask, mutable=['batch_stats'])
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1)[:, 0]
    weights = jnp.ones_like(log_p) if mask is None else mask.astype(log_p.dtype)
    return -jnp.sum(weights * log_p) / jnp.sum(weights), (logits, state['batch_stats'])

  # The backend's optimisation level changes how fast the compiled code runs, not what it computes
  # (no fast-math either way); at level 0 this compile takes about half the time.
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
  return jax.device_get(step(variables['params']))


def _running_stats(state_dict):
  return {k: v for k, v in state_dict.items() if k.endswith(('running_mean', 'running_var'))}


def _check_train_mode_and_gradients(tmodel, arch, size, label=None):
  """Train-mode logits, BN running stats after the forward and float64 gradients of every parameter,
  on a batch of 3 whose last row is padding (`mask_b`): torch runs the 2 real rows."""
  tmodel = tmodel.double().train()
  state_dict = state_dict_numpy(tmodel)
  x, labels = _images(3, size, seed=5, dtype=np.float64), np.array([1, 3, 0])
  logits_ref = tmodel(torch.from_numpy(x[:2]))
  loss_ref = torch.nn.functional.cross_entropy(logits_ref, torch.from_numpy(labels[:2]))
  loss_ref.backward()
  grads_ref = {name: p.grad.numpy() for name, p in tmodel.named_parameters()}
  stats_ref = _running_stats(state_dict_numpy(tmodel))
  with jax.enable_x64(True):
    variables = torch_to_flax(state_dict, arch)
    (loss, (logits, batch_stats)), grads = _train_loss_and_grads(create_model(arch, NUM_CLASSES), variables, x,
                                                                 labels, jnp.asarray([True, True, False]))
    ours = flax_to_torch({'params': grads, 'batch_stats': batch_stats}, arch)
  assert logits.dtype == np.float64
  assert within(rel_err(logits[:2], logits_ref.detach().numpy()), 'logits_rel', f'train-mode logits {label or arch} (rel)')
  assert abs(loss - loss_ref.item()) <= TOL['train_loss_abs_f64']
  worst_stat = max(float(np.max(np.abs(ours[k] - v))) for k, v in stats_ref.items())
  assert within(worst_stat, 'running_stat_abs', f'BN running stats after a train forward {label or arch} (abs)')
  assert not np.allclose(ours['stem.1.running_var'], state_dict['stem.1.running_var'])   # they did move
  worst, name = max((rel_err(ours[k], g), k) for k, g in grads_ref.items())
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {label or arch} (rel)'), (name, worst)


@pytest.mark.slow
def test_train_mode_forward_running_stats_and_float64_gradients_match_torch(small):
  """On the shrunk RegNetY: every parameter's gradient, squeeze-excitation and projections included."""
  _check_train_mode_and_gradients(small, 'regnet_y_400mf', 32, 'shrunk regnet_y_400mf')


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['regnet_y_400mf', 'regnet_x_400mf'])
def test_train_mode_forward_running_stats_and_float64_gradients_of_a_full_arch(arch):
  """64 px: the last stage's 2x2 maps give each train-mode BatchNorm 8 values per channel. At 32 px
  (1x1 maps, 2 values: every output +-1 before the affine) the stack of such BatchNorms amplifies
  float64 rounding into percent-level logit differences, in torch as in JAX."""
  _check_train_mode_and_gradients(random_torchvision_model(arch, NUM_CLASSES), arch, 64)


def test_train_mode_forward_with_a_padded_row_updates_running_stats_like_torch(small):
  """Train-mode BatchNorm in every layer sees `mask_b`: a batch of 3 whose last row is padding is
  torch's batch of 2, in the logits and in the running statistics (the shrunk RegNetY, float32)."""
  tmodel = small.train()
  state_dict = state_dict_numpy(tmodel)
  x = _images(3, 32, seed=7)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x[:2])).numpy()
  variables = torch_to_flax(state_dict, 'regnet_y_400mf')
  model = create_model('regnet_y_400mf', NUM_CLASSES)
  logits, state = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask_b=m, mutable=['batch_stats']))(
      variables, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray([True, True, False]))
  assert within(rel_err(logits[:2], ref), 'logits_rel', 'train-mode logits, padded batch, shrunk RegNetY (rel)')
  ours = _running_stats(flax_to_torch({'params': variables['params'], 'batch_stats': state['batch_stats']},
                                      'regnet_y_400mf'))
  worst = max(float(np.max(np.abs(ours[k] - v))) for k, v in _running_stats(state_dict_numpy(tmodel)).items())
  assert within(worst, 'running_stat_abs', 'BN running stats, padded batch, shrunk RegNetY (abs)')
  assert not np.allclose(ours['stem.1.running_var'], state_dict['stem.1.running_var'])   # they did move


@pytest.mark.slow
def test_bfloat16_compute_stays_close_with_float32_logits():
  tmodel = _torch_model('regnet_y_400mf')
  x = _images(2, 224)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  variables = torch_to_flax(state_dict_numpy(tmodel), 'regnet_y_400mf')
  logits = jax.jit(create_model('regnet_y_400mf', NUM_CLASSES, dtype=jnp.bfloat16).apply)(
      variables, jnp.asarray(nchw_to_nhwc(x)))
  assert logits.dtype == jnp.float32
  assert within(rel_err(logits, ref), 'bf16_logits_rel', 'bfloat16 logits regnet_y_400mf (rel)')


def test_stages_and_frozen_training_of_the_head_only():
  params = _param_shapes('regnet_y_400mf')['params']
  tree = stage_tree(params)
  assert tree == {'stem': 'stem', **{f'trunk_output_block{s}': f'trunk_output.block{s}' for s in range(1, 5)},
                  'fc': HEAD}
  assert set(tree.values()) == set(FAMILY.stages + (HEAD,))
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['fc']
  partial = optim.trainable_mask(params, ['trunk_output.block4', 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['fc', 'trunk_output_block4']
  features = optim.trainable_mask(params, ['features'])
  assert all(features[k] == (k != 'fc') for k in params)
  base = {e.torch_name for e in name_table('regnet_y_400mf', base_only=True)}
  assert not any(n.startswith('fc.') for n in base) and 'trunk_output.block4.block4-5.f.se.fc2.bias' in base
  assert regnet.stage_of('trunk_output_block5') is None and regnet.stage_of('layer1') is None
