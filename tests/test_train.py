"""Train steps against PyTorch: 5 SGD steps from the same weights on the same augmented images."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import TOL, data_root, two_class_folder, nchw_to_nhwc, random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import optim
from tl_jax.convert import name_table, torch_to_flax
from tl_jax.data.transforms import TrainTransform
from tl_jax.models import create_model
from tl_jax.training import create_train_state, eval_step, train_step

torch = pytest.importorskip('torch')
F = pytest.importorskip('torchvision.transforms.functional')

CROP = 64           # parity does not depend on the size (at 32 px layer4 sees 1x1 maps; 64 keeps 2x2)
BATCH = 4
NUM_SAMPLES = 19    # 5 steps: four full batches and a last one with 3 valid rows + 1 padding row
LR = 0.001          # the tutorial's


def make_state(model, variables, strategy='finetune', lr=LR, steps_per_epoch=5):
  """The tutorial's SGD(lr, momentum 0.9) with StepLR(7, 0.1) on `strategy`'s trainable stages."""
  schedule = optim.make_schedule({'name': 'step', 'step_size': 7, 'gamma': 0.1}, lr, 25, steps_per_epoch)
  tx = optim.make_optimizer(variables['params'], strategy, {'name': 'sgd', 'lr': lr, 'momentum': 0.9}, schedule)
  return create_train_state(model, variables, tx)


def _images(n):
  """Real hymenoptera images if present, else generated ones of varied sizes."""
  root = data_root() / 'train'
  paths = sorted(root.glob('*/*.jpg'))[::7][:n] if root.is_dir() else []
  if len(paths) == n:
    return [Image.open(p).convert('RGB') for p in paths]
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, (120 + 7 * i, 150 + 5 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope='module')
def augmented():
  """The same crop/flip parameters applied by tl_jax (HWC arrays) and by torchvision (CHW tensors)."""
  transform = TrainTransform(crop_size=CROP)
  rng = np.random.default_rng(1)
  ours, theirs = [], []
  for img in _images(NUM_SAMPLES):
    params = transform.sample(rng, img.width, img.height)
    ours.append(transform.apply(img, params))
    c = params.crop
    t = F.resized_crop(img, c.top, c.left, c.height, c.width, [CROP, CROP])
    if params.flip:
      t = F.hflip(t)
    theirs.append(F.normalize(F.to_tensor(t), transform.mean, transform.std))
  labels = np.random.default_rng(2).integers(0, 2, NUM_SAMPLES).astype(np.int32)
  return np.stack(ours), torch.stack(theirs), labels


def _torch_run(tmodel, strategy, bn, images, labels):
  if strategy == 'frozen':
    for name, p in tmodel.named_parameters():
      p.requires_grad = name.startswith('fc.')
    opt = torch.optim.SGD(tmodel.fc.parameters(), lr=LR, momentum=0.9)
  else:
    opt = torch.optim.SGD(tmodel.parameters(), lr=LR, momentum=0.9)
  tmodel.train()
  if bn == 'frozen':
    for m in tmodel.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.eval()
  losses = []
  for start in range(0, NUM_SAMPLES, BATCH):
    opt.zero_grad()
    out = tmodel(images[start:start + BATCH])
    loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(labels[start:start + BATCH]).long())
    loss.backward()
    opt.step()
    losses.append(loss.item())
  return losses


def _jax_run(variables, strategy, bn, images, labels):
  model = create_model('resnet18', 2)
  state = make_state(model, variables, strategy)
  trainable = optim.trainable_mask(state.params, strategy)
  step = jax.jit(functools.partial(train_step, model=model, trainable=trainable, bn_train=bn == 'train'))
  losses = []
  for start in range(0, NUM_SAMPLES, BATCH):
    valid = min(BATCH, NUM_SAMPLES - start)
    batch_images = np.zeros((BATCH, CROP, CROP, 3), images.dtype)
    batch_images[:valid] = images[start:start + valid]
    batch_images[valid:] = 7.0  # padding content must not matter
    batch_labels = np.zeros(BATCH, np.int32)
    batch_labels[:valid] = labels[start:start + valid]
    batch = {'images': jnp.asarray(batch_images), 'labels': jnp.asarray(batch_labels),
             'mask': jnp.asarray(np.arange(BATCH) < valid)}
    state, sums = step(state, batch)
    losses.append(float(sums['loss_sum'] / sums['count']))
  return losses, state, step


# The tutorial's two recipes (bn: train) in the default tier, the frozen-BN variants in the slow one.
@pytest.mark.parametrize('strategy, bn', [('frozen', 'train'), ('finetune', 'train'),
                                          pytest.param('frozen', 'frozen', marks=pytest.mark.slow),
                                          pytest.param('finetune', 'frozen', marks=pytest.mark.slow)])
def test_five_sgd_steps_match_pytorch_in_float64(augmented, strategy, bn):
  """Both frameworks in float64, so that any difference left is the algorithm's, not rounding.

  In float32 a randomly initialised ResNet trained on batches of 4 is chaotic: torch float32
  and torch float64 themselves drift apart by ~1e-2 in loss by step 5 (measured), so a
  float32 comparison over 5 steps could not tell a bug from rounding.
  """
  ours_images, torch_images, labels = augmented
  # The two pipelines fed the same pixels to the two frameworks.
  assert np.max(np.abs(ours_images - nchw_to_nhwc(torch_images.numpy()))) <= TOL['pixel_abs']

  tmodel = random_torchvision_model('resnet18', 2, seed=3).double()
  initial = state_dict_numpy(tmodel)
  torch_losses = _torch_run(tmodel, strategy, bn, torch_images.double(), labels)
  with jax.enable_x64(True):
    variables = torch_to_flax(initial, 'resnet18')
    losses, state, _ = _jax_run(variables, strategy, bn, ours_images.astype(np.float64), labels)
    state = jax.device_get(state)

  assert within(np.max(np.abs(np.subtract(losses, torch_losses))), 'train_loss_abs_f64',
                f'5 SGD steps float64 {strategy}/bn={bn}: loss per step (abs)'), (losses, torch_losses)

  final_torch = state_dict_numpy(tmodel)
  moved = 0
  for entry in name_table('resnet18'):
    tree = state.params if entry.collection == 'params' else state.batch_stats
    ours = np.asarray(functools.reduce(lambda t, k: t[k], entry.path, tree))
    if entry.kind == 'conv':
      ours = ours.transpose(3, 2, 0, 1)
    elif entry.kind == 'linear_w':
      ours = ours.T
    start, theirs = initial[entry.torch_name], final_torch[entry.torch_name]
    if np.array_equal(start, theirs):
      # Torch left it alone (frozen parameter, or eval-mode BN stats): so must we, bit for bit.
      assert np.array_equal(ours, start), entry.torch_name
      continue
    moved += 1
    # Compare the change, not the values: a 5-step change is small next to the weights.
    err = rel_err(ours - start, theirs - start)
    assert within(err, 'train_delta_rel_f64', f'5 SGD steps float64 {strategy}/bn={bn}: param/BN-stat change (rel)'), \
        (entry.torch_name, err)
  expected_moved = {('frozen', 'frozen'): 2, ('frozen', 'train'): 2 + 2 * 20,
                    ('finetune', 'frozen'): 62, ('finetune', 'train'): 62 + 2 * 20}[(strategy, bn)]
  assert moved == expected_moved


def _count_convs(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      count += 1
    for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, 'subjaxprs') else []:
      count += _count_convs(sub)
    for param in eqn.params.values():
      # A cond's branches (lax.platform_dependent in fast_conv's backward) come as a tuple.
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
          count += _count_convs(sub.jaxpr)
        elif hasattr(sub, 'eqns'):
          count += _count_convs(sub)
  return count


def test_frozen_strategy_runs_no_backward_pass_through_the_backbone():
  """resnet18 has 20 convs; finetune's step also has their input/weight gradients, frozen's none."""
  model = create_model('resnet18', 2)
  variables = torch_to_flax(state_dict_numpy(random_torchvision_model('resnet18', 2)), 'resnet18')
  batch = {'images': jnp.zeros((2, 64, 64, 3)), 'labels': jnp.zeros(2, jnp.int32), 'mask': jnp.ones(2, bool)}
  counts = {}
  for strategy in ('frozen', 'finetune'):
    state = make_state(model, variables, strategy)
    fn = functools.partial(train_step, model=model, trainable=optim.trainable_mask(state.params, strategy),
                           bn_train=True)
    counts[strategy] = _count_convs(jax.make_jaxpr(fn)(state, batch).jaxpr)
  assert counts['frozen'] == 20
  assert counts['finetune'] > 2 * 20


def test_eval_step_masks_padding_rows():
  model = create_model('resnet18', 3)
  variables = torch_to_flax(state_dict_numpy(random_torchvision_model('resnet18', 3)), 'resnet18')
  state = make_state(model, variables)
  images = np.random.default_rng(0).standard_normal((4, 64, 64, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 0], np.int32)
  full = eval_step(state, model=model, batch={'images': images, 'labels': labels, 'mask': np.ones(4, bool)})
  head = eval_step(state, model=model, batch={'images': images[:2], 'labels': labels[:2], 'mask': np.ones(2, bool)})
  padded = eval_step(state, model=model, batch={'images': images, 'labels': labels, 'mask': np.array([True, True, False, False])})
  assert float(padded['count']) == 2
  np.testing.assert_allclose(float(padded['loss_sum']), float(head['loss_sum']), rtol=1e-6)
  assert float(padded['correct']) == float(head['correct'])
  assert float(full['count']) == 4


@pytest.mark.parametrize('strategy', ['frozen', 'finetune'])
@pytest.mark.slow
def test_first_sgd_steps_match_pytorch_in_float32(augmented, strategy):
  """The float32 path the trainer runs: the first loss (the forward alone) equals torch's; the second,
  after one update from float32 gradients, is at least as close to the float64 run as torch's float32.

  Past the first update the two float32 runs differ by their rounding, amplified by the step: in
  finetune torch float32's second loss is itself ~1e-4 from the float64 one, so a direct
  comparison with torch would measure torch's rounding more than ours.
  """
  ours_images, torch_images, labels = augmented
  tmodel = random_torchvision_model('resnet18', 2, seed=3)
  variables = torch_to_flax(state_dict_numpy(tmodel), 'resnet18')
  reference = _torch_run(random_torchvision_model('resnet18', 2, seed=3).double(), strategy, 'train',
                         torch_images.double(), labels)[:2]
  torch_losses = _torch_run(tmodel, strategy, 'train', torch_images, labels)
  losses, _, _ = _jax_run(variables, strategy, 'train', ours_images, labels)
  assert within(abs(losses[0] - torch_losses[0]), 'train_loss_abs',
                f'first SGD step float32 {strategy}: loss (abs)'), (losses, torch_losses)
  ours_error, torch_error = abs(losses[1] - reference[1]), abs(torch_losses[1] - reference[1])
  allowed = max(TOL['train_loss_f32_error_ratio'] * torch_error, TOL['train_loss_f32_error_floor'])
  assert within(ours_error / allowed, 'train_loss_f32_budget', f'second SGD step float32 {strategy}: |ours - f64| / '
                f'max(2 |torch f32 - f64|, 1e-5) (ours {ours_error:.1e}, torch {torch_error:.1e})'), \
      (losses, torch_losses, reference)


def test_prediction_figure_samples_span_every_class_in_the_val_batch_shape():
  from tl_jax.data.loader import Loader
  from tl_jax.training.pipeline import spread_sample_loader
  samples = [(f'{c}_{i}.jpg', label) for label, c in enumerate('abc') for i in range(7)]
  loader = Loader(samples, lambda img, _rng: np.zeros((2, 2, 3), np.float32), batch_size=32, shuffle=False,
                  workers=0, load=lambda path: path)
  batch = next(iter(spread_sample_loader(loader, 6).epoch(0)))
  assert batch.images.shape[0] == 32 and int(batch.mask.sum()) == 6
  # Evenly spaced over 21 class-sorted samples: positions 0, 4, 8, 12, 16, 20.
  assert batch.labels[batch.mask].tolist() == [0, 0, 1, 1, 2, 2]


def _timed_loader(seconds_per_sample, num_samples=6, prefetch=2):
  import time as _time
  from tl_jax.data.loader import Loader

  def load(path):
    _time.sleep(seconds_per_sample)
    return path

  samples = [(str(i), 0) for i in range(num_samples)]
  return Loader(samples, lambda img, _rng: np.zeros((2, 2, 3), np.float32), batch_size=1, shuffle=False,
                workers=1, prefetch=prefetch, load=load)


def _step_taking(seconds):
  """A step whose outputs become ready `seconds` after dispatch, as an asynchronous device step does."""
  import concurrent.futures
  import time as _time
  pool = concurrent.futures.ThreadPoolExecutor(1)

  class Pending:
    def __init__(self):
      self.done = pool.submit(_time.sleep, seconds)

    def is_ready(self):
      return self.done.done()

    def __array__(self, dtype=None, copy=None):
      self.done.result()
      return np.asarray(1.0, dtype)

  def step(state, batch):
    pending = Pending()
    return state, {'loss_sum': pending, 'correct': pending, 'count': pending}

  return step


def test_starvation_counts_waits_with_no_step_running_and_not_waits_behind_a_running_step():
  from tl_jax.training import run_phase
  # Data-bound: every batch takes 0.1 s to load, steps are instant, so the device starves ~0.6 s.
  _, totals, starved = run_phase(_step_taking(0.0), None, _timed_loader(0.1), 0, True, False, 'train')
  assert totals['count'] == 6
  assert starved >= 0.4
  # Step-bound: a batch takes 0.1 s and is only started when the previous one is taken, a step
  # 0.2 s. The host waits ~0.1 s for every batch, but behind a running step: only the first
  # fetch starves the device.
  _, _, starved = run_phase(_step_taking(0.2), None, _timed_loader(0.1, prefetch=1), 0, True, False, 'train')
  assert starved < 0.25


# ----------------------------------------------------------------------------- stages and the loop

SMALL_TRANSFORMS = {
    'train_transforms': [{'RandomResizedCrop': {'size': 32}}, {'RandomHorizontalFlip': {}}, {'ToTensor': {}},
                         {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]}}],
    'val_transforms': [{'Resize': {'size': 36}}, {'CenterCrop': {'size': 32}}, {'ToTensor': {}},
                       {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]}}],
}


def _small_folder(root, per_class=6, val_per_class=3):
  return two_class_folder(root, per_class, val_per_class)


def _small_config(tmp_path, stages, **data):
  from tl_jax.config import validate
  return validate({'model': {'arch': 'resnet18', 'weights': 'random'},
                   'data': {'path': str(_small_folder(tmp_path / 'data')), 'batch_size': 4, 'eval_batch_size': 8,
                            'workers': 0, **SMALL_TRANSFORMS, **data},
                   'stages': stages, 'seed': 0})


class _Crash(Exception):
  pass


class _Recorder:
  """A Callback: what was called, in order (epoch and stage level), and a crash after a given epoch."""

  def __init__(self, crash_after_epoch=None):
    self.calls, self.crash_after_epoch, self.steps = [], crash_after_epoch, 0

  def on_run_start(self, run):
    self.calls.append('run_start')

  def on_stage_start(self, run, stage, state):
    self.calls.append(f'stage_start {stage.name}')

  def on_epoch_start(self, run, epoch):
    self.calls.append(f'epoch_start {epoch}')

  def on_step_start(self, run, phase, step):
    pass

  def on_step_end(self, run, phase, step, sums):
    self.steps += phase == 'train'

  def on_epoch_end(self, run, epoch, state, row):
    self.calls.append(f'epoch_end {epoch}')
    if epoch == self.crash_after_epoch:
      raise _Crash(epoch)

  def on_stage_end(self, run, stage, state):
    self.calls.append(f'stage_end {stage.name}')

  def on_run_end(self, run, result):
    self.calls.append('run_end')


@pytest.mark.slow
def test_train_and_evaluate_calls_its_extension_points_and_resumes_after_a_crash_in_process(tmp_path):
  """The real loop, head only on a generated 40x48 folder: a run that dies after epoch 0 and is resumed
  ends with the uninterrupted run's numbers; callbacks hear every run, stage, epoch and step."""
  from tl_jax.training import train_and_evaluate
  config = _small_config(tmp_path, [{'name': 'head', 'epochs': 2, 'trainable': ['head'],
                                     'optimizer': {'name': 'sgd', 'lr': 0.01, 'momentum': 0.9}}])
  quiet = dict(progress=False, plots=False, report=False, log=lambda _: None)
  straight = _Recorder()
  expected = train_and_evaluate(config, tmp_path / 'straight', callbacks=[straight], **quiet)
  assert straight.calls == ['run_start', 'stage_start head', 'epoch_start 0', 'epoch_end 0', 'epoch_start 1',
                            'epoch_end 1', 'stage_end head', 'run_end']
  assert straight.steps == 2 * 3   # 12 train images in batches of 4, two epochs
  with pytest.raises(_Crash):
    train_and_evaluate(config, tmp_path / 'crashed', callbacks=[_Recorder(crash_after_epoch=0)], **quiet)
  resumed = _Recorder()
  result = train_and_evaluate(config, tmp_path / 'crashed', resume=True, callbacks=[resumed], **quiet)
  assert resumed.calls[:3] == ['run_start', 'stage_start head', 'epoch_start 1']
  for ours, theirs in zip(result.history, expected.history):
    for key in ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'lr'):
      assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key


@pytest.mark.slow
def test_stages_run_in_order_with_fresh_optimizers_and_carry_weights_and_bn_stats(tmp_path):
  from tl_jax.training import loop, pipeline, stages
  config = _small_config(tmp_path, [
      {'name': 'head', 'epochs': 2, 'trainable': ['head'], 'optimizer': {'name': 'sgd', 'lr': 0.01, 'momentum': 0.9},
       'schedule': {'name': 'step', 'step_size': 1, 'gamma': 0.5}},
      {'name': 'all', 'epochs': 1, 'trainable': 'all', 'optimizer': {'name': 'sgd', 'lr': 0.001, 'momentum': 0.9}}])
  data = pipeline.load_data(config)
  from tl_jax.weights import IMAGENET_PREPROCESSING
  loaders = pipeline.make_loaders(config, data, pipeline.make_transforms(config, IMAGENET_PREPROCESSING))
  model = create_model('resnet18', 2)
  variables = stages.initial_variables('resnet18', 2, 0)
  initial = jax.device_get(variables)   # the steps donate (delete) the arrays they are given
  examples = [next(iter(loader.epoch(0))).as_dict() for loader in loaders]
  compiled = {}
  state, head = stages.setup_stage(config, 0, model, variables, len(loaders[0]), *examples, compiled)
  assert (head.first_epoch, head.epochs, head.lrs) == (0, 2, [0.01, 0.005])
  for epoch in range(2):
    state, row = loop.run_epoch(head, state, *loaders, epoch)
    assert (row['stage'], row['stage_epoch'], row['lr']) == ('head', epoch, head.lrs[epoch])
  assert int(state.step) == 2 * len(loaders[0])
  # Head only: the backbone's weights did not move, its BN statistics did (bn: train).
  np.testing.assert_array_equal(state.params['layer1_0']['conv1']['kernel'],
                                initial['params']['layer1_0']['conv1']['kernel'])
  assert not np.array_equal(state.batch_stats['bn1']['mean'], initial['batch_stats']['bn1']['mean'])

  carried = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  state2, stage2 = stages.setup_stage(config, 1, model, carried, len(loaders[0]), *examples, compiled)
  # A new stage starts a new optimizer: step 0, no momentum yet; weights and BN stats carry over.
  assert int(state2.step) == 0 and stage2.first_epoch == 2 and stage2.lrs == [0.001]
  assert all(not np.any(leaf) for leaf in jax.tree_util.tree_leaves(state2.opt_state))
  np.testing.assert_array_equal(state2.params['fc']['kernel'], carried['params']['fc']['kernel'])
  np.testing.assert_array_equal(state2.batch_stats['bn1']['var'], carried['batch_stats']['bn1']['var'])
  assert len(compiled) == 2 and stage2.compile_seconds['train_step'] > 0


@pytest.mark.slow
def test_a_stage_equal_to_an_earlier_one_reuses_its_compiled_steps(tmp_path):
  from tl_jax.training import pipeline, stages
  same = {'trainable': ['layer4', 'head'], 'optimizer': {'name': 'sgd', 'lr': 0.01}}
  config = _small_config(tmp_path, [{'name': 'a', 'epochs': 1, **same}, {'name': 'b', 'epochs': 1, **same}])
  from tl_jax.weights import IMAGENET_PREPROCESSING
  data = pipeline.load_data(config)
  loaders = pipeline.make_loaders(config, data, pipeline.make_transforms(config, IMAGENET_PREPROCESSING))
  model = create_model('resnet18', 2)
  variables = stages.initial_variables('resnet18', 2, 0)
  examples = [next(iter(loader.epoch(0))).as_dict() for loader in loaders]
  compiled = {}
  _, first = stages.setup_stage(config, 0, model, variables, len(loaders[0]), *examples, compiled)
  _, second = stages.setup_stage(config, 1, model, variables, len(loaders[0]), *examples, compiled)
  assert first.compile_seconds['train_step'] > 0 and second.compile_seconds == {'train_step': 0.0, 'eval_step': 0.0}
  assert second.train_fn is first.train_fn and len(compiled) == 1


@pytest.mark.slow
def test_train_and_evaluate_two_stages_keeps_the_best_epoch_over_the_whole_run(tmp_path):
  import json
  from tl_jax import checkpoint
  from tl_jax.training import train_and_evaluate
  config = _small_config(tmp_path, [
      {'name': 'head', 'epochs': 2, 'trainable': ['head'], 'optimizer': {'name': 'sgd', 'lr': 0.01, 'momentum': 0.9}},
      {'name': 'finetune', 'epochs': 2, 'trainable': 'all',
       'optimizer': {'name': 'sgd', 'lr': 0.001, 'momentum': 0.9}}])
  lines = []
  result = train_and_evaluate(config, tmp_path / 'run', progress=False, plots=False, log=lines.append)
  history = json.loads((tmp_path / 'run' / 'history.json').read_text())['epochs']
  assert [(r['epoch'], r['stage'], r['stage_epoch'], r['lr']) for r in history] == [
      (0, 'head', 0, 0.01), (1, 'head', 1, 0.01), (2, 'finetune', 0, 0.001), (3, 'finetune', 1, 0.001)]
  accs = [r['val_acc'] for r in history]
  best_epoch = accs.index(max(accs))   # first epoch reaching the maximum: strict >
  assert (result.best_epoch, result.best_val_acc) == (best_epoch, max(accs))
  best = checkpoint.load_model(tmp_path / 'run')
  assert best.metadata['epoch'] == best_epoch and best.metadata['stage'] == history[best_epoch]['stage']
  from tl_jax.data.augment import build_pipeline
  assert build_pipeline(best.metadata['val_transforms']) == build_pipeline(SMALL_TRANSFORMS['val_transforms'])
  # One compile per distinct trainable set.
  assert sum('compiled train_step' in line for line in lines) == 2


@pytest.mark.slow
def test_uint8_batches_normalised_on_the_device_train_exactly_like_float_batches(tmp_path):
  """data.uint8_batches: 4x fewer bytes to the device, the same float32 pixels, so the same run."""
  from tl_jax.training import train_and_evaluate
  stages = [{'name': 'all', 'epochs': 1, 'trainable': 'all', 'optimizer': {'name': 'sgd', 'lr': 0.01}}]
  runs = {}
  for uint8 in (False, True):
    config = _small_config(tmp_path / str(uint8), stages, uint8_batches=uint8)
    lines = []
    runs[uint8] = train_and_evaluate(config, tmp_path / f'run_{uint8}', progress=False, plots=False, report=False,
                                     log=lines.append).history[0]
    assert ('uint8, normalised on the device' in '\n'.join(lines)) == uint8
  for key in ('train_loss', 'train_acc', 'val_loss', 'val_acc'):
    assert runs[True][key] == runs[False][key], key


@pytest.mark.parametrize('name', ['frozen', 'finetune', 'two_stage', 'resnet101_two_stage', 'vgg16_classifier',
                                  'modern_finetune'])
@pytest.mark.slow
def test_every_shipped_config_runs_one_short_epoch_per_stage(tmp_path, name):
  """The shipped recipes as they are (stages, optimizers, schedules, transforms), with a small arch swapped in,
  one epoch per stage on a tiny folder."""
  from pathlib import Path
  from tl_jax.config import apply_overrides, read_yaml, validate
  from tl_jax.training import train_and_evaluate
  from tl_jax.config import preset_path
  file = preset_path(name.replace('_', '-')) if name in ('frozen', 'finetune', 'two_stage') else (
      Path(__file__).resolve().parents[1] / 'configs' / f'{name}.yaml')
  values = read_yaml(file)
  small_arch = 'vgg11' if values['model']['arch'].startswith('vgg') else 'resnet18'
  config = validate(apply_overrides(values, {
      'arch': small_arch, 'weights': 'random', 'data': str(_small_folder(tmp_path / 'data', 4, 2)),
      'epochs': 1, 'batch_size': 4, 'eval_batch_size': 4, 'workers': 0}))
  result = train_and_evaluate(config, tmp_path / 'run', progress=False, plots=False, report=False,
                              log=lambda _: None)
  assert [row['stage'] for row in result.history] == [s['name'] for s in values['stages']]
  assert all(np.isfinite(row['train_loss']) and np.isfinite(row['val_loss']) for row in result.history)


@pytest.mark.parametrize('policy,val_rows', [('auto', True), (True, True), (False, False)])
def test_val_rows_are_kept_under_the_decoded_cache_policy_and_their_images_are_not(tmp_path, policy, val_rows):
  from tl_jax.training import pipeline
  from tl_jax.weights import IMAGENET_PREPROCESSING
  config = _small_config(tmp_path, [{'name': 'head', 'epochs': 1, 'trainable': ['head']}], cache_decoded=policy)
  data = pipeline.load_data(config)
  opened = []
  load = data.load
  data = dataclasses.replace(data, load=lambda key: opened.append(key) or load(key))
  train, val = pipeline.make_loaders(config, data, pipeline.make_transforms(config, IMAGENET_PREPROCESSING))
  for epoch in range(2):
    for loader in (train, val):
      list(loader.epoch(epoch))
  val_keys = {key for key, _ in data.val.samples}
  # Random train transforms: never rows, but decoded images when the policy caches.
  assert train.cached_row_bytes == 0
  assert (val.cached_row_bytes > 0) == val_rows
  train_opens = [key for key in opened if key not in val_keys]
  assert len(train_opens) == len(data.train.samples) * (1 if policy is not False else 2)
  # Kept rows: each val image is opened once; without them, every epoch.
  assert len(opened) - len(train_opens) == len(val_keys) * (1 if val_rows else 2)
