"""Flax Vision Transformers against torchvision's, computed in the test on the same weights and inputs.

The default tier runs a small VisionTransformer(...) built from torchvision's own class (the real archs
take tens of seconds to build and compile on a CPU); the slow tier runs every torchvision arch at its
native size. torchvision's ViT asserts its construction size (the position embedding has one row per
patch), so there is no non-native size to compare.
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOL, nchw_to_nhwc, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import ConversionError, flax_to_torch, guess_arch, name_table, torch_to_flax
from tl_jax.models import arch_stages, create_model, stage_tree
from tl_jax.models import vit
from tl_jax.models.vit import ARCHS, FAMILY, MultiheadSelfAttention, VisionTransformer, ViTSpec

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
from torchvision.models import vision_transformer as tv_vit  # noqa: E402

NUM_CLASSES = 5
# 4x4 patches of 8 px and the class token: 17 tokens, 2 heads of 8 features, 2 encoder layers.
SMALL = ViTSpec(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


def _images(batch, size, seed=1, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(dtype)


def _randomise(tmodel, seed=0):
  """LayerNorm affine params, biases, the class token and the head away from their init (ones, zeros,
  ~1e-6, and a zeroed head), which would hide a wrong mapping of them."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in tmodel.named_parameters():
      if '.ln' in name:
        p.copy_(torch.rand(p.shape, generator=gen) + (0.5 if name.endswith('weight') else -0.5))
      elif name.endswith(('bias', 'class_token')):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
      elif name == 'heads.head.weight':
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
  return tmodel


def _torch_small(spec=SMALL, num_classes=NUM_CLASSES, dropout=0.0, seed=0):
  """torchvision's VisionTransformer class with `spec`'s arguments."""
  torch.manual_seed(seed)
  tmodel = tv_vit.VisionTransformer(spec.image_size, spec.patch_size, spec.num_layers, spec.num_heads,
                                    spec.hidden_dim, spec.mlp_dim, dropout=dropout, num_classes=num_classes)
  return _randomise(tmodel, seed)


def _torch_arch(arch, num_classes=NUM_CLASSES, seed=0):
  """torchvision's `arch` at its weights' size (vit_h_14: 518 px, where torchvision's default is 224)."""
  torch.manual_seed(seed)
  tmodel = getattr(torchvision.models, arch)(num_classes=num_classes, image_size=_native_size(arch))
  return _randomise(tmodel, seed)


def _native_size(arch):
  return torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size[0]


def _spec_to_flax(state_dict, spec):
  """torch_to_flax for a configuration no arch name stands for: its name table, convert's layouts."""
  variables = {'params': {}}
  for entry in vit.spec_name_table(spec):
    value = np.asarray(state_dict[entry.torch_name])
    value = value.T if entry.kind == 'linear_w' else value.transpose(2, 3, 1, 0) if entry.kind == 'conv' else value
    tree = variables[entry.collection]
    for key in entry.path[:-1]:
      tree = tree.setdefault(key, {})
    tree[entry.path[-1]] = np.ascontiguousarray(value)
  return variables


def _spec_params_to_torch(params, spec):
  """flax_to_torch for `spec`: torch name -> array in torch's layout."""
  out = {}
  for entry in vit.spec_name_table(spec):
    value = params
    for key in entry.path:
      value = value[key]
    value = np.asarray(value)
    out[entry.torch_name] = np.ascontiguousarray(
        value.T if entry.kind == 'linear_w' else value.transpose(3, 2, 0, 1) if entry.kind == 'conv' else value)
  return out


def _small_model(spec=SMALL, **kwargs):
  return VisionTransformer('vit_b_16', NUM_CLASSES, spec=spec, **kwargs)


def test_small_vit_eval_logits_match_torchvision():
  tmodel = _torch_small().eval()
  x = _images(2, SMALL.image_size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  forward = jax.jit(_small_model().apply)
  variables = _spec_to_flax(state_dict_numpy(tmodel), SMALL)
  out = forward(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert within(rel_err(out, ref), 'logits_rel', 'eval logits small VisionTransformer (rel)')
  # No dropout in eval: the same rng-free call gives the same logits.
  np.testing.assert_array_equal(out, forward(variables, jnp.asarray(nchw_to_nhwc(x))))


@pytest.mark.slow
def test_small_vit_bfloat16_logits_stay_close():
  tmodel = _torch_small().eval()
  x = _images(2, SMALL.image_size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  out = jax.jit(_small_model(dtype=jnp.bfloat16).apply)(_spec_to_flax(state_dict_numpy(tmodel), SMALL),
                                                         jnp.asarray(nchw_to_nhwc(x)))
  assert out.dtype == jnp.float32
  assert within(rel_err(out, ref), 'bf16_logits_rel', 'bfloat16 eval logits small VisionTransformer (rel)')


def test_small_vit_train_forward_and_float64_gradients_match_torch():
  """torch's model.train() (dropout p=0, the slow MultiheadAttention path) in float64: the logits and
  the cross-entropy gradient of every parameter."""
  tmodel = _torch_small().double().train()
  x, labels = _images(4, SMALL.image_size, seed=5, dtype=np.float64), np.array([0, 3, 4, 2])
  logits_ref = tmodel(torch.from_numpy(x))
  loss_ref = torch.nn.functional.cross_entropy(logits_ref, torch.from_numpy(labels))
  loss_ref.backward()
  grads_ref = {name: p.grad.numpy() for name, p in tmodel.named_parameters()}
  model = _small_model()
  with jax.enable_x64(True):
    variables = _spec_to_flax(state_dict_numpy(tmodel), SMALL)

    def loss_fn(params):
      logits = model.apply({'params': params}, jnp.asarray(nchw_to_nhwc(x)), train=True,
                           rngs={'dropout': jax.random.PRNGKey(0)})
      loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=1))
      return loss, logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
    grads = _spec_params_to_torch(jax.device_get(grads), SMALL)
  assert within(rel_err(logits, logits_ref.detach().numpy()), 'logits_rel',
                'train-mode logits float64 small VisionTransformer (rel)')
  assert set(grads) == set(grads_ref)
  worst, name = max((rel_err(grads[k], grads_ref[k]), k) for k in grads_ref)
  assert within(worst, 'grad_rel_f64', 'gradients float64, worst tensor small VisionTransformer (rel)'), name
  assert abs(float(loss) - loss_ref.item()) <= TOL['train_loss_abs_f64']


def test_attention_dropout_drops_softmax_weights_and_rescales_them():
  """q = k = 0 makes every softmax weight 1/L and v = 1 turns each output into the sum of the kept
  weights: multiples of 2/L with p=0.5 (kept weights scaled by 1/(1-p)), mean 1; exactly 1 in eval."""
  length, dim = 64, 4
  attention = MultiheadSelfAttention(num_heads=1, dropout_rate=0.5)
  params = {'in_proj_weight': jnp.zeros((3 * dim, dim)),
            'in_proj_bias': jnp.concatenate([jnp.zeros(2 * dim), jnp.ones(dim)]),
            'out_proj': {'kernel': jnp.eye(dim), 'bias': jnp.zeros(dim)}}
  x = jnp.ones((32, length, dim))
  train_and_eval = jax.jit(lambda x: [attention.apply({'params': params}, x, train=train,
                                                      rngs={'dropout': jax.random.PRNGKey(3)})
                                      for train in (True, False)])
  out, evaluated = (np.asarray(y) for y in train_and_eval(x))
  kept = out * length / 2
  np.testing.assert_allclose(kept, np.round(kept), atol=1e-4)   # each a count of kept weights
  # 32*64 rows of 64 weights each: the mean of 131k Bernoulli(0.5) draws is within 0.01 of 0.5.
  assert abs(out.mean() - 1.0) < 0.02
  assert len(np.unique(np.round(kept[..., 0]))) > 10           # the rows draw different masks
  np.testing.assert_allclose(evaluated, np.ones_like(out), rtol=1e-6)


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


def test_dropout_layers_are_drawn_in_train_mode_only():
  """Every dropout torchvision has (after the embedding, the attention output and both MLP linears;
  the attention weights with attention_dropout) is drawn with `train=True` and none in eval: counted
  in the traced computation. The drop rate and the 1/(1-p) scale of a draw are checked on its own."""
  x = jnp.zeros((1, 32, 32, 3))

  def draws(train, **rates):
    model = _small_model(**rates)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=train, rngs={'dropout': jax.random.PRNGKey(0)}))
    return _count_primitive(jaxpr(variables).jaxpr, 'random_bits')

  layers = SMALL.num_layers
  assert draws(True, dropout_rate=0.5) == 1 + 3 * layers
  assert draws(True, dropout_rate=0.5, attention_dropout_rate=0.1) == 1 + 4 * layers
  assert draws(True) == 0 and draws(False, dropout_rate=0.5, attention_dropout_rate=0.1) == 0
  model = _small_model(dropout_rate=0.5)
  # setup creates the top-level params; only they are needed to call one submodule.
  variables = {'params': {'class_token': jnp.zeros((1, 1, SMALL.hidden_dim)),
                          'encoder_pos_embedding': jnp.zeros((1, SMALL.seq_length, SMALL.hidden_dim))}}
  drop = jax.jit(lambda h, key, deterministic: model.apply(
      variables, h, rngs={'dropout': key}, method=lambda m, h: m.encoder_dropout(h, deterministic=deterministic)),
      static_argnums=2)
  h = jnp.ones((64, 4096))
  first = np.asarray(drop(h, jax.random.PRNGKey(4), False))
  second = np.asarray(drop(h, jax.random.PRNGKey(5), False))
  assert set(np.unique(first)) == {0.0, 2.0}         # kept values scaled by 1 / (1 - p)
  assert abs((first > 0).mean() - 0.5) < 0.002        # 262k draws: 4 standard deviations is 0.004 / 2
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(drop(h, jax.random.PRNGKey(4), True), h)


def test_small_vit_round_trip_is_bit_identical_and_loads_strictly():
  tmodel = _torch_small()
  state_dict = state_dict_numpy(tmodel)
  assert [e.torch_name for e in vit.spec_name_table(SMALL)] == list(state_dict)
  back = _spec_params_to_torch(_spec_to_flax(state_dict, SMALL)['params'], SMALL)
  assert back.keys() == state_dict.keys()
  for name, value in state_dict.items():
    assert np.array_equal(back[name], value) and back[name].shape == value.shape, name
  _torch_small(seed=1).load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def _fake_state_dict(arch):
  """torchvision's `arch` built on torch's meta device (no memory, no compute), as zero-stride arrays
  of its tensors' shapes: enough for names and shapes."""
  with torch.device('meta'):
    tmodel = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES, image_size=_native_size(arch))
  return {k: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), tuple(v.shape), (0,) * v.dim())
          for k, v in tmodel.state_dict().items()}


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_name_table_lists_torchvisions_tensors_with_their_flax_shapes(arch):
  """The same names in the same order as torchvision's state dict, and each tensor's shape the one
  its Flax variable takes under the table's layout (abstract init: nothing is computed)."""
  state_dict = _fake_state_dict(arch)
  table = name_table(arch)
  assert [e.torch_name for e in table] == list(state_dict)
  model = create_model(arch, NUM_CLASSES)
  size = FAMILY.init_size(arch)
  assert size == _native_size(arch)
  flax_shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  for entry in table:
    leaf = flax_shapes[entry.collection]
    for key in entry.path:
      leaf = leaf[key]
    want = {'conv': lambda s: (s[3], s[2], s[0], s[1]), 'linear_w': lambda s: s[::-1]}.get(entry.kind, tuple)
    assert want(tuple(leaf.shape)) == state_dict[entry.torch_name].shape, entry
  assert FAMILY.num_features(arch) == state_dict['encoder.ln.weight'].shape[0]
  # Every top-level name has a stage, and the arch's stages are those of its depth.
  stages = stage_tree(flax_shapes['params'])
  assert set(arch_stages(arch)) == set(stages.values())
  assert arch_stages(arch) == ('conv_proj',) + tuple(
      f'encoder.layers.encoder_layer_{i}' for i in range(ARCHS[arch].num_layers)) + ('encoder.ln', 'head')


def test_conversion_errors_name_the_arch_and_the_tensors():
  b16 = _fake_state_dict('vit_b_16')
  with pytest.raises(ConversionError, match='this looks like a vit_b_16 state dict'):
    torch_to_flax(b16, 'vit_l_16')
  broken = {k: v for k, v in b16.items() if k != 'encoder.layers.encoder_layer_3.self_attention.in_proj_bias'}
  broken['encoder.layers.encoder_layer_3.self_attention.in_proj_bias_extra'] = np.zeros(3)
  with pytest.raises(ConversionError, match=r'missing \(1\): encoder\.layers\.encoder_layer_3\.self_attention\.'
                                            r'in_proj_bias(.|\n)*unexpected \(1\): .*in_proj_bias_extra'):
    torch_to_flax(broken, 'vit_b_16')
  # vit_b_32 has vit_b_16's tensor names: its shapes tell them apart.
  b32 = _fake_state_dict('vit_b_32')
  assert guess_arch(b32) == 'vit_b_32'
  model = create_model('vit_b_16', NUM_CLASSES)
  reference = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  with pytest.raises(ConversionError, match=r'conv_proj\.weight: file has \(768, 3, 32, 32\), vit_b_16 needs '
                                            r'\(768, 3, 16, 16\)(.|\n)*encoder\.pos_embedding'):
    torch_to_flax(b32, 'vit_b_16', reference=reference)


def test_stages_freeze_all_but_the_head_and_unfreeze_by_layer():
  model = _small_model()
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))['params']
  assert stage_tree(params) == {
      'class_token': 'conv_proj', 'conv_proj': 'conv_proj', 'encoder_pos_embedding': 'conv_proj',
      'encoder_layers_encoder_layer_0': 'encoder.layers.encoder_layer_0',
      'encoder_layers_encoder_layer_1': 'encoder.layers.encoder_layer_1',
      'encoder_ln': 'encoder.ln', 'heads_head': 'head'}
  frozen = optim.trainable_mask(params, 'frozen')
  assert [k for k, v in frozen.items() if v] == ['heads_head']
  partial = optim.trainable_mask(params, ['encoder.layers.encoder_layer_1', 'encoder.ln', 'head'])
  assert sorted(k for k, v in partial.items() if v) == ['encoder_layers_encoder_layer_1', 'encoder_ln',
                                                        'heads_head']
  features = optim.trainable_mask(params, ['features'])
  assert all(features[k] == (k != 'heads_head') for k in params)
  assert all(optim.trainable_mask(params, 'finetune').values())
  assert vit.stage_of('features_3') is None and vit.stage_of('fc') is None


def test_create_model_refuses_unknown_archs_options_and_other_sizes():
  with pytest.raises(ValueError, match='unknown arch'):
    vit.create_model('vit_s_16', 3)
  with pytest.raises(ValueError, match='fast_backward'):
    vit.create_model('vit_b_16', 3, fast_backward=True)
  model = _small_model()
  with pytest.raises(ValueError, match='takes 32x32 images, got 48x48'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3))))
  assert create_model('vit_h_14', 3).spec is None and FAMILY.init_size('vit_h_14') == 518


@pytest.mark.slow
@pytest.mark.parametrize('arch', sorted(ARCHS, key=lambda a: (a != 'vit_b_16', a)))
def test_eval_logits_and_round_trip_of_every_arch(arch):
  """Each torchvision arch at its native size (batch 2 for vit_b_16, the default tier's stand-in,
  1 for the others): eval logits, then the conversion back bit-identical and loadable strictly."""
  tmodel = _torch_arch(arch).eval()
  x = _images(2 if arch == 'vit_b_16' else 1, _native_size(arch))
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  state_dict = state_dict_numpy(tmodel)
  variables = torch_to_flax(state_dict, arch)
  out = jax.jit(create_model(arch, NUM_CLASSES).apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert within(rel_err(out, ref), 'logits_rel', f'eval logits {arch} {x.shape[-1]}px (rel)')
  back = flax_to_torch(variables, arch)
  del variables
  assert back.keys() == state_dict.keys()
  for name, value in state_dict.items():
    assert np.array_equal(back[name], value), name
  del state_dict
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_the_weights_crop_size_sets_the_position_embedding():
  """`weights: IMAGENET1K_SWAG_E2E_V1` fixes 384 px for vit_b_16: create_model(image_size=...) builds
  the position embedding torchvision's builder makes for that size (checked on shapes alone)."""
  from tl_jax.models import create_model, init_size
  with torch.device('meta'):
    tmodel = torchvision.models.vit_b_32(image_size=64)
  model = create_model('vit_b_32', 3, image_size=64)
  assert init_size(model) == 64
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
  assert shapes['params']['encoder_pos_embedding'].shape == tuple(tmodel.encoder.pos_embedding.shape)
  assert init_size(create_model('vit_b_32', 3)) == 224
