"""The torch reference: what frozen leaves alone, and StepLR's learning rate per epoch."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

from tl_jax.config import TutorialRecipe  # noqa: E402
from benchmarks import torch_tutorial  # noqa: E402


def _tiny_image_folder(root, train_per_class=4, val_per_class=2, size=40):
  """train/ and val/ with classes 'ants' (dark noise) and 'bees' (bright noise) as JPEGs."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, count in (('train', train_per_class), ('val', val_per_class)):
    for name, low in (('ants', 0), ('bees', 128)):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(low, low + 128, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'{i}.jpg')
  return root


def _params(model):
  return {k: v.detach().clone() for k, v in model.named_parameters()}


def _run(tmp_path, epochs, **overrides):
  root = _tiny_image_folder(tmp_path / 'data')
  config = TutorialRecipe(arch='resnet18', weights='random', epochs=epochs, workers=0, **overrides)
  torch.manual_seed(config.seed)
  initial = torch_tutorial.build_model(config.arch, 2, config.strategy)
  result = torch_tutorial.train_torch(config, root, log=lambda _: None, device='cpu')
  return initial, result


def test_frozen_changes_fc_only_and_lr_steps_per_epoch(tmp_path):
  initial, result = _run(tmp_path, 2, strategy='frozen', step_size_epochs=1, gamma=0.5)
  before, after = _params(initial), _params(result.model)
  backbone = [k for k in before if not k.startswith('fc.')]
  assert backbone
  for name in backbone:
    assert bool((before[name] == after[name]).all()), name
  # The returned model is the best epoch's; with best_epoch -1 (val acc 0 in every epoch) it would be
  # the initial one. A constant prediction already scores 0.5 on the balanced val set.
  assert result.best_epoch in (0, 1)
  for name in ('fc.weight', 'fc.bias'):
    assert not bool((before[name] == after[name]).all()), name
  # As in the tutorial, frozen still trains in model.train(): BN running statistics move.
  assert not bool((dict(initial.named_buffers())['bn1.running_mean']
                   == dict(result.model.named_buffers())['bn1.running_mean']).all())
  assert [row['epoch'] for row in result.history] == [0, 1]
  expected_keys = {'epoch', 'lr', 'train_loss', 'train_acc', 'val_loss', 'val_acc', 'train_seconds',
                   'val_seconds', 'seconds', 'data_wait_seconds'}
  assert expected_keys <= set(result.history[0])
  assert [row['lr'] for row in result.history] == pytest.approx([0.001, 0.0005])


def test_frozen_bn_keeps_running_stats(tmp_path):
  initial, result = _run(tmp_path, 1, strategy='finetune', bn='frozen', lr=0.1)
  buffers_before = dict(initial.named_buffers())
  buffers_after = dict(result.model.named_buffers())
  for name, value in buffers_before.items():
    if name.endswith('running_mean') or name.endswith('running_var'):
      assert bool((value == buffers_after[name]).all()), name
  assert not bool((_params(initial)['conv1.weight'] == _params(result.model)['conv1.weight']).all())


def test_steplr_per_epoch():
  config = TutorialRecipe(strategy='frozen', arch='resnet18')
  model = torch_tutorial.build_model(config.arch, 2, config.strategy)
  optimizer, scheduler = torch_tutorial.build_optimizer(model, config)
  lrs = []
  for _ in range(25):
    lrs.append(optimizer.param_groups[0]['lr'])
    optimizer.step()
    scheduler.step()
  expected = [0.001 * 0.1 ** (epoch // 7) for epoch in range(25)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-12)
  assert lrs[6] == pytest.approx(1e-3) and lrs[7] == pytest.approx(1e-4)
  assert lrs[13] == pytest.approx(1e-4) and lrs[14] == pytest.approx(1e-5)


def test_optimizer_holds_fc_only_when_frozen():
  model = torch_tutorial.build_model('resnet18', 2, 'frozen')
  optimizer, _ = torch_tutorial.build_optimizer(model, TutorialRecipe(strategy='frozen'))
  held = {id(p) for group in optimizer.param_groups for p in group['params']}
  assert held == {id(model.fc.weight), id(model.fc.bias)}
  trainable = [name for name, p in model.named_parameters() if p.requires_grad]
  assert trainable == ['fc.weight', 'fc.bias']



@pytest.mark.slow
def test_the_benchmarks_spawned_child_forks_its_dataloader_workers(tmp_path):
  # The benchmark starts the reference with `spawn`, which becomes the child's own default start
  # method; the tutorial's workers must still be forked, as they are when it runs on Linux.
  from benchmarks import epochs
  root = str(_tiny_image_folder(tmp_path / 'data', train_per_class=1, val_per_class=1))
  assert epochs.in_torch_child(torch_tutorial.process_start_method) == 'spawn'
  assert epochs.in_torch_child(torch_tutorial.loader_start_methods, root, 2) == {'train': 'fork', 'val': 'fork'}
  assert epochs.in_torch_child(torch_tutorial.loader_start_methods, root, 0) == {'train': 'none', 'val': 'none'}
