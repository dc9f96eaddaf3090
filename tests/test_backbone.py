"""The convolutional base under custom Flax heads: features against torch, freezing by head name,
and the material's box regressor (a ResNet-18 base and four Linear(512, 1) heads) trained with MSE."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import losses, optim
from tl_jax.convert import ConversionError
from tl_jax.convert import init_transfer_variables
from tl_jax.models import Backbone, TransferModel, num_features
from tl_jax.training import create_train_state, eval_step, train_step

BOX = ('xmin', 'ymin', 'xmax', 'ymax')


class BoxHead(nn.Module):
  """The material's four regressors: one Linear(in_features, 1) per box coordinate, as a tuple."""

  @nn.compact
  def __call__(self, features_bd):
    # Zero kernels: every head starts at its bias (0), not at a random projection of unscaled features.
    return tuple(nn.Dense(1, kernel_init=nn.initializers.zeros, name=name)(features_bd) for name in BOX)


class TwoHeads(nn.Module):
  """A dict of outputs of different widths."""

  @nn.compact
  def __call__(self, features_bd):
    return {'label': nn.Dense(3, name='label')(features_bd), 'box': nn.Dense(4, name='box')(features_bd)}


@pytest.mark.slow
@pytest.mark.parametrize('arch, size', [('resnet18', 64), ('resnet101', 64), ('vgg11_bn', 64)])
def test_backbone_features_equal_torchs_children_but_the_last(arch, size):
  """ResNet: nn.Sequential(*children()[:-1]) flattened; VGG: features + avgpool flattened."""
  torch = pytest.importorskip('torch')
  tmodel = random_torchvision_model(arch, 10).eval()
  base = torch.nn.Sequential(*list(tmodel.children())[:-1])
  x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    ref = torch.flatten(base(torch.from_numpy(x)), 1).numpy()
  model = TransferModel(arch, BoxHead())
  variables = init_transfer_variables(model, jax.random.PRNGKey(0), state_dict_numpy(tmodel))
  features = jax.jit(lambda v, x: model.apply(v, x, method='features'))(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert features.shape == ref.shape == (2, num_features(arch))
  assert within(rel_err(features, ref), 'activation_rel', f'backbone features {arch} (rel)')
  # The standalone Backbone has the classifier's own names, the head aside.
  alone = jax.eval_shape(lambda: Backbone(arch).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))['params']
  assert jax.tree_util.tree_structure(alone) == jax.tree_util.tree_structure(variables['params']['backbone'])


@pytest.mark.slow
def test_heads_are_fresh_and_a_wrong_base_is_refused():
  torch = pytest.importorskip('torch')
  del torch
  model = TransferModel('resnet18', TwoHeads())
  variables = init_transfer_variables(model, jax.random.PRNGKey(0), image_size=32)
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, 3)))
  assert out['label'].shape == (2, 3) and out['box'].shape == (2, 4)
  with pytest.raises(ConversionError, match='pass --arch resnet34'):
    init_transfer_variables(model, jax.random.PRNGKey(0), state_dict_numpy(random_torchvision_model('resnet34', 2)))


@pytest.mark.slow
def test_freezing_names_each_head():
  model = TransferModel('resnet18', BoxHead())
  params = init_transfer_variables(model, jax.random.PRNGKey(0), image_size=32)['params']
  frozen = optim.trainable_mask(params, 'frozen')
  assert not any(frozen['backbone'].values()) and all(frozen['head'].values())
  only_x = optim.trainable_mask(params, ['xmin', 'xmax', 'layer4'])
  assert only_x['head'] == {'xmin': True, 'ymin': False, 'xmax': True, 'ymax': False}
  assert only_x['backbone']['layer4_1'] and not only_x['backbone']['layer3_1']
  labels = optim.param_labels(params, ['xmin'])
  assert set(jax.tree_util.tree_leaves(labels['head']['xmin'])) == {optim.TRAINABLE}
  assert set(jax.tree_util.tree_leaves(labels['backbone'])) == {optim.FROZEN}
  with pytest.raises(ValueError, match='unknown stages'):
    optim.trainable_mask(params, ['width'])


def test_regression_losses_match_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  outputs = tuple(rng.standard_normal((5, 1)).astype(np.float32) * 2 for _ in BOX)
  targets = rng.standard_normal((5, 4)).astype(np.float32)
  mask = np.array([True, True, True, False, True])
  batch = {'targets': jnp.asarray(targets), 'mask': jnp.asarray(mask)}
  for ours, theirs in [(losses.mean_squared_error, torch.nn.functional.mse_loss),
                       (losses.smooth_l1, torch.nn.functional.smooth_l1_loss)]:
    sums = ours(tuple(jnp.asarray(o) for o in outputs), batch)
    # The material's sum of one criterion per head, each a mean over the valid rows.
    ref = sum(theirs(torch.from_numpy(o[mask, 0]), torch.from_numpy(targets[mask, i])).item()
              for i, o in enumerate(outputs))
    np.testing.assert_allclose(float(sums['loss_sum'] / sums['count']), ref, rtol=1e-6)
    assert float(sums['count']) == 4
  with pytest.raises(ValueError, match='outputs have 4 values per row but targets 3'):
    losses.mean_squared_error(outputs, {'targets': targets[:, :3], 'mask': mask})


def _boxes(n, size, seed):
  """A red rectangle on noise; targets (xmin, ymin, xmax, ymax) in [0, 1]."""
  rng = np.random.default_rng(seed)
  images = rng.normal(0.0, 0.5, (n, size, size, 3)).astype(np.float32)
  boxes = np.zeros((n, 4), np.float32)
  for i in range(n):
    w, h = rng.integers(size // 5, size // 2 + 1, 2)
    x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
    images[i, y0:y0 + h, x0:x0 + w] = (2.0, -1.0, -1.0)
    boxes[i] = (x0 / size, y0 / size, (x0 + w) / size, (y0 + h) / size)
  return images, boxes


@pytest.mark.slow
def test_box_regression_with_a_resnet18_base_beats_the_mean_box():
  """The material's localisation case, through the library's own train_step with the MSE loss."""
  size, batch, steps = 32, 16, 120
  train_images, train_boxes = _boxes(batch * 25, size, seed=0)
  val_images, val_boxes = _boxes(96, size, seed=1)
  model = TransferModel('resnet18', BoxHead())
  variables = init_transfer_variables(model, jax.random.PRNGKey(0), image_size=size)
  tx = optax.adam(1e-3)   # as the material's localisation recipe; converges in a few hundred steps
  state = create_train_state(model, variables, tx, jax.random.PRNGKey(1))
  step = jax.jit(functools.partial(train_step, model=model, bn_train=True, loss=losses.mean_squared_error,
                                   trainable=optim.trainable_mask(state.params, 'finetune')), donate_argnums=0)
  order = np.random.default_rng(2).permutation
  perm = order(len(train_images))
  first = None
  for s in range(steps):
    if (s * batch) % len(perm) == 0:
      perm = order(len(train_images))
    idx = perm[(s * batch) % len(perm):(s * batch) % len(perm) + batch]
    state, sums = step(state, {'images': jnp.asarray(train_images[idx]), 'targets': jnp.asarray(train_boxes[idx]),
                               'mask': jnp.ones(batch, bool)})
    first = float(sums['loss_sum'] / sums['count']) if first is None else first
  evaluate = jax.jit(functools.partial(eval_step, model=model, loss=losses.mean_squared_error))
  sums = evaluate(state, {'images': jnp.asarray(val_images), 'targets': jnp.asarray(val_boxes),
                          'mask': jnp.ones(len(val_images), bool)})
  mae = float(sums['abs_error_sum']) / (float(sums['count']) * 4)
  predicted = np.concatenate([np.asarray(o) for o in sums['outputs']], axis=1)
  np.testing.assert_allclose(np.abs(predicted - val_boxes).mean(), mae, rtol=1e-5)
  trivial = float(np.abs(val_boxes - train_boxes.mean(axis=0)).mean())
  print(f'box MAE {mae:.4f} vs mean box {trivial:.4f} (first train loss {first:.4f})')
  assert mae < 0.5 * trivial, (mae, trivial)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['efficientnet_b0', 'convnext_tiny', 'resnet18'])
def test_bn_frozen_keeps_stochastic_depth_on_and_batchnorm_in_eval(arch):
  """torch's recipe with `bn: frozen`: model.train(), then the BN modules alone in eval(). Under a
  custom head the backbone's stochastic depth must still draw (two dropout keys, two outputs) while
  BatchNorm uses and keeps its running statistics."""
  model = TransferModel(arch, nn.Dense(2))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, x, train=False))(jax.random.PRNGKey(0))

  def run(key, train):
    return model.apply(variables, x, train=train, bn_train=False, mutable=['batch_stats'], rngs={'dropout': key})

  (a, stats_a), (b, _) = run(jax.random.PRNGKey(1), True), run(jax.random.PRNGKey(2), True)
  random = arch != 'resnet18'
  # Bit equality: without stochastic depth the same computation runs twice; with it, the change can be
  # tiny (ConvNeXt's layer scale starts at 1e-6, fresh EfficientNet outputs are ~1e-15).
  differ = not np.array_equal(a, b)
  assert differ == random, f'{arch}: stochastic depth {"off" if random else "on"} under bn: frozen'
  evaluated = model.apply(variables, x, train=False)
  if not random:
    np.testing.assert_allclose(a, evaluated, rtol=1e-5, atol=1e-6)   # eval-mode BN: the eval forward
  for new, old in zip(jax.tree_util.tree_leaves(stats_a.get('batch_stats', {})),
                      jax.tree_util.tree_leaves(variables.get('batch_stats', {}))):
    np.testing.assert_array_equal(new, old)
