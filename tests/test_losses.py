"""The recipe's losses against torch in float64: CrossEntropyLoss with label smoothing and class weights
(integer and probability targets), BCEWithLogitsLoss with pos_weight, balanced weights against
scikit-learn, and five SGD steps of a small ResNet trained with smoothing + weights."""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest

from helpers import random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import losses, optim
from tl_jax.convert import name_table, torch_to_flax
from tl_jax.models import create_model
from tl_jax.training import create_train_state, eval_step, train_step

torch = pytest.importorskip('torch')

C = 5
VALID = 7   # rows 7..9 are padding: their logits and labels must not count


def _case(seed=0, rows=10):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, (rows, C))
  labels = rng.integers(0, C, rows).astype(np.int32)
  labels[:C] = np.arange(C)   # every class present
  weights = rng.uniform(0.2, 3.0, C)
  mask = np.arange(rows) < VALID
  return logits, labels, weights, mask


def _ours(loss_fn, logits, batch):
  """(loss_sum / count, d(loss)/d(logits), sums) in float64."""
  def mean(x):
    sums = loss_fn(x, batch)
    return sums['loss_sum'] / sums['count'], sums
  (value, sums), grad = jax.value_and_grad(mean, has_aux=True)(jnp.asarray(logits))
  return float(value), np.asarray(grad), {k: float(v) for k, v in sums.items()}


def _torch(logits, target, **kwargs):
  x = torch.tensor(logits[:VALID], requires_grad=True)
  loss = torch.nn.CrossEntropyLoss(**kwargs)(x, target)
  loss.backward()
  return loss.item(), x.grad.numpy()


@pytest.mark.parametrize('smoothing, weighted', [(0.1, False), (0.0, True), (0.1, True), (0.3, True)])
def test_cross_entropy_with_label_smoothing_and_class_weights_matches_torch(smoothing, weighted):
  """Integer labels: torch divides a weighted mean by sum_i w[y_i], smoothing term included."""
  logits, labels, weights, mask = _case()
  with jax.enable_x64(True):
    loss_fn = losses.weighted_cross_entropy(smoothing, weights if weighted else None)
    batch = {'labels': jnp.asarray(labels), 'mask': jnp.asarray(mask)}
    value, grad, sums = _ours(loss_fn, logits, batch)
  kwargs = {'label_smoothing': smoothing}
  if weighted:
    kwargs['weight'] = torch.tensor(weights)
  ref, ref_grad = _torch(logits, torch.from_numpy(labels[:VALID]).long(), **kwargs)
  what = f'CrossEntropyLoss float64 label_smoothing={smoothing} weight={weighted}'
  assert within(abs(value - ref), 'loss_abs_f64', f'{what}: loss'), (value, ref)
  assert within(rel_err(grad[:VALID], ref_grad), 'grad_rel_f64', f'{what}: d loss / d logits (rel)')
  assert np.all(grad[VALID:] == 0)
  # count is the target classes' weight (torch's denominator); accuracy counts rows.
  expected_count = weights[labels[:VALID]].sum() if weighted else VALID
  assert sums['count'] == pytest.approx(expected_count, rel=1e-12)
  assert sums['rows'] == VALID
  assert sums['correct'] == np.sum(np.argmax(logits[:VALID], -1) == labels[:VALID])


@pytest.mark.parametrize('smoothing, weighted', [(0.0, False), (0.1, False), (0.0, True), (0.2, True)])
def test_cross_entropy_on_probability_targets_matches_torch(smoothing, weighted):
  """Soft targets (MixUp/CutMix): torch smooths the targets and divides by the row count, weights or not."""
  logits, labels, weights, mask = _case(1)
  targets = np.random.default_rng(3).dirichlet(np.ones(C), len(labels))
  with jax.enable_x64(True):
    loss_fn = losses.weighted_cross_entropy(smoothing, weights if weighted else None)
    batch = {'labels': jnp.asarray(labels), 'soft_labels': jnp.asarray(targets), 'mask': jnp.asarray(mask)}
    value, grad, sums = _ours(loss_fn, logits, batch)
  kwargs = {'label_smoothing': smoothing}
  if weighted:
    kwargs['weight'] = torch.tensor(weights)
  ref, ref_grad = _torch(logits, torch.from_numpy(targets[:VALID]), **kwargs)
  what = f'CrossEntropyLoss float64 probability targets label_smoothing={smoothing} weight={weighted}'
  assert within(abs(value - ref), 'loss_abs_f64', f'{what}: loss'), (value, ref)
  assert within(rel_err(grad[:VALID], ref_grad), 'grad_rel_f64', f'{what}: d loss / d logits (rel)')
  assert sums['count'] == VALID
  # Accuracy against the rows' own integer labels, not the mixed targets.
  assert sums['correct'] == np.sum(np.argmax(logits[:VALID], -1) == labels[:VALID])


def test_plain_options_keep_the_plain_cross_entropy():
  assert losses.make_loss({}, [0, 1, 1], 2) is losses.cross_entropy
  assert losses.make_loss({'label_smoothing': 0.0}, [0, 1], 2, mixing=True) is not losses.cross_entropy


@pytest.mark.parametrize('pos_weight', [None, 'vector', 'scalar'])
def test_bce_with_pos_weight_matches_torch(pos_weight):
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 3, (10, C))
  targets = (rng.random((10, C)) < 0.4).astype(np.float64)
  targets[VALID - 1] = (logits[VALID - 1] > 0)   # one row right at threshold 0.5 in every class
  mask = np.arange(10) < VALID
  weight = {None: None, 'vector': rng.uniform(0.5, 4, C), 'scalar': np.array([2.5])}[pos_weight]
  with jax.enable_x64(True):
    loss_fn = losses.binary_cross_entropy(None if weight is None else
                                           (weight if len(weight) == C else [float(weight[0])] * C))
    batch = {'labels': jnp.asarray(targets), 'mask': jnp.asarray(mask)}
    value, grad, sums = _ours(loss_fn, logits, batch)
  x = torch.tensor(logits[:VALID], requires_grad=True)
  kwargs = {} if weight is None else {'pos_weight': torch.tensor(weight)}
  ref = torch.nn.BCEWithLogitsLoss(**kwargs)(x, torch.from_numpy(targets[:VALID]))
  ref.backward()
  what = f'BCEWithLogitsLoss float64 pos_weight={pos_weight}'
  assert within(abs(value - ref.item()), 'loss_abs_f64', f'{what}: loss'), (value, ref.item())
  assert within(rel_err(grad[:VALID], x.grad.numpy()), 'grad_rel_f64', f'{what}: d loss / d logits (rel)')
  exact = np.all((logits[:VALID] > 0) == (targets[:VALID] > 0.5), axis=-1)
  assert sums['correct'] == exact.sum() >= 1 and sums['count'] == VALID


def test_balanced_weights_are_sklearns():
  sklearn = pytest.importorskip('sklearn.utils.class_weight')
  labels = np.array([0] * 13 + [1] * 2 + [2] * 7 + [3] * 1)
  ours = losses.balanced_class_weights(np.bincount(labels))
  ref = sklearn.compute_class_weight('balanced', classes=np.arange(4), y=labels)
  assert within(rel_err(ours, ref), 'loss_abs_f64', "class_weights: balanced vs sklearn's compute_class_weight")
  loss = losses.make_loss({'class_weights': 'balanced'}, labels, 4)
  logits = np.random.default_rng(0).normal(size=(len(labels), 4))
  with jax.enable_x64(True):
    value, _, _ = _ours(loss, logits, {'labels': jnp.asarray(labels), 'mask': jnp.ones(len(labels), bool)})
  ref_loss = torch.nn.CrossEntropyLoss(weight=torch.tensor(ref))(torch.tensor(logits), torch.from_numpy(labels))
  assert abs(value - ref_loss.item()) < 1e-12


def test_bad_options_give_one_line_errors():
  with pytest.raises(losses.LossError, match=r'loss.class_weights has 3 entries but the data has 4 classes'):
    losses.make_loss({'class_weights': [1, 2, 3]}, [0, 1, 2, 3], 4)
  with pytest.raises(losses.LossError, match=r'classes \[2\] have no train samples'):
    losses.make_loss({'class_weights': 'balanced'}, [0, 1, 3], 4)
  with pytest.raises(losses.LossError, match='pos_weight applies to multi-label'):
    losses.make_loss({'pos_weight': 2.0}, [0, 1], 2)
  with pytest.raises(losses.LossError, match='label_smoothing applies to single-label'):
    losses.make_loss({'label_smoothing': 0.1}, np.eye(2), 2, multi_label=True)
  with pytest.raises(losses.LossError, match='pos_weight has 1 entries but the data has 2'):
    losses.make_loss({'pos_weight': [1.0]}, np.eye(2), 2, multi_label=True)
  pw = losses.make_loss({'pos_weight': 'balanced'}, np.array([[1, 0], [1, 1], [0, 0], [1, 0]]), 2, multi_label=True)
  assert pw is not None


def test_recipe_loss_section_is_validated():
  from tl_jax import config
  values = config.default_values()
  values['loss'] = {'label_smoothing': 0.1, 'class_weights': [1, 2]}
  assert config.validate(values).loss.class_weights == [1.0, 2.0]
  for bad, message in [({'label_smoothing': 1.5}, 'loss.label_smoothing: Input should be less than or equal to 1'),
                       ({'class_weights': 'bal'}, 'loss.class_weights: must be balanced or a list'),
                       ({'pos_weight': [1, -2]}, 'loss.pos_weight: must be balanced, a number'),
                       ({'weight': [1]}, 'loss.weight: unknown key')]:
    values['loss'] = bad
    with pytest.raises(config.ConfigError, match=message) as info:
      config.validate(values)
    assert '\n' not in str(info.value)


# ----------------------------------------------------------- five float64 SGD steps with the options

SIZE, BATCH, SAMPLES, SMOOTHING, LR = 32, 4, 19, 0.1, 0.001   # the last batch: 3 valid rows and a padding row


class _MLP(nn.Module):
  """Linear(48, 16) -> ReLU -> Linear(16, 3) on the flattened image, with the step's call signature."""

  @nn.compact
  def __call__(self, x, train=False, bn_train=False, mask_b=None):
    x = nn.relu(nn.Dense(16, param_dtype=x.dtype)(x.reshape((x.shape[0], -1))))
    return nn.Dense(3, param_dtype=x.dtype)(x)


def test_five_sgd_steps_of_a_small_model_with_label_smoothing_and_class_weights_match_torch_in_float64():
  rng = np.random.default_rng(5)
  images = rng.normal(0, 1, (SAMPLES, 4, 4, 3))
  labels = rng.integers(0, 3, SAMPLES).astype(np.int32)
  weights = [0.5, 2.0, 1.25]
  torch.manual_seed(0)
  tmodel = torch.nn.Sequential(torch.nn.Linear(48, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).double()
  initial = {k: v.numpy().copy() for k, v in tmodel.state_dict().items()}
  opt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9)
  criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float64), label_smoothing=SMOOTHING)
  torch_losses = []
  for start in range(0, SAMPLES, BATCH):
    opt.zero_grad()
    loss = criterion(tmodel(torch.from_numpy(images[start:start + BATCH].reshape(-1, 48))),
                     torch.from_numpy(labels[start:start + BATCH]).long())
    loss.backward()
    opt.step()
    torch_losses.append(loss.item())
  with jax.enable_x64(True):
    params = {'Dense_0': {'kernel': initial['0.weight'].T, 'bias': initial['0.bias']},
              'Dense_1': {'kernel': initial['2.weight'].T, 'bias': initial['2.bias']}}
    model = _MLP()
    state = create_train_state(model, {'params': params}, optax.sgd(0.1, momentum=0.9))
    loss_fn = losses.make_loss({'label_smoothing': SMOOTHING, 'class_weights': weights}, labels, 3)
    step = jax.jit(functools.partial(train_step, model=model, trainable=True, bn_train=True, loss=loss_fn))
    ours = []
    for start in range(0, SAMPLES, BATCH):
      valid = min(BATCH, SAMPLES - start)
      batch_images = np.full((BATCH, 4, 4, 3), 5.0)
      batch_images[:valid] = images[start:start + valid]
      batch_labels = np.zeros(BATCH, np.int32)
      batch_labels[:valid] = labels[start:start + valid]
      state, sums = step(state, {'images': jnp.asarray(batch_images), 'labels': jnp.asarray(batch_labels),
                                 'mask': jnp.asarray(np.arange(BATCH) < valid)})
      ours.append(float(sums['loss_sum'] / sums['count']))
    final = jax.device_get(state.params)
  what = '5 SGD steps float64 small MLP label_smoothing + class_weights'
  assert within(np.max(np.abs(np.subtract(ours, torch_losses))), 'train_loss_abs_f64', f'{what}: loss per step'), \
      (ours, torch_losses)
  theirs = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  worst = max(rel_err(final[f'Dense_{i}']['kernel'].T - initial[f'{t}.weight'],
                      theirs[f'{t}.weight'] - initial[f'{t}.weight']) for i, t in ((0, 0), (1, 2)))
  assert within(worst, 'train_delta_rel_f64', f'{what}: param change (rel)'), worst


@pytest.mark.slow
def test_five_sgd_steps_with_label_smoothing_and_class_weights_match_torch_in_float64():
  """resnet18 at 32 px with BatchNorm in train mode, the head learning. (Fine-tuning everything at 32 px
  is chaotic: layer4's BatchNorm normalises 1x1 maps over 3-4 rows, and float64 rounding alone moves
  the fifth loss by ~1e-8.)"""
  strategy = 'frozen'
  rng = np.random.default_rng(0)
  images = rng.normal(0, 1, (SAMPLES, SIZE, SIZE, 3))
  labels = rng.integers(0, 3, SAMPLES).astype(np.int32)
  weights = [0.5, 2.0, 1.25]
  tmodel = random_torchvision_model('resnet18', 3, seed=1).double()
  initial = state_dict_numpy(tmodel)
  if strategy == 'frozen':
    for name, p in tmodel.named_parameters():
      p.requires_grad = name.startswith('fc.')
  opt = torch.optim.SGD([p for p in tmodel.parameters() if p.requires_grad], lr=LR, momentum=0.9)
  criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float64),
                                        label_smoothing=SMOOTHING)
  tmodel.train()
  torch_losses = []
  for start in range(0, SAMPLES, BATCH):
    opt.zero_grad()
    x = torch.from_numpy(images[start:start + BATCH].transpose(0, 3, 1, 2).copy())
    loss = criterion(tmodel(x), torch.from_numpy(labels[start:start + BATCH]).long())
    loss.backward()
    opt.step()
    torch_losses.append(loss.item())

  with jax.enable_x64(True):
    model = create_model('resnet18', 3)
    variables = torch_to_flax(initial, 'resnet18')
    schedule = optim.make_schedule({'name': 'constant'}, LR, 1, 5)
    tx = optim.make_optimizer(variables['params'], strategy, {'name': 'sgd', 'lr': LR, 'momentum': 0.9}, schedule)
    state = create_train_state(model, variables, tx)
    loss_fn = losses.make_loss({'label_smoothing': SMOOTHING, 'class_weights': weights}, labels, 3)
    step = jax.jit(functools.partial(train_step, model=model, trainable=optim.trainable_mask(state.params, strategy),
                                     bn_train=True, loss=loss_fn))
    ours = []
    for start in range(0, SAMPLES, BATCH):
      valid = min(BATCH, SAMPLES - start)
      batch_images = np.full((BATCH, SIZE, SIZE, 3), 5.0)
      batch_images[:valid] = images[start:start + valid]
      batch_labels = np.zeros(BATCH, np.int32)
      batch_labels[:valid] = labels[start:start + valid]
      batch = {'images': jnp.asarray(batch_images), 'labels': jnp.asarray(batch_labels),
               'mask': jnp.asarray(np.arange(BATCH) < valid)}
      state, sums = step(state, batch)
      ours.append(float(sums['loss_sum'] / sums['count']))
    # The val step reports the same weighted mean.
    val = eval_step(state, batch, model=model, loss=loss_fn)
    state = jax.device_get(state)
  what = f'5 SGD steps float64 {strategy} label_smoothing + class_weights'
  assert within(np.max(np.abs(np.subtract(ours, torch_losses))), 'train_loss_abs_f64', f'{what}: loss per step'), \
      (ours, torch_losses)
  final = state_dict_numpy(tmodel)
  worst = 0.0
  for entry in name_table('resnet18'):
    if entry.collection != 'params':
      continue
    value = np.asarray(functools.reduce(lambda t, k: t[k], entry.path, state.params))
    value = value.transpose(3, 2, 0, 1) if entry.kind == 'conv' else value.T if entry.kind == 'linear_w' else value
    start = initial[entry.torch_name]
    worst = max(worst, rel_err(value - start, final[entry.torch_name] - start))
  assert within(worst, 'train_delta_rel_f64', f'{what}: param change (rel)'), worst
  tmodel.eval()
  with torch.no_grad():
    x = torch.from_numpy(images[16:].transpose(0, 3, 1, 2).copy())
    ref_val = criterion(tmodel(x), torch.from_numpy(labels[16:]).long()).item()
  assert abs(float(val['loss_sum'] / val['count']) - ref_val) < 1e-9
