"""Flax Swin Transformers (V1 and V2) against torchvision's, computed in the test on the same weights and inputs.

The default tier runs small SwinTransformer(...) configurations built from torchvision's own class (the
real archs take tens of seconds to compile on a CPU); the slow tier runs every torchvision arch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, guess_arch, name_table, torch_to_flax
from tl_jax.models import create_model, init_variables, stage_tree
from tl_jax.models import swin
from tl_jax.models.swin import ARCHS, FAMILY, SwinBlock, SwinSpec, SwinTransformer
from tl_jax.training import create_train_state, train_step

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
from torchvision.models import swin_transformer as tv_swin  # noqa: E402

NUM_CLASSES = 5
# Two stages of window 4. At 36x16 px the 9x4 map is padded to 12x4 and shifted down only (the window
# covers its width: torch's mask then splits rows alone), patch merging pads it to 10x4, and the 5x2 map
# is padded to 8x4 and shifted down only too. At 28 px the 7x7 map is padded to 8x8 and shifted both
# ways, and the 4x4 map after merging is not shifted at all. At 36 px both stages pad and shift both ways.
SMALL = {'v1': SwinSpec((4, 4), 16, (2, 2), (1, 2), (4, 4), 0.1),
         'v2': SwinSpec((4, 4), 16, (2, 2), (1, 2), (4, 4), 0.1, v2=True)}


def _images(batch, size, seed=1, dtype=np.float32):
  """NCHW images, `size` square or (height, width)."""
  height, width = (size, size) if np.isscalar(size) else size
  return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(dtype)


def _randomise(tmodel, seed=0):
  """LayerNorm affine params, bias tables, V2's cpb_mlp, logit scales (some above the clamp at log 100)
  and attention biases away from their init (ones, zeros, near-zero, all equal), which would hide a
  wrong mapping of them."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in tmodel.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
        module.bias.copy_(torch.rand(module.bias.shape, generator=gen) - 0.5)
    for name, p in tmodel.named_parameters():
      if name.endswith('logit_scale'):
        p.copy_(torch.rand(p.shape, generator=gen) * 3.5 + 2.0)
      elif name.endswith(('relative_position_bias_table', 'qkv.bias', 'proj.bias')) or 'cpb_mlp' in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
  return tmodel


def _torch_small(spec, num_classes=NUM_CLASSES, stochastic_depth_prob=None, seed=0):
  """torchvision's SwinTransformer class with `spec`'s arguments."""
  torch.manual_seed(seed)
  kwargs = {'block': tv_swin.SwinTransformerBlockV2, 'downsample_layer': tv_swin.PatchMergingV2} if spec.v2 else {}
  p = spec.stochastic_depth_prob if stochastic_depth_prob is None else stochastic_depth_prob
  tmodel = tv_swin.SwinTransformer(list(spec.patch_size), spec.embed_dim, list(spec.depths), list(spec.num_heads),
                                   list(spec.window_size), stochastic_depth_prob=p, num_classes=num_classes, **kwargs)
  return _randomise(tmodel, seed)


def _random_swin(arch, num_classes=NUM_CLASSES, seed=0):
  return _randomise(random_torchvision_model(arch, num_classes, seed), seed)


# convert.py's layouts: torch's OIHW conv weights are HWIO kernels, Linear weights transposed.
_TO_FLAX = {'conv': (2, 3, 1, 0), 'linear_w': (1, 0)}
_TO_TORCH = {'conv': (3, 2, 0, 1), 'linear_w': (1, 0)}


def _spec_to_flax(state_dict, spec):
  """torch_to_flax for a configuration no arch name stands for: its name table, convert's layouts."""
  variables = {'params': {}, 'batch_stats': {}}
  for entry in swin.spec_name_table(spec):
    value = np.asarray(state_dict[entry.torch_name])
    if entry.kind in _TO_FLAX:
      value = np.ascontiguousarray(np.transpose(value, _TO_FLAX[entry.kind]))
    tree = variables[entry.collection]
    for key in entry.path[:-1]:
      tree = tree.setdefault(key, {})
    tree[entry.path[-1]] = value
  return variables


def _spec_params_to_torch(params, spec):
  """A 'params' tree (gradients) of `spec` by torch name, in torch's layouts."""
  out = {}
  for entry in swin.spec_name_table(spec):
    if entry.collection != 'params':
      continue
    value = params
    for key in entry.path:
      value = value[key]
    value = np.asarray(value)
    out[entry.torch_name] = np.transpose(value, _TO_TORCH[entry.kind]) if entry.kind in _TO_TORCH else value
  return out


def test_buffers_are_torchs():
  """The relative position index and V2's log-spaced coordinates table equal torch's buffers exactly."""
  for window in ((4, 4), (7, 7), (8, 8), (4, 6)):
    attn = tv_swin.ShiftedWindowAttentionV2(8, list(window), [0, 0], 1)
    np.testing.assert_array_equal(swin.relative_position_index(window), attn.relative_position_index.numpy())
    np.testing.assert_array_equal(swin.relative_coords_table(window), attn.relative_coords_table.numpy())


@pytest.mark.parametrize('version, size', [('v1', (36, 16)), ('v2', (28, 28))])
def test_small_config_eval_logits_match_torchvision(version, size):
  spec = SMALL[version]
  tmodel = _torch_small(spec).eval()
  x = _images(2, size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = SwinTransformer(num_classes=NUM_CLASSES, spec=spec)
  variables = _spec_to_flax(state_dict_numpy(tmodel), spec)
  forward = jax.jit(lambda v, x: model.apply(v, x))
  logits = forward(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert within(rel_err(logits, ref), 'logits_rel', f'eval logits small swin {version} {size[0]}x{size[1]}px (rel)')
  # Stochastic depth is off in eval mode: no rng needed, the same logits twice.
  np.testing.assert_array_equal(logits, forward(variables, jnp.asarray(nchw_to_nhwc(x))))


def _float64_gradients(spec, size):
  """Train-mode logits and cross-entropy gradients of `spec` (stochastic depth p=0) in float64, ours and torch's."""
  tmodel = _torch_small(spec, stochastic_depth_prob=0.0).double().train()
  x, labels = _images(2, size, seed=5, dtype='float64'), np.array([0, 3])
  logits_ref = tmodel(torch.from_numpy(x))
  torch.nn.functional.cross_entropy(logits_ref, torch.from_numpy(labels)).backward()
  grads_ref = {name: p.grad.numpy().copy() for name, p in tmodel.named_parameters()}
  state_dict = state_dict_numpy(tmodel)
  model = SwinTransformer(num_classes=NUM_CLASSES, stochastic_depth_prob=0.0, spec=spec)
  with jax.enable_x64(True):
    variables = _spec_to_flax(state_dict, spec)

    def loss_fn(params):
      logits = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                           jnp.asarray(nchw_to_nhwc(x)), train=True)
      loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))
      return loss, logits

    (_, logits), grads = jax.device_get(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params']))
  return logits, logits_ref.detach().numpy(), _spec_params_to_torch(grads, spec), grads_ref


@pytest.mark.slow
@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_small_config_train_mode_logits_and_float64_gradients_match_torch(version):
  """36 px, padded and shifted windows in both stages, odd patch merging; V2 adds cosine attention with
  logit scales on both sides of the clamp, cpb_mlp, the zeroed key bias and post-norm residuals."""
  spec = SMALL[version]
  logits, logits_ref, grads, grads_ref = _float64_gradients(spec, 36)
  assert within(rel_err(logits, logits_ref), 'logits_rel', f'train-mode logits small swin {version} float64 (rel)')
  assert set(grads) == set(grads_ref)
  worst, name = max((rel_err(grads[k], grads_ref[k]), k) for k in grads_ref)
  assert within(worst, 'grad_rel_f64', f'gradients float64, worst tensor small swin {version} (rel)'), (name, worst)
  if spec.v2:
    # The key third of qkv.bias is zeroed before use: no gradient there, in torch and here.
    bias = grads['features.1.0.attn.qkv.bias']
    assert not np.any(bias[16:32]) and np.any(bias[:16])


def test_stochastic_depth_rates_rise_linearly_as_torchs():
  spec = SMALL['v2']
  tmodel = _torch_small(spec)
  torch_rates = [m.stochastic_depth.p for m in tmodel.modules() if isinstance(m, tv_swin.SwinTransformerBlock)]
  model = SwinTransformer(num_classes=NUM_CLASSES, spec=spec)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  bound = model.bind(variables)
  ours = [block.stochastic_depth_prob for s in (1, 3) for block in getattr(bound, f'features_{s}').blocks]
  assert ours == torch_rates and ours[-1] == pytest.approx(spec.stochastic_depth_prob) and ours[0] == 0.0


def test_stochastic_depth_drops_whole_rows_scales_and_is_off_in_eval():
  """One block with p=0.5 on 1024 equal rows: a row equals its input exactly when both residual
  branches were dropped (p^2 = 0.25); a kept branch is scaled by 2; eval mode keeps both, unscaled."""
  p, rows = 0.5, 1024
  block = SwinBlock(8, 2, (4, 4), (0, 0), stochastic_depth_prob=p)
  x = jnp.broadcast_to(jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 8)), jnp.float32),
                       (rows, 4, 4, 8))
  # Random values in the shapes init gives (init itself compiles a random draw per tensor: slow on CPU).
  shapes = jax.eval_shape(block.init, jax.random.PRNGKey(0), x[:1])
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(lambda s: 0.5 * rng.standard_normal(s.shape, np.float32), shapes['params'])
  variables = {'params': params,
               'batch_stats': {'attn': {'relative_position_index': swin.relative_position_index((4, 4))}}}

  def branches(m, x):
    """Two train-mode draws, eval mode, the attention branch and the whole block in eval mode on one row."""
    draws = [m(x, train=True) for _ in range(2)]
    attn = m.attn(m.norm1(x[:1]))
    h = x[:1] + attn
    return draws, m(x), attn, h + m.mlp(m.norm2(h), False)

  (first, second), evaluated, attn, full = jax.device_get(jax.jit(lambda key: block.apply(
      variables, x, method=branches, rngs={'dropout': key}))(jax.random.PRNGKey(1)))
  x = np.asarray(x)
  unchanged = np.all(first == x, axis=(1, 2, 3))
  assert abs(unchanged.mean() - p * p) < 4 * np.sqrt(p * p * (1 - p * p) / rows)
  assert not np.array_equal(first, second)
  # Attention kept, MLP dropped: x + attn / (1 - p).
  assert np.any(np.all(np.abs(first - (x + 2 * attn)) <= 1e-5, axis=(1, 2, 3)))
  np.testing.assert_allclose(evaluated, np.broadcast_to(full, evaluated.shape), rtol=1e-6, atol=1e-6)


def _random_state_dict(arch, seed=0):
  """Random tensors of the names, shapes and dtypes of torchvision's `arch` (buffers too), and that
  model built without drawing its weights (meta tensors), for a strict load_state_dict."""
  with torch.device('meta'):
    tmodel = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
  rng = np.random.default_rng(seed)
  state_dict = {k: (rng.standard_normal(v.shape, np.float32) if v.is_floating_point()
                    else rng.integers(0, 1000, v.shape).astype(np.int64)) for k, v in tmodel.state_dict().items()}
  return state_dict, tmodel


def _assert_round_trip(arch, state_dict, tmodel, assign):
  names = [e.torch_name for e in name_table(arch)]
  assert sorted(names) == sorted(state_dict) and len(set(names)) == len(names)
  assert 'features.1.0.attn.relative_position_index' in names
  variables = torch_to_flax(state_dict, arch)
  for back in (flax_to_torch(variables, arch), flax_to_torch(jax.device_put(variables), arch)):
    # Through JAX arrays, the int64 relative_position_index comes back as int32 (no x64): same values.
    assert sorted(back) == sorted(state_dict)
    for name, value in state_dict.items():
      assert np.array_equal(back[name], value), name
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True, assign=assign)


@pytest.mark.parametrize('arch', ['swin_t', 'swin_v2_t'])
def test_conversion_round_trip_of_random_tensors_is_bit_identical_and_loads_strictly(arch):
  state_dict, tmodel = _random_state_dict(arch)
  _assert_round_trip(arch, state_dict, tmodel, assign=True)


@pytest.mark.slow
@pytest.mark.parametrize('arch', list(ARCHS))
def test_conversion_round_trip_of_torchvision_models_is_bit_identical_and_loads_strictly(arch):
  tmodel = _random_swin(arch)
  _assert_round_trip(arch, state_dict_numpy(tmodel), tmodel, assign=False)


def _meta_state_dict(arch, num_classes=NUM_CLASSES):
  """Zeros of the shapes of torchvision's `arch` state dict, without drawing its weights."""
  with torch.device('meta'):
    tmodel = getattr(torchvision.models, arch)(num_classes=num_classes)
  return {k: np.zeros(v.shape, np.float32) for k, v in tmodel.state_dict().items()}


def test_conversion_errors_name_the_arch_or_the_tensors():
  with pytest.raises(ConversionError, match='this looks like a swin_t state dict'):
    torch_to_flax(_meta_state_dict('swin_t'), 'swin_v2_t')
  with pytest.raises(ConversionError, match='this looks like a swin_v2_t state dict'):
    torch_to_flax(_meta_state_dict('swin_v2_t'), 'swin_t')
  missing = _meta_state_dict('swin_t')
  del missing['features.3.1.attn.relative_position_index']
  missing['features.9.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match=r'(?s)missing \(1\): features\.3\.1\.attn\.relative_position_index'
                                            r'.*unexpected \(1\): features\.9\.weight'):
    torch_to_flax(missing, 'swin_t')


@pytest.mark.slow
def test_conversion_tells_archs_of_the_same_names_apart_by_their_shapes():
  """swin_s and swin_b (and their V2s) have the same names: only the shapes, the model's against the
  file's, tell them apart."""
  assert guess_arch(_meta_state_dict('swin_s')) == 'swin_s'
  assert guess_arch(_meta_state_dict('swin_v2_b')) == 'swin_v2_b'
  model = create_model('swin_b', NUM_CLASSES)
  reference = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  with pytest.raises(ConversionError, match=r'features\.0\.0\.weight: file has \(96, 3, 4, 4\), swin_b needs '
                                            r'\(128, 3, 4, 4\)'):
    torch_to_flax(_meta_state_dict('swin_s'), 'swin_b', reference=reference)


def test_stages_and_frozen_mask_train_only_the_head():
  # Any four-stage configuration has the real archs' top-level names; one block a stage traces fast.
  model = SwinTransformer(num_classes=NUM_CLASSES, spec=SwinSpec((4, 4), 8, (1, 1, 1, 1), (1, 1, 1, 1), (4, 4), 0.1))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))['params']
  assert set(params) == {e.path[0] for e in name_table('swin_v2_t')}
  tree = stage_tree(params)
  assert tree == {**{f'features_{i}': f'features.{i}' for i in range(8)}, 'norm': 'norm', 'head': 'head'}
  assert tuple(v for v in tree.values() if v != 'head') == FAMILY.stages
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['head']
  partial = optim.trainable_mask(params, ['features.7', 'norm', 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['features_7', 'head', 'norm']
  assert all(optim.trainable_mask(params, 'finetune').values())
  assert FAMILY.stage_of('classifier_1') is None and FAMILY.stage_of('layer1_0') is None


def test_create_model_refuses_unknown_archs_and_fast_backward():
  with pytest.raises(ValueError, match='unknown arch'):
    swin.create_model('swin_l', 3)
  with pytest.raises(ValueError, match='fast_backward'):
    swin.create_model('swin_t', 3, fast_backward=True)
  assert swin.create_model('swin_v2_b', 3).num_classes == 3
  assert {a: FAMILY.num_features(a) for a in ARCHS} == {'swin_t': 768, 'swin_s': 768, 'swin_b': 1024,
                                                        'swin_v2_t': 768, 'swin_v2_s': 768, 'swin_v2_b': 1024}


@pytest.mark.slow
def test_bfloat16_logits_stay_close_to_float32():
  spec = SMALL['v2']
  variables = _spec_to_flax(state_dict_numpy(_torch_small(spec).eval()), spec)
  x = jnp.asarray(nchw_to_nhwc(_images(2, 36)))
  ref = jax.jit(SwinTransformer(num_classes=NUM_CLASSES, spec=spec).apply)(variables, x)
  out = jax.jit(SwinTransformer(num_classes=NUM_CLASSES, spec=spec, dtype=jnp.bfloat16).apply)(variables, x)
  assert out.dtype == jnp.float32
  assert within(rel_err(out, ref), 'bf16_logits_rel', 'bf16 vs float32 logits small swin v2 (rel)')


def _native_size(arch):
  return torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]


@pytest.mark.slow
@pytest.mark.parametrize('arch, sizes', [('swin_t', (224, 256)), ('swin_s', (224,)), ('swin_b', (224,)),
                                         ('swin_v2_t', (256, 224)), ('swin_v2_s', (256,)), ('swin_v2_b', (256,))])
def test_eval_logits_match_torchvision_at_native_and_other_sizes(arch, sizes):
  """The native crop first; swin_t at 256 px pads every stage's map (64, 32, 16, 8 to multiples of 7),
  swin_v2_t at 224 px the three last ones (28, 14, 7 to multiples of 8)."""
  assert sizes[0] == _native_size(arch)
  tmodel = _random_swin(arch).eval()
  model = create_model(arch, NUM_CLASSES)
  variables = torch_to_flax(state_dict_numpy(tmodel), arch)
  forward = jax.jit(lambda v, x: model.apply(v, x))
  for size in sizes:
    x = _images(1, size)
    with torch.no_grad():
      ref = tmodel(torch.from_numpy(x)).numpy()
    assert within(rel_err(forward(variables, jnp.asarray(nchw_to_nhwc(x))), ref), 'logits_rel',
                  f'eval logits {arch} {size}px (rel)')


@pytest.mark.slow
def test_init_variables_match_torchs_shapes_and_buffers():
  for arch in ('swin_t', 'swin_v2_t'):
    variables = init_variables(create_model(arch, NUM_CLASSES), jax.random.PRNGKey(0))
    ours = flax_to_torch(variables, arch)
    theirs = _meta_state_dict(arch)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    with torch.device('cpu'):
      attn = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES).features[1][0].attn
    for name, buffer in attn.named_buffers():
      np.testing.assert_array_equal(ours[f'features.1.0.attn.{name}'], buffer.numpy())


@pytest.mark.slow
def test_train_step_learns_and_keeps_the_buffers():
  """The library's train step on a small V2 with stochastic depth: the buffers in 'batch_stats' come
  back unchanged, the params move, and each step drops other rows (lr 0 keeps the weights equal)."""
  spec = SMALL['v2']
  model = SwinTransformer(num_classes=2, stochastic_depth_prob=0.5, spec=spec)
  variables = _spec_to_flax(state_dict_numpy(_torch_small(spec, num_classes=2)), spec)
  batch = {'images': jnp.asarray(nchw_to_nhwc(_images(4, 32))), 'labels': jnp.asarray([0, 1, 1, 0]),
           'mask': jnp.ones(4, bool)}

  def two_steps(lr):
    state = create_train_state(model, variables, optax.sgd(lr), jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_step, model=model, bn_train=True,
                                     trainable=optim.trainable_mask(state.params, 'finetune')))
    next_state, first = step(state, batch)
    _, second = step(next_state, batch)
    buffers = jax.tree_util.tree_leaves_with_path(next_state.batch_stats)
    assert len(buffers) == sum(e.collection == 'batch_stats' for e in swin.spec_name_table(spec))
    for path, value in buffers:
      assert np.array_equal(value, _at(variables['batch_stats'], path)), path
    moved = [not np.array_equal(_at(next_state.params, path), _at(state.params, path))
             for path in (('features_0', '0', 'kernel'), ('head', 'kernel'))]
    return moved, float(first['loss_sum']), float(second['loss_sum'])

  moved, first, _ = two_steps(0.1)
  assert all(moved)
  moved_at_0, first_at_0, second_at_0 = two_steps(0.0)
  assert not any(moved_at_0)
  assert first_at_0 == first         # the same state and rng drop the same rows
  assert second_at_0 != first_at_0   # the next step's rng drops others


def _at(tree, path):
  """The leaf at a tuple of names or of tree_util's DictKeys."""
  for key in path:
    tree = tree[getattr(key, 'key', key)]
  return tree
