"""Flax MaxViT against torchvision's, computed in the test on the same weights and inputs.

The default tier runs a small MaxVit(...) built from torchvision's own class (maxvit_t takes tens of
seconds to build and compile on a CPU), at its construction size and at another size torchvision builds
the same weights for; the slow tier runs maxvit_t at 224 px.
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, name_table, torch_to_flax
from tl_jax.models import create_model, stage_tree
from tl_jax.models import maxvit
from tl_jax.models.maxvit import FAMILY, MaxVit, MaxViTSpec, StochasticDepth

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
from torchvision.models import maxvit as tv_maxvit  # noqa: E402

NUM_CLASSES = 5
# One block of two layers (the first with the stride-2 projection, the second with none), partitions of
# 2x2: at 32 px the block sees an 8x8 map (a grid of 4x4 partitions), at 64 px 16x16 (8x8).
SMALL = MaxViTSpec(stem_channels=8, block_channels=(16,), block_layers=(2,), head_dim=4, partition_size=2,
                   stochastic_depth_prob=0.2)
SMALL_SIZE = 32


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _randomise(tmodel, seed=0):
  """Weights of unit gain (torchvision draws N(0, 0.02), under which every branch is ~0 beside its
  residual), biases, norm affine params, BN statistics and the relative position bias tables away from
  their init, which would hide a wrong mapping of them."""
  gen = torch.Generator().manual_seed(seed)

  def draw(t, low, high):
    t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (high - low) + low)

  with torch.no_grad():
    for module in tmodel.modules():
      if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / module.weight[0].numel() ** 0.5)
        if module.bias is not None:
          draw(module.bias, -0.2, 0.2)
      elif isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
        draw(module.weight, 0.5, 1.5)
        draw(module.bias, -0.5, 0.5)
      if isinstance(module, torch.nn.BatchNorm2d):
        draw(module.running_mean, -0.5, 0.5)
        draw(module.running_var, 0.5, 2.0)
      if isinstance(module, tv_maxvit.RelativePositionalMultiHeadAttention):
        module.relative_position_bias_table.copy_(torch.randn(module.relative_position_bias_table.shape,
                                                              generator=gen))
  return tmodel


def _torch_small(size=SMALL_SIZE, spec=SMALL, stochastic_depth_prob=None, seed=0):
  """torchvision's MaxVit class with `spec`'s arguments, built for `size` px."""
  torch.manual_seed(seed)
  p = spec.stochastic_depth_prob if stochastic_depth_prob is None else stochastic_depth_prob
  tmodel = tv_maxvit.MaxVit((size, size), spec.stem_channels, spec.partition_size, list(spec.block_channels),
                            list(spec.block_layers), spec.head_dim, p, num_classes=NUM_CLASSES)
  return _randomise(tmodel, seed)


def _small_model(**kwargs):
  return MaxVit('maxvit_t', NUM_CLASSES, spec=SMALL, **kwargs)


def _layout(value, kind, to_flax):
  if kind == 'linear_w':
    return value.T
  if kind == 'conv':
    return value.transpose((2, 3, 1, 0) if to_flax else (3, 2, 0, 1))
  return value


def _spec_to_flax(state_dict, spec=SMALL):
  """torch_to_flax for a configuration no arch name stands for: its name table, convert's layouts."""
  variables = {'params': {}, 'batch_stats': {}}
  for entry in maxvit.spec_name_table(spec):
    tree = variables[entry.collection]
    for key in entry.path[:-1]:
      tree = tree.setdefault(key, {})
    value = np.asarray(state_dict[entry.torch_name])
    tree[entry.path[-1]] = np.ascontiguousarray(_layout(value, entry.kind, True))
  return variables


def _spec_to_torch(variables, spec=SMALL, collections=('params', 'batch_stats')):
  """flax_to_torch for `spec` (without num_batches_tracked): torch name -> array in torch's layout."""
  out = {}
  for entry in maxvit.spec_name_table(spec):
    if entry.collection not in collections:
      continue
    value = variables[entry.collection]
    for key in entry.path:
      value = value[key]
    out[entry.torch_name] = np.ascontiguousarray(_layout(np.asarray(value), entry.kind, False))
  return out


def _eval_parity(tmodel, variables, size, batch):
  x = _images(batch, size)
  with torch.no_grad():
    ref = tmodel.eval()(torch.from_numpy(x)).numpy()
  out = jax.jit(_small_model().apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert within(rel_err(out, ref), 'logits_rel', f'eval logits small MaxVit {size}px (rel)')


def test_small_maxvit_eval_logits_match_torchvision():
  tmodel = _torch_small()
  _eval_parity(tmodel, _spec_to_flax(state_dict_numpy(tmodel)), SMALL_SIZE, 2)


@pytest.mark.slow
def test_small_maxvit_eval_logits_at_another_size():
  """torchvision fixes the partition grid when the model is built: the same weights built for 64 px
  give the 64 px reference, while the Flax model takes its grid from the input."""
  state_dict = _torch_small().state_dict()
  tmodel = _torch_small(64, seed=1)
  tmodel.load_state_dict(state_dict, strict=True)
  _eval_parity(tmodel, _spec_to_flax(state_dict_numpy(tmodel)), 64, 2)


def test_small_maxvit_train_forward_and_running_stats_match_torch():
  """torch's model.train() (stochastic depth p=0): the logits and the BatchNorm running stats after it."""
  tmodel = _torch_small(stochastic_depth_prob=0.0).train()
  initial = state_dict_numpy(tmodel)
  x = _images(4, SMALL_SIZE, seed=5)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = _small_model(stochastic_depth_prob=0.0)
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      _spec_to_flax(initial), jnp.asarray(nchw_to_nhwc(x)))
  assert within(rel_err(out, ref), 'logits_rel', 'train-mode logits small MaxVit (rel)')
  stats = _spec_to_torch({'batch_stats': jax.device_get(updates['batch_stats'])}, collections=('batch_stats',))
  stats_ref = state_dict_numpy(tmodel)
  worst = max(np.max(np.abs(stats[k] - stats_ref[k]))
              for k in stats if k.endswith(('running_mean', 'running_var')))
  assert within(worst, 'running_stat_abs', 'BN running stats after a train forward small MaxVit (abs)')
  assert not np.allclose(stats['stem.0.1.running_var'], initial['stem.0.1.running_var'])
  for name in stats:   # the relative position indices come back unchanged
    if name.endswith('relative_position_index'):
      assert np.array_equal(stats[name], initial[name]), name


def _grad_err(grads, grads_ref, name):
  """Relative error; MBConv's pre_norm bias has an exactly zero gradient in train mode (a constant
  shift through the 1x1 conv_a that conv_a's BatchNorm removes), so both frameworks return rounding
  noise there: measure it against its pre_norm weight's gradient."""
  if name.endswith('pre_norm.bias'):
    scale = np.max(np.abs(grads_ref[name.replace('.bias', '.weight')]))
    return float(np.max(np.abs(grads[name] - grads_ref[name])) / scale)
  return rel_err(grads[name], grads_ref[name])


@pytest.mark.slow
def test_small_maxvit_train_forward_running_stats_and_float64_gradients_match_torch():
  """torch's model.train() (stochastic depth p=0) in float64: logits, BatchNorm running stats after the
  forward, and the cross-entropy gradient of every parameter."""
  tmodel = _torch_small(stochastic_depth_prob=0.0).double().train()
  initial = state_dict_numpy(tmodel)
  x, labels = _images(4, SMALL_SIZE, seed=5, dtype=np.float64), np.array([0, 3, 4, 2])
  logits_ref = tmodel(torch.from_numpy(x))
  loss_ref = torch.nn.functional.cross_entropy(logits_ref, torch.from_numpy(labels))
  loss_ref.backward()
  grads_ref = {name: p.grad.numpy() for name, p in tmodel.named_parameters()}
  stats_ref = {k: v for k, v in state_dict_numpy(tmodel).items() if k.endswith(('running_mean', 'running_var'))}
  model = _small_model(stochastic_depth_prob=0.0)
  with jax.enable_x64(True):
    variables = _spec_to_flax(initial)

    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                    jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats'],
                                    rngs={'dropout': jax.random.PRNGKey(0)})
      loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))
      return loss, (logits, updates['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
    grads = _spec_to_torch({'params': jax.device_get(grads)}, collections=('params',))
    stats = _spec_to_torch({'batch_stats': jax.device_get(batch_stats)}, collections=('batch_stats',))
  assert within(rel_err(logits, logits_ref.detach().numpy()), 'logits_rel',
                'train-mode logits float64 small MaxVit (rel)')
  worst = max(np.max(np.abs(stats[k] - stats_ref[k])) for k in stats_ref)
  assert within(worst, 'running_stat_abs', 'BN running stats after a float64 train forward small MaxVit (abs)')
  assert set(grads) == set(grads_ref)
  worst, name = max((_grad_err(grads, grads_ref, k), k) for k in grads_ref)
  assert within(worst, 'grad_rel_f64', 'gradients float64, worst tensor small MaxVit (rel)'), name
  assert abs(float(loss) - loss_ref.item()) <= TOL['train_loss_abs_f64']


def test_stochastic_depth_drops_whole_rows_scales_the_rest_and_is_off_in_eval():
  layer = StochasticDepth(0.25)
  x = jnp.ones((8192, 3, 2))
  draw = jax.jit(lambda key: layer.apply({}, x, True, rngs={'dropout': key}))
  first, second = np.asarray(draw(jax.random.PRNGKey(0))), np.asarray(draw(jax.random.PRNGKey(1)))
  assert set(np.unique(first)) == {0.0, np.float32(1 / 0.75)}
  assert all(len(np.unique(row)) == 1 for row in first[:100])     # a sample's branch is kept or dropped whole
  # 8192 rows: 4 standard deviations of the kept fraction is 0.019.
  assert abs((first[:, 0, 0] > 0).mean() - 0.75) < 0.02
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(layer.apply({}, x, False), x)
  np.testing.assert_array_equal(StochasticDepth(0.0).apply({}, x, True), x)   # no rng needed


def _count_primitive(jaxpr, name):
  """How often `name` runs in `jaxpr`, nested calls counted each time they are called."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _count_primitive(sub.jaxpr, name)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _count_primitive(sub, name)
  return count


def test_stochastic_depth_and_dropout_rates_per_layer_are_torchvisions():
  """The rates rise linearly over the layers as torchvision's; in train mode a layer with a rate > 0
  draws five times (MBConv, and attention and MLP of both partition layers), a layer at 0 never, and
  attention / MLP dropout add one draw each per partition layer (counted in the traced computation)."""
  tmodel = _torch_small()
  torch_rates = []
  for block in tmodel.blocks:
    for layer in block.layers:
      mbconv = layer.layers.MBconv.stochastic_depth
      rates = {getattr(mbconv, 'p', 0.0), layer.layers.window_attention.stochastic_dropout.p,
               layer.layers.grid_attention.stochastic_dropout.p}
      assert len(rates) == 1
      torch_rates.append(rates.pop())
  assert maxvit.stochastic_depth_rates(SMALL, SMALL.stochastic_depth_prob) == torch_rates
  with torch.device('meta'):
    big = torchvision.models.maxvit_t()
  assert maxvit.stochastic_depth_rates(maxvit.ARCHS['maxvit_t'], 0.2) == [
      layer.layers.window_attention.stochastic_dropout.p for block in big.blocks for layer in block.layers]

  x = jnp.zeros((2, SMALL_SIZE, SMALL_SIZE, 3))

  def draws(train, **rates):
    model = _small_model(**rates)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=train, rngs={'dropout': jax.random.PRNGKey(0)},
                                                 mutable=['batch_stats']))
    return _count_primitive(jaxpr(variables).jaxpr, 'random_bits')

  layers_above_zero = sum(rate > 0 for rate in torch_rates)
  assert draws(True) == 5 * layers_above_zero
  assert (draws(True, attention_dropout_rate=0.1, mlp_dropout_rate=0.1)
          == 5 * layers_above_zero + 4 * len(torch_rates))
  assert draws(False, attention_dropout_rate=0.1, mlp_dropout_rate=0.1) == 0


def test_small_maxvit_round_trip_is_bit_identical_and_loads_strictly():
  tmodel = _torch_small()
  state_dict = {k: v for k, v in state_dict_numpy(tmodel).items() if not k.endswith('num_batches_tracked')}
  assert [e.torch_name for e in maxvit.spec_name_table(SMALL)] == list(state_dict)
  back = _spec_to_torch(_spec_to_flax(state_dict))
  assert back.keys() == state_dict.keys()
  for name, value in state_dict.items():
    assert np.array_equal(back[name], value) and back[name].shape == value.shape, name
  missing, unexpected = _torch_small(seed=1).load_state_dict({k: torch.from_numpy(v) for k, v in back.items()},
                                                             strict=False)
  assert unexpected == [] and all(k.endswith('num_batches_tracked') for k in missing)


def test_relative_position_index_is_torchvisions():
  for size in (2, 3, 7):
    np.testing.assert_array_equal(maxvit.relative_position_index(size),
                                  tv_maxvit._get_relative_position_index(size, size).numpy())


def _fake_state_dict(arch):
  """torchvision's `arch` built on torch's meta device (no memory, no compute), as zero-stride arrays
  of its tensors' shapes: enough for names and shapes."""
  with torch.device('meta'):
    tmodel = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
  return {k: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), tuple(v.shape), (0,) * v.dim())
          for k, v in tmodel.state_dict().items()}


def test_maxvit_t_round_trip_through_convert_is_bit_identical_and_loads_strictly():
  """Random values in maxvit_t's shapes (no torch model computed) through torch_to_flax and back, then
  loaded strictly into torchvision's maxvit_t on the meta device (names and shapes checked)."""
  rng = np.random.default_rng(0)
  state_dict = {k: (rng.integers(0, 1000, v.shape) if v.dtype.kind == 'i' else
                    rng.standard_normal(v.shape, np.float32))
                for k, v in _fake_state_dict('maxvit_t').items() if not k.endswith('num_batches_tracked')}
  for k in list(state_dict):
    if k.endswith('relative_position_index'):
      state_dict[k] = state_dict[k].astype(np.int64)
  back = flax_to_torch(torch_to_flax(state_dict, 'maxvit_t'), 'maxvit_t')
  for name, value in state_dict.items():
    assert np.array_equal(back[name], value) and back[name].dtype == value.dtype, name
  with torch.device('meta'):
    tmodel = torchvision.models.maxvit_t(num_classes=NUM_CLASSES)
  tmodel.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()}, strict=True, assign=True)


def test_name_table_lists_torchvisions_tensors_with_their_flax_shapes():
  """maxvit_t: the same names in the same order as torchvision's state dict (num_batches_tracked
  aside), each tensor's shape the one its Flax variable takes (abstract init: nothing is computed)."""
  state_dict = {k: v for k, v in _fake_state_dict('maxvit_t').items() if not k.endswith('num_batches_tracked')}
  table = name_table('maxvit_t')
  assert [e.torch_name for e in table] == list(state_dict)
  size = FAMILY.init_size('maxvit_t')
  assert size == torchvision.models.get_model_weights('maxvit_t').DEFAULT.transforms().crop_size[0]
  model = create_model('maxvit_t', NUM_CLASSES)
  flax_shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  for entry in table:
    leaf = flax_shapes[entry.collection]
    for key in entry.path:
      leaf = leaf[key]
    want = {'conv': lambda s: (s[3], s[2], s[0], s[1]), 'linear_w': lambda s: s[::-1]}.get(entry.kind, tuple)
    assert want(tuple(leaf.shape)) == state_dict[entry.torch_name].shape, entry
  assert FAMILY.num_features('maxvit_t') == state_dict['classifier.2.weight'].shape[0]
  assert set(stage_tree(flax_shapes['params']).values()) == set(FAMILY.stages) | {'head'}


def test_conversion_errors_name_the_arch_and_the_tensors():
  with pytest.raises(ConversionError, match='this looks like a maxvit_t state dict'):
    torch_to_flax(_fake_state_dict('maxvit_t'), 'vit_b_16')
  state_dict = _fake_state_dict('maxvit_t')
  index = 'blocks.1.layers.0.layers.grid_attention.attn_layer.1.relative_position_index'
  del state_dict[index]
  state_dict['classifier.5.bias'] = np.zeros(NUM_CLASSES)   # torchvision's last Linear has none
  with pytest.raises(ConversionError,
                     match=rf'missing \(1\): {index}(.|\n)*unexpected \(1\): classifier\.5\.bias'):
    torch_to_flax(state_dict, 'maxvit_t')


def test_stages_freeze_all_but_the_head_and_unfreeze_by_block():
  model = _small_model()
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))['params']
  assert stage_tree(params) == {'stem_0': 'stem', 'stem_1': 'stem', 'blocks_0': 'blocks.0',
                                'classifier_2': 'classifier', 'classifier_3': 'classifier', 'classifier_5': 'head'}
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['classifier_5']
  partial = optim.trainable_mask(params, ['blocks.0', 'classifier', 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['blocks_0', 'classifier_2', 'classifier_3', 'classifier_5']
  features = optim.trainable_mask(params, ['features'])
  assert all(features[k] == k.startswith(('stem', 'blocks')) for k in params)
  assert all(optim.trainable_mask(params, 'finetune').values())
  assert maxvit.stage_of('features_3') is None and maxvit.stage_of('classifier_6') is None


def test_create_model_refuses_unknown_archs_options_and_sizes_the_partitions_do_not_divide():
  with pytest.raises(ValueError, match='unknown arch'):
    maxvit.create_model('maxvit_s', 3)
  with pytest.raises(ValueError, match='fast_backward'):
    maxvit.create_model('maxvit_t', 3, fast_backward=True)
  model = _small_model()
  with pytest.raises(ValueError, match=r'Input size \(5, 5\) of block 0 is not divisible by partition size 2'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 20, 20, 3))))
  with pytest.raises(ValueError, match='not divisible by partition size 7'):
    jax.eval_shape(lambda: create_model('maxvit_t', 3).init(jax.random.PRNGKey(0), jnp.zeros((1, 192, 192, 3))))


@pytest.mark.slow
def test_small_maxvit_bfloat16_logits_stay_close():
  tmodel = _torch_small().eval()
  x = _images(2, SMALL_SIZE)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  out = jax.jit(_small_model(dtype=jnp.bfloat16).apply)(_spec_to_flax(state_dict_numpy(tmodel)),
                                                         jnp.asarray(nchw_to_nhwc(x)))
  assert out.dtype == jnp.float32
  assert within(rel_err(out, ref), 'bf16_logits_rel', 'bfloat16 eval logits small MaxVit (rel)')


@pytest.mark.slow
def test_maxvit_t_eval_logits_and_round_trip():
  """maxvit_t at 224 px, batch 2: eval logits, then the conversion back bit-identical and loadable strictly."""
  torch.manual_seed(0)
  tmodel = _randomise(torchvision.models.maxvit_t(num_classes=NUM_CLASSES)).eval()
  x = _images(2, 224)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  state_dict = state_dict_numpy(tmodel)
  variables = torch_to_flax(state_dict, 'maxvit_t')
  out = jax.jit(create_model('maxvit_t', NUM_CLASSES).apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert within(rel_err(out, ref), 'logits_rel', 'eval logits maxvit_t 224px (rel)')
  back = flax_to_torch(variables, 'maxvit_t')
  for name, value in state_dict.items():
    if not name.endswith('num_batches_tracked'):
      assert np.array_equal(back[name], value), name
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
