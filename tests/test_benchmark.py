"""The benchmark: its arithmetic on made-up histories, and one tiny run of both frameworks."""

import math

import pytest

from test_scripts import make_folder, run_script
from benchmarks import epochs, steps


def _run(framework, seconds):
  """A FrameworkRun whose epoch i took seconds[i] = (train, val), with 1 s of data wait each."""
  history = [{'epoch': i, 'train_seconds': t, 'val_seconds': v, 'seconds': t + v, 'data_wait_seconds': 1.0}
             for i, (t, v) in enumerate(seconds)]
  return epochs.FrameworkRun(framework, history, {}, 0.5, 0, sum(t + v for t, v in seconds))


def test_steady_state_drops_the_first_epoch_and_ratios_are_ours_over_torch():
  runs = {'tl_jax': _run('tl_jax', [(100.0, 50.0), (8.0, 2.0), (12.0, 2.0)]),
          'torch': _run('torch', [(30.0, 9.0), (20.0, 4.0), (20.0, 4.0)])}
  summary = epochs.summarize(runs, {'train': 200, 'val': 100})
  ours, theirs = summary['tl_jax'], summary['torch']
  assert ours['epochs'] == [1, 2]
  assert ours['train_seconds'] == pytest.approx(10.0) and ours['seconds'] == pytest.approx(12.0)
  assert ours['train_images_per_second'] == pytest.approx(20.0)
  assert ours['val_images_per_second'] == pytest.approx(50.0)
  assert ours['data_wait_fraction'] == pytest.approx(2.0 / 20.0)
  ratio = summary['ratio_tl_jax_over_torch']
  assert ratio['seconds'] == pytest.approx(12.0 / 24.0)
  assert ratio['train_seconds'] == pytest.approx(10.0 / 20.0)
  assert ratio['val_seconds'] == pytest.approx(2.0 / 4.0)
  assert theirs['seconds'] == pytest.approx(24.0)


def test_one_epoch_is_its_own_steady_state_and_one_framework_has_no_ratio():
  summary = epochs.summarize({'tl_jax': _run('tl_jax', [(4.0, 1.0)])}, {'train': 8, 'val': 4})
  assert summary['tl_jax']['epochs'] == [0]
  assert summary['tl_jax']['train_images_per_second'] == pytest.approx(2.0)
  assert 'ratio_tl_jax_over_torch' not in summary


@pytest.mark.slow
def test_both_frameworks_train_the_tiny_folder_and_the_report_has_every_epoch(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  root = make_folder(tmp_path / 'data')
  report = epochs.run_benchmark(root, strategies=('frozen',), epochs=2, workers=0, log=lambda _: None)
  entry = report['strategies']['frozen']
  assert report['dataset_sizes'] == {'train': 8, 'val': 4, 'classes': 2}
  for name in epochs.FRAMEWORKS:
    history = entry['runs'][name]['history']
    assert [row['epoch'] for row in history] == [0, 1]
    assert all(row['train_seconds'] > 0 and row['val_seconds'] > 0 for row in history)
    # Both ran the tutorial's learning rate in both epochs (StepLR steps at epoch 7).
    assert [row['lr'] for row in history] == pytest.approx([0.001, 0.001])
  assert set(entry['runs']['tl_jax']['compile_seconds']) == {'train_step', 'eval_step'}
  ratio = entry['summary']['ratio_tl_jax_over_torch']['seconds']
  assert math.isfinite(ratio) and ratio > 0
  text = epochs.format_report(report)
  assert 'ratio tl_jax/torch' in text and 'frozen, 2 epoch(s)' in text
  summary_line = next(line for line in text.splitlines() if line.startswith('frozen     train'))
  assert f'{ratio:.2f}' in summary_line and 'machine:' in text
  # workers=0: the torch child loads in-process and says so; the FLOP lines are there for both frameworks.
  assert '(started by none)' in text
  assert 'FLOPs per epoch' in text and "the epoch's floor" in text
  assert 'tl_jax achieved' in text and 'torch achieved' in text


def test_script_refuses_bad_flags():
  proc = run_script('benchmark.py', '--epochs', '0', check=False, folder='benchmarks')
  assert proc.returncode == 2 and '--epochs must be >= 1' in proc.stderr
  proc = run_script('benchmark.py', '--bn', 'sometimes', check=False, folder='benchmarks')
  assert proc.returncode == 2 and "unknown --strategies/--bn value(s) ['sometimes']" in proc.stderr
  proc = run_script('benchmark.py', '--skip-torch', '--skip-jax', check=False, folder='benchmarks')
  assert proc.returncode == 2 and 'leave nothing to run' in proc.stderr


@pytest.mark.slow
def test_step_time_and_memory_reports_a_step_and_the_peak_rss():
  result = steps.step_time_and_memory('resnet18', batch_size=2, strategy='frozen', image_size=32, steps=1)
  assert result['step_seconds'] > 0 and result['compile_seconds'] > 0
  assert 0.1 < result['peak_rss_gib'] < 24


@pytest.mark.parametrize('arch', ['resnet18', 'vgg11'])
@pytest.mark.parametrize('strategy', ['frozen', 'finetune'])
def test_epoch_flops_equal_torchs_flop_counter(arch, strategy):
  # torch counts the FLOPs of the tutorial's own step (forward, and the backward autograd runs for
  # the parameters that require grad) and of an eval forward; ours come from the jaxprs.
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  from torch.utils.flop_counter import FlopCounterMode
  from tl_jax.config import TutorialRecipe
  from benchmarks import torch_tutorial
  size, batch = 64, 4
  model = torch_tutorial.build_model(arch, 2, strategy) if arch.startswith('resnet') else getattr(
      torchvision.models, arch)(num_classes=2)
  if not arch.startswith('resnet') and strategy == 'frozen':   # the classifier's last Linear learns
    for name, param in model.named_parameters():
      param.requires_grad = name.startswith('classifier.6.')
  images = torch.randn(batch, 3, size, size)
  with FlopCounterMode(display=False) as train_count:
    model.train()
    model(images).sum().backward()
  with FlopCounterMode(display=False) as val_count, torch.no_grad():
    model.eval()
    model(images)
  ours = epochs.epoch_flops(TutorialRecipe(arch=arch, strategy=strategy), {'train': 8, 'val': 3}, 2,
                               image_size=size)
  # VGG's adaptive average pool (2x2 -> 7x7 at 64 px) is a small matmul in tl_jax, a copy in torch.
  rel = 1e-9 if arch.startswith('resnet') else 2e-4
  assert ours['train_per_image'] == pytest.approx(train_count.get_total_flops() / batch, rel=rel)
  assert ours['val_per_image'] == pytest.approx(val_count.get_total_flops() / batch, rel=rel)
  assert ours['epoch'] == pytest.approx(8 * ours['train_per_image'] + 3 * ours['val_per_image'])


def test_matmul_rates_are_positive():
  pytest.importorskip('torch')
  assert epochs.jax_matmul_gflops(n=256, repeats=2) > 0
  assert epochs.torch_matmul_gflops(n=256, repeats=2) > 0
