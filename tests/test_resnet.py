"""Flax ResNets against torchvision's, computed in the test on the same weights and inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax.convert import flax_to_torch, name_table, torch_to_flax
from tl_jax.models import create_model, init_variables

torch = pytest.importorskip('torch')

NUM_CLASSES = 7


def _pair(arch, seed=0):
  tmodel = random_torchvision_model(arch, NUM_CLASSES, seed)
  model = create_model(arch, NUM_CLASSES)
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  return tmodel, model, variables


def _images(batch, size, seed=1):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34'])
def test_eval_logits_and_stage_activations(arch):
  tmodel, model, variables = _pair(arch)
  tmodel.eval()
  x = _images(2, 224)

  captured = {}
  hooks = [getattr(tmodel, name).register_forward_hook(
      lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().numpy()))
           for name in ('maxpool', 'layer1', 'layer2', 'layer3', 'layer4')]
  with torch.no_grad():
    logits_ref = tmodel(torch.from_numpy(x)).numpy()
  for h in hooks:
    h.remove()

  features, stages = model.apply(variables, jnp.asarray(nchw_to_nhwc(x)), train=False,
                                 return_stages=True, method='features')
  logits = model.apply(variables, features, method='head')

  assert within(rel_err(logits, logits_ref), 'logits_rel', f'eval logits {arch} (rel)')
  for ours, theirs in [('stem', 'maxpool'), ('layer1', 'layer1'), ('layer2', 'layer2'),
                       ('layer3', 'layer3'), ('layer4', 'layer4')]:
    ref = nchw_to_nhwc(captured[theirs])
    assert stages[ours].shape == ref.shape, ours
    assert within(rel_err(stages[ours], ref), 'activation_rel', f'eval {ours} activations {arch} (rel)'), ours
  # Full __call__ is features + head.
  assert rel_err(model.apply(variables, jnp.asarray(nchw_to_nhwc(x))), logits_ref) <= TOL['logits_rel']


@pytest.mark.slow
def test_bottleneck_resnet50_eval_logits():
  tmodel, model, variables = _pair('resnet50')
  tmodel.eval()
  x = _images(2, 96)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  assert within(rel_err(model.apply(variables, jnp.asarray(nchw_to_nhwc(x))), ref),
                'logits_rel', 'eval logits resnet50 (rel)')


def _torch_running_stats(tmodel):
  return {k: v.numpy().copy() for k, v in tmodel.state_dict().items()
          if k.endswith('running_mean') or k.endswith('running_var')}


def _flax_running_stats(batch_stats, arch):
  """batch_stats leaves under their torch names, through the conversion's name table."""
  out = {}
  for entry in name_table(arch):
    if entry.collection == 'batch_stats':
      value = batch_stats
      for key in entry.path:
        value = value[key]
      out[entry.torch_name] = np.asarray(value)
  return out


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34'])
def test_train_mode_forward_updates_running_stats_like_torch(arch):
  tmodel, model, variables = _pair(arch)
  tmodel.train()
  x = _images(4, 64)
  with torch.no_grad():
    out_ref = tmodel(torch.from_numpy(x)).numpy()
  out, updates = model.apply(variables, jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats'])
  assert within(rel_err(out, out_ref), 'logits_rel', f'train-mode logits {arch} (rel)')

  ref_stats = _torch_running_stats(tmodel)
  ours = _flax_running_stats(updates['batch_stats'], arch)
  assert ref_stats.keys() == ours.keys()
  worst = max(np.max(np.abs(ours[k] - ref_stats[k])) for k in ref_stats)
  assert within(worst, 'running_stat_abs', f'BN running stats after a train forward {arch} (abs)')
  # The update must have happened (guards against comparing two untouched copies).
  before = state_dict_numpy(random_torchvision_model(arch, NUM_CLASSES, 0))
  assert not np.allclose(before['layer4.0.bn1.running_var'], ours['layer4.0.bn1.running_var'])


def test_masked_batch_norm_equals_torch_on_the_smaller_batch():
  """A padded batch with mask=False rows normalises as torch does the valid rows alone."""
  arch = 'resnet18'
  tmodel, model, variables = _pair(arch)
  tmodel.train()
  x = _images(4, 64)
  with torch.no_grad():
    out_ref = tmodel(torch.from_numpy(x[:3])).numpy()
  padded = x.copy()
  padded[3] = 123.0  # garbage in the padding row must not leak into the statistics
  mask = jnp.asarray([True, True, True, False])
  out, updates = model.apply(variables, jnp.asarray(nchw_to_nhwc(padded)), train=True, mask_b=mask,
                             mutable=['batch_stats'])
  assert within(rel_err(np.asarray(out)[:3], out_ref), 'logits_rel', 'masked train-mode logits (rel)')
  ref_stats = _torch_running_stats(tmodel)
  ours = _flax_running_stats(updates['batch_stats'], arch)
  assert within(max(np.max(np.abs(ours[k] - ref_stats[k])) for k in ref_stats), 'running_stat_abs',
                'masked BN running stats (abs)')


@pytest.mark.parametrize('arch', ['resnet18', pytest.param('resnet34', marks=pytest.mark.slow)])
def test_cross_entropy_gradients_match_torch(arch):
  tmodel, model, variables = _pair(arch)
  tmodel.train()
  x = _images(4, 64)
  labels = np.array([0, 3, 6, 2])
  loss_ref = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(labels))
  loss_ref.backward()
  grads_ref = {name: p.grad.numpy() for name, p in tmodel.named_parameters()}

  def loss_fn(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                            jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats'])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], axis=1))

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  assert within(abs(float(loss) - loss_ref.item()), 'train_loss_abs', f'train-mode CE loss {arch} (abs)')

  grads_torch_layout = flax_to_torch({'params': grads, 'batch_stats': variables['batch_stats']}, arch)
  checked = 0
  for entry in name_table(arch):
    if entry.collection != 'params':
      continue
    err = rel_err(grads_torch_layout[entry.torch_name], grads_ref[entry.torch_name])
    assert within(err, 'grad_rel', f'gradients float32, worst tensor {arch} (rel)'), (entry.torch_name, err)
    checked += 1
  assert checked == len(grads_ref)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34'])
@pytest.mark.slow
def test_cross_entropy_gradients_match_torch_in_float64(arch):
  """Float64 in both frameworks: only an algorithmic difference could show.

  In float32, torch's own gradients differed from its float64 ones by up to ~2e-2 relative on
  some tensors (measured): a ReLU input within float32 rounding of 0 can take the other branch
  (see test_vgg's float32 test), so float32 alone cannot tell a bug from rounding everywhere.
  """
  tmodel = random_torchvision_model(arch, NUM_CLASSES).double()
  tmodel.train()
  x = np.random.default_rng(5).standard_normal((4, 3, 64, 64))
  labels = np.array([0, 3, 6, 2])
  torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
  grads_ref = {name: p.grad.numpy() for name, p in tmodel.named_parameters()}
  model = create_model(arch, NUM_CLASSES)
  with jax.enable_x64(True):
    variables = torch_to_flax(state_dict_numpy(tmodel), arch)

    def loss_fn(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))

    grads = jax.device_get(jax.grad(loss_fn)(variables['params']))
  grads_torch_layout = flax_to_torch({'params': grads, 'batch_stats': variables['batch_stats']}, arch)
  worst = max(rel_err(grads_torch_layout[k], grads_ref[k]) for k in grads_ref)
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {arch} (rel)'), worst


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_stats_and_logits():
  """dtype=bfloat16: convs and fc in bf16; params, BN statistics and logits stay float32, near f32's."""
  tmodel, model, variables = _pair('resnet18')
  tmodel.eval()
  x = nchw_to_nhwc(_images(4, 64))
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(np.transpose(x, (0, 3, 1, 2)))).numpy()
  bf16 = create_model('resnet18', NUM_CLASSES, dtype=jnp.bfloat16)
  logits = bf16.apply(variables, jnp.asarray(x), train=False)
  assert logits.dtype == jnp.float32
  assert within(rel_err(logits, ref), 'bf16_logits_rel', 'bf16 eval logits vs torch float32 (rel)')
  assert rel_err(logits, model.apply(variables, jnp.asarray(x), train=False)) <= TOL['bf16_logits_rel']
  # bf16 really computes in bf16 (else the test above would prove nothing).
  assert rel_err(logits, ref) > 1e-5

  fresh = jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}
  _, updates = bf16.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_bfloat16_training_lowers_the_loss():
  import functools


  from tl_jax import optim
  from tl_jax.training import create_train_state, train_step
  model = create_model('resnet18', 2, dtype=jnp.bfloat16)
  variables = init_variables(model, jax.random.PRNGKey(0), image_size=32)
  tx = optim.make_optimizer(variables['params'], 'finetune', {'name': 'sgd'}, 0.01)
  state = create_train_state(model, variables, tx)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 8).astype(np.int32)
  # Learnable: the class shifts the images' mean.
  images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32) + labels[:, None, None, None]
  batch = {'images': images, 'labels': labels, 'mask': np.ones(8, bool)}
  trainable = optim.trainable_mask(state.params, 'finetune')
  step = jax.jit(functools.partial(train_step, model=model, trainable=trainable, bn_train=True))
  losses = []
  for _ in range(8):
    state, sums = step(state, batch)
    losses.append(float(sums['loss_sum'] / sums['count']))
  assert losses[-1] < 0.5 * losses[0], losses
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(jnp.float32)}
def test_fast_weight_gradients_keep_names_and_shapes():
  """fast_backward changes how gradients are computed, never the variables (checkpoints, convert)."""
  shapes = [jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), jax.eval_shape(
      lambda: create_model('resnet50', NUM_CLASSES, fast_backward=fast).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))) for fast in (True, False)]
  assert shapes[0] == shapes[1]


@pytest.mark.slow
def test_fast_backward_gradients_equal_the_plain_ones_in_float64(monkeypatch):
  from tl_jax.models import fast_conv, resnet
  calls = []
  for module, name in ((fast_conv, 'conv2d'), (resnet, 'max_pool')):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
  model_plain, model_fast = (create_model('resnet18', NUM_CLASSES, fast_backward=f) for f in (False, True))
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32, 32, 3)))
    variables = model_plain.init(jax.random.PRNGKey(0), x, train=False)

    def grads(model):
      def loss(params):
        logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
                                mutable=['batch_stats'])
        return jnp.sum(jnp.sin(logits))
      return jax.grad(loss)(variables['params'])

    g_plain, g_fast = grads(model_plain), grads(model_fast)
    worst = max(rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_plain)))
  assert within(worst, 'grad_rel_f64', 'fast_backward vs plain gradients float64, worst tensor (rel)'), worst
  assert calls.count('conv2d') >= 20 and 'max_pool' in calls  # the fast model took the conv rewrites


# The Bottleneck variants: ResNet-152, ResNeXt (grouped 3x3 convs) and the wide ResNets.
NEW_ARCHS = ('resnet152', 'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d', 'wide_resnet50_2',
             'wide_resnet101_2')


def _param_shapes(arch):
  """init's {'params', 'batch_stats'} shapes (traced, not compiled)."""
  model = create_model(arch, NUM_CLASSES)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))


def _eval_parity(arch, size, batch):
  tmodel, model, variables = _pair(arch)
  tmodel.eval()
  x = _images(batch, size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  del tmodel
  logits = jax.jit(model.apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert within(rel_err(logits, ref), 'logits_rel', f'eval logits {arch} {size}px (rel)')


@pytest.mark.parametrize('arch', [pytest.param(a, marks=pytest.mark.slow) for a in NEW_ARCHS])
def test_bottleneck_variants_eval_logits_at_the_native_crop_size(arch):
  import torchvision
  size = torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]
  _eval_parity(arch, size, 1)


@pytest.mark.slow
def test_resnext_eval_logits_at_a_small_size():
  """resnext50_32x4d's grouped 3x3 convs (32 groups) at 64 px."""
  _eval_parity('resnext50_32x4d', 64, 2)


@pytest.mark.parametrize('arch', ['resnext50_32x4d'] + [pytest.param(a, marks=pytest.mark.slow)
                                                       for a in NEW_ARCHS if a != 'resnext50_32x4d'])
def test_bottleneck_variants_conversion_round_trip(arch):
  """torch -> Flax -> torch bit-identical and strictly loadable; Flax's shapes (grouped kernels
  (3, 3, width / groups, width), wide inner widths) are torch's."""
  import torchvision
  tmodel = random_torchvision_model(arch, NUM_CLASSES)
  state_dict = state_dict_numpy(tmodel)
  assert [e.torch_name for e in name_table(arch)] == [k for k in state_dict if not k.endswith('num_batches_tracked')]
  variables = torch_to_flax(state_dict, arch, reference=_param_shapes(arch))
  back = flax_to_torch(variables, arch)
  assert back.keys() == state_dict.keys()
  for name, value in state_dict.items():
    assert np.array_equal(back[name], value), name
  fresh = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_a_resnext_state_dict_does_not_load_into_resnet50():
  """resnet50, resnext50_32x4d and wide_resnet50_2 share every tensor name; the shapes tell them apart."""
  from tl_jax.convert import ConversionError
  state_dict = state_dict_numpy(random_torchvision_model('resnext50_32x4d', NUM_CLASSES))
  with pytest.raises(ConversionError, match=r'wrong shape .*\n.*layer1.0.conv1.weight: file has \(128, 64, 1, 1\), '
                                            r'resnet50 needs \(64, 64, 1, 1\)'):
    torch_to_flax(state_dict, 'resnet50', reference=_param_shapes('resnet50'))


@pytest.mark.slow
def test_resnet152_state_dict_is_named_when_given_to_resnet101():
  from tl_jax.convert import ConversionError
  state_dict = state_dict_numpy(random_torchvision_model('resnet152', NUM_CLASSES))
  with pytest.raises(ConversionError, match='looks like a resnet152 state dict'):
    torch_to_flax(state_dict, 'resnet101')


@pytest.mark.slow
def test_resnext_gradients_match_torch_in_float64():
  """Train-mode cross-entropy gradients through grouped convs (fast_backward's default: they take
  lax's own gradients) equal torch's in float64."""
  arch = 'resnext50_32x4d'
  tmodel = random_torchvision_model(arch, NUM_CLASSES).double()
  tmodel.train()
  x = np.random.default_rng(5).standard_normal((2, 3, 64, 64))
  labels = np.array([0, 3])
  torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
  grads_ref = {name: p.grad.numpy() for name, p in tmodel.named_parameters()}
  model = create_model(arch, NUM_CLASSES)
  with jax.enable_x64(True):
    variables = torch_to_flax(state_dict_numpy(tmodel), arch)

    def loss_fn(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              jnp.asarray(nchw_to_nhwc(x)), train=True, mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))

    grads = jax.device_get(jax.jit(jax.grad(loss_fn))(variables['params']))
  grads_torch_layout = flax_to_torch({'params': grads, 'batch_stats': variables['batch_stats']}, arch)
  worst, name = max((rel_err(grads_torch_layout[k], grads_ref[k]), k) for k in grads_ref)
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor {arch} (rel)'), name
