"""Flax Inception v3 against torchvision's, computed in the test on the same weights and inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import nchw_to_nhwc, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, name_table, torch_to_flax
from tl_jax.models import create_model, init_variables, stage_tree
from tl_jax.models.inception import AUX_HEADS, FAMILY, Inception3, avg_pool, transform_input

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')


ARCH = 'inception_v3'
NUM_CLASSES = 5
NATIVE = 299   # also the smallest input whose Mixed_6e (17x17) the aux head's 5x5 pool and conv fit


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _torch_model(transform_input=True, seed=0, num_classes=NUM_CLASSES):
  """torchvision's Inception3 as its ImageNet weights build it (AuxLogits, transform_input on), with
  random weights and randomised BatchNorm affine params and running statistics (as
  helpers.random_torchvision_model; torch's default init is much faster than torchvision's
  truncated normal here)."""
  torch.manual_seed(seed)
  tmodel = torchvision.models.inception_v3(num_classes=num_classes, aux_logits=True, transform_input=transform_input,
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
  """init's {'params', 'batch_stats'} shapes at its init size (traced, not compiled)."""
  model = create_model(ARCH, num_classes)
  size = FAMILY.init_size(ARCH)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))


def _eval_parity(size, batch, transform_input):
  tmodel = _torch_model(transform_input).eval()
  x = _images(batch, size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  variables = torch_to_flax(state_dict_numpy(tmodel), ARCH)
  del tmodel
  model = Inception3(num_classes=NUM_CLASSES, transform_input=transform_input)
  logits = jax.jit(model.apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert logits.dtype == jnp.float32 and logits.shape == ref.shape
  assert within(rel_err(logits, ref), 'logits_rel',
                f'eval logits {ARCH} {size}px transform_input={transform_input} (rel)')


@pytest.mark.slow
def test_eval_logits_at_the_native_crop_size():
  """299 px (the weights' crop), transform_input on as torchvision builds it with ImageNet weights."""
  assert torchvision.models.get_model_weights(ARCH).DEFAULT.transforms().crop_size[0] == NATIVE
  _eval_parity(NATIVE, 1, transform_input=True)


@pytest.mark.slow
def test_eval_logits_at_the_smallest_size_without_transform_input():
  """75 px, torchvision's min_size: Mixed_7a's stride-2 convs leave a single pixel."""
  assert torchvision.models.get_model_weights(ARCH).DEFAULT.meta['min_size'] == (75, 75)
  _eval_parity(75, 2, transform_input=False)


def test_transform_input_and_avg_pool_are_torchvisions():
  x = _images(2, 9)
  tmodel = torchvision.models.Inception3(aux_logits=False, transform_input=True, init_weights=False)
  ref = tmodel._transform_input(torch.from_numpy(x)).numpy()
  assert within(float(np.max(np.abs(transform_input(jnp.asarray(nchw_to_nhwc(x))) - nchw_to_nhwc(ref)))),
                'pixel_abs', 'GoogLeNet/Inception transform_input (abs)')
  for window, stride, padding in [(3, 1, 1), (5, 3, 0)]:
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(x), window, stride, padding).numpy()
    np.testing.assert_allclose(avg_pool(jnp.asarray(nchw_to_nhwc(x)), window, stride, padding), nchw_to_nhwc(ref),
                               rtol=1e-6, atol=1e-6)


def test_conversion_round_trip_and_errors():
  """torch -> Flax -> torch is bit-identical and loads strictly; the name table is the state dict's, in
  order, AuxLogits included; wrong files are named or listed."""
  state_dict = state_dict_numpy(_torch_model())
  assert [e.torch_name for e in name_table(ARCH)] == [k for k in state_dict if not k.endswith('num_batches_tracked')]
  shapes = _param_shapes()
  variables = torch_to_flax(state_dict, ARCH, reference=shapes)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      jax.tree_util.tree_map(lambda s: 0, shapes))
  back = flax_to_torch(variables, ARCH)
  assert back.keys() == state_dict.keys()
  for name, value in state_dict.items():
    assert np.array_equal(back[name], value), name
  fresh = torchvision.models.inception_v3(num_classes=NUM_CLASSES, aux_logits=True, init_weights=False)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)

  with pytest.raises(ConversionError, match=r'missing \(1\): Mixed_6e.branch7x7dbl_4.bn.running_var'):
    torch_to_flax({k: v for k, v in state_dict.items() if k != 'Mixed_6e.branch7x7dbl_4.bn.running_var'}, ARCH)
  with pytest.raises(ConversionError, match=r'unexpected \(1\): AuxLogits.fc2.weight'):
    torch_to_flax({**state_dict, 'AuxLogits.fc2.weight': state_dict['fc.weight']}, ARCH)
  with pytest.raises(ConversionError, match='looks like a inception_v3 state dict'):
    torch_to_flax(state_dict, 'googlenet')


def test_without_the_head_auxlogits_fc_is_left_out_too():
  """A 1000-class file converts into a 5-class model's backbone: fc and AuxLogits.fc are num_classes wide."""
  torch.manual_seed(0)
  state_dict = state_dict_numpy(torchvision.models.inception_v3(num_classes=1000, init_weights=False))
  loaded = torch_to_flax(state_dict, ARCH, reference=_param_shapes(), include_head=False)
  assert 'fc' not in loaded['params'] and sorted(loaded['params']['AuxLogits']) == ['conv0', 'conv1']
  assert AUX_HEADS == (('AuxLogits', 'fc'),)
  assert _param_shapes()['params']['AuxLogits']['fc']['kernel'].shape == (768, NUM_CLASSES)
  assert FAMILY.aux_loss_weights(ARCH) == (0.4,)


@pytest.mark.slow
def test_train_mode_outputs_running_stats_and_gradients_with_the_aux_loss_in_float64():
  """torch's train mode (dropout p=0): InceptionOutputs(logits, aux_logits) is our (logits, (aux,)); BN
  running statistics after it; gradients of CE(logits) + 0.4 CE(aux) w.r.t. every parameter. 299 px,
  batch 2: the smallest input the aux head accepts, and two rows for its 1x1 BatchNorm.

  All in float64: in float32 torch's own train-mode aux logits are ~1e-4 (relative) from its float64
  ones (measured; ~100 train-mode BatchNorms, the last over two values), so float32 cannot tell a bug
  from rounding at the logits' tolerance."""
  x, labels = _images(2, NATIVE, seed=5, dtype=np.float64), np.array([0, 3])
  tmodel = _no_dropout(_torch_model()).double().train()
  initial = state_dict_numpy(tmodel)
  (weight,) = FAMILY.aux_loss_weights(ARCH)
  out_ref = tmodel(torch.from_numpy(x))
  assert type(out_ref).__name__ == 'InceptionOutputs'
  ce = lambda logits: torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
  (ce(out_ref.logits) + weight * ce(out_ref.aux_logits)).backward()
  grads_ref = {name: p.grad.numpy() for name, p in tmodel.named_parameters()}
  stats_ref = state_dict_numpy(tmodel)
  logits_ref, aux_ref = out_ref.logits.detach().numpy(), out_ref.aux_logits.detach().numpy()
  del tmodel, out_ref
  model = Inception3(num_classes=NUM_CLASSES, dropout_rate=0.0)
  with jax.enable_x64(True):
    variables = torch_to_flax(initial, ARCH)

    def loss_fn(params):
      (logits, (aux,)), updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                              jnp.asarray(nchw_to_nhwc(x)), train=True, with_aux=True,
                                              mutable=['batch_stats'])
      ce = lambda z: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), jnp.asarray(labels)[:, None], axis=1))
      return ce(logits) + weight * ce(aux), (logits, aux, updates['batch_stats'])

    grads, (logits, aux, batch_stats) = jax.device_get(
        jax.jit(jax.grad(loss_fn, has_aux=True))(variables['params']))
  assert logits.dtype == np.float64
  assert within(rel_err(logits, logits_ref), 'logits_rel', f'train-mode logits float64 {ARCH} (rel)')
  assert within(rel_err(aux, aux_ref), 'logits_rel', f'train-mode aux logits float64 {ARCH} (rel)')
  ours = flax_to_torch({'params': variables['params'], 'batch_stats': batch_stats}, ARCH)
  stat_names = [k for k in stats_ref if k.endswith(('running_mean', 'running_var'))]
  worst = max(np.max(np.abs(ours[k] - stats_ref[k])) for k in stat_names)
  assert within(worst, 'running_stat_abs', f'BN running stats after a train forward float64 {ARCH} (abs)')
  assert not np.allclose(initial['AuxLogits.conv1.bn.running_var'], ours['AuxLogits.conv1.bn.running_var'])

  grads = flax_to_torch({'params': grads, 'batch_stats': variables['batch_stats']}, ARCH)
  assert grads_ref.keys() <= grads.keys() and 'AuxLogits.fc.weight' in grads_ref
  worst, name = max((rel_err(grads[k], grads_ref[k]), k) for k in grads_ref)
  assert within(worst, 'grad_rel_f64', f'gradients float64 with the aux loss, worst tensor {ARCH} (rel)'), name


def test_outputs_by_mode_and_bfloat16_dtypes():
  """Only train mode with `with_aux` adds the aux output (torch's eval returns logits only); with
  bfloat16 compute, params, BN statistics and every output stay float32."""
  model = create_model(ARCH, NUM_CLASSES, dtype=jnp.bfloat16)
  shapes = _param_shapes()
  call = lambda size, **kw: jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros((2, size, size, 3)), mutable=['batch_stats'],
                            rngs={'dropout': jax.random.PRNGKey(0)}, **kw), shapes)
  logits, _ = call(75, train=False, with_aux=True)
  assert logits.shape == (2, NUM_CLASSES)
  (logits, (aux,)), updates = call(NATIVE, train=True, with_aux=True)
  assert logits.shape == aux.shape == (2, NUM_CLASSES)
  assert {a.dtype for a in (logits, aux)} == {jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((shapes, updates))} == {jnp.dtype(jnp.float32)}
  with pytest.raises(ValueError, match=r'trains its aux head .* from 299-px inputs .*: crop to 299 px'):
    call(NATIVE - 1, train=True, with_aux=True)


def test_dropout_rate_scaling_and_off_in_eval():
  model = Inception3(num_classes=NUM_CLASSES)
  h = jnp.ones((128, 2048), jnp.float32)
  draws = np.stack([np.asarray(model.apply({}, h, rngs={'dropout': jax.random.PRNGKey(k)},
                                           method=lambda m, x: m.dropout(x, deterministic=False)))
                    for k in range(2)])
  assert set(np.unique(draws)) == {0.0, 2.0}
  assert abs((draws > 0).mean() - 0.5) < 0.004    # 0.5M draws: 4 standard deviations is 0.0028
  assert not np.array_equal(draws[0], draws[1])
  np.testing.assert_array_equal(model.apply({}, h, method=lambda m, x: m.dropout(x, deterministic=True)), h)


def test_stages_and_the_frozen_strategy():
  """Every top-level name has a stage (torchvision's top-level modules, AuxLogits its own, its last
  layer fc the head's, as PyTorch's recipe replaces and trains AuxLogits.fc); 'frozen' trains fc and
  AuxLogits.fc."""
  params = _param_shapes()['params']
  tree = stage_tree(params)
  assert set(tree) == set(FAMILY.stages) | {'fc'}
  assert tree['fc'] == 'head' and tree['Mixed_6e'] == 'Mixed_6e'
  assert tree['AuxLogits'] == {'conv0': 'AuxLogits', 'conv1': 'AuxLogits', 'fc': 'head'}
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v is True] == ['fc']
  assert frozen['AuxLogits'] == {'conv0': False, 'conv1': False, 'fc': True}
  partial = optim.trainable_mask(params, ['Mixed_7c', 'AuxLogits', 'head'])
  assert sorted(k for k, v in partial.items() if v is True) == ['Mixed_7c', 'fc']
  assert partial['AuxLogits'] == {'conv0': True, 'conv1': True, 'fc': True}
  with pytest.raises(ValueError, match='fast_backward'):
    create_model(ARCH, 2, fast_backward=True)


@pytest.mark.slow
def test_init_variables_at_the_init_size_hold_the_aux_head():
  """init at 75 px (its Mixed_6e is 3x3, too small for the aux head) still creates AuxLogits."""
  variables = init_variables(create_model(ARCH, NUM_CLASSES), jax.random.PRNGKey(0))
  assert sorted(variables['params']['AuxLogits']) == ['conv0', 'conv1', 'fc']
  assert sorted(variables['batch_stats']['AuxLogits']) == ['conv0', 'conv1']
