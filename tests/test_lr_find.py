"""The LR range test (tl_jax.training.lr_find): fastai's sweep, smoothing, stop and suggestion, and the
command (`train.py --lr-find`, scripts/lr_find.py) on a tiny generated folder."""

import hashlib
import math
import runpy
from pathlib import Path

import numpy as np
import pytest

from tl_jax import cli
from tl_jax.training import lr_find as lr_find_lib

REPO = Path(__file__).resolve().parents[1]


def test_the_sweep_is_fastais_exponential_schedule():
  lrs = lr_find_lib.exponential_lrs(1e-7, 10.0, 100)
  # fastai: SchedExp(start, end)(pos) = start * (end / start) ** pos at pos = train_iter / num_it.
  expected = [1e-7 * (10.0 / 1e-7) ** (i / 100) for i in range(100)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-12)
  schedule_of = lr_find_lib.sweep_schedules(1e-7, 10.0, 100, base_lr=0.01)
  # A param group at 10x the optimizer's lr sweeps at 10x the lr.
  np.testing.assert_allclose([float(schedule_of(0.1)(i)) for i in (0, 50, 99)],
                             [10 * expected[i] for i in (0, 50, 99)], rtol=1e-5)


def test_smoothing_is_fastais_avg_smooth_loss():
  torch = pytest.importorskip('torch')
  losses = [2.3, 2.1, 2.2, 1.7, 1.5, 1.9, 3.0]
  # fastai's AvgSmoothLoss: val = torch.lerp(loss, val, beta); value = val / (1 - beta ** count).
  val, expected = torch.tensor(0.0, dtype=torch.float64), []
  for count, loss in enumerate(losses, 1):
    val = torch.lerp(torch.tensor(loss, dtype=torch.float64), val, 0.98)
    expected.append(float(val / (1 - 0.98 ** count)))
  np.testing.assert_allclose(lr_find_lib.smooth(losses), expected, rtol=1e-12)


def test_the_suggestion_is_the_steepest_descent_against_log_lr():
  lrs = list(lr_find_lib.exponential_lrs(1e-5, 1.0, 50))
  # Flat, then falling fastest around 1e-3, then rising.
  curve = [2.0 - math.tanh((math.log10(lr) + 3) * 2) + (max(0.0, math.log10(lr) + 1.5) ** 2) for lr in lrs]
  suggested = lr_find_lib.suggest(lrs, curve)
  assert 5e-4 < suggested < 2e-3
  assert lr_find_lib.suggest(lrs[:1], curve[:1]) is None


def test_the_sweep_stops_once_the_smoothed_loss_passes_four_times_its_best():
  losses = iter([1.0] * 20 + [50.0] * 20)
  recorded, smoothed, diverged = lr_find_lib.record_until_divergence(lambda: next(losses), range(40))
  assert diverged and smoothed[-1] > 4 * min(smoothed) and all(s <= 4 * min(smoothed) for s in smoothed[:-1])
  assert len(recorded) < 40
  nan = iter([1.0, float('nan')])
  recorded, _, diverged = lr_find_lib.record_until_divergence(lambda: next(nan), range(10))
  assert diverged and len(recorded) == 2
  recorded, _, diverged = lr_find_lib.record_until_divergence(lambda: 1.0, range(10))
  assert not diverged and len(recorded) == 10


def _main(args, capsys):
  from tl_jax.commands import train
  with pytest.raises(SystemExit) as info:
    cli.run(lambda: train.main([str(a) for a in args], prog='tl-jax train'))
  captured = capsys.readouterr()
  return info.value.code, captured.out, captured.err


@pytest.mark.parametrize('args, message', [
    (['--start-lr', '1e-3'], '--start-lr belong to --lr-find'),
    (['--lr-find', '--resume'], '--lr-find sweeps from the recipe\'s initial weights; leave out --resume'),
])
def test_bad_finder_flags_are_one_line_errors(args, message, capsys, tmp_path):
  code, _, err = _main(['--strategy', 'frozen', '--weights', 'random', '--workdir', tmp_path / 'w', *args], capsys)
  assert code == 2 and message in err and 'Traceback' not in err, err


def test_bad_ranges_and_stages_are_named():
  with pytest.raises(lr_find_lib.LRFindError, match='--start-lr 1 --end-lr 0.1'):
    lr_find_lib.check_range(1.0, 0.1, 10)
  with pytest.raises(lr_find_lib.LRFindError, match='--steps must be an integer >= 2'):
    lr_find_lib.check_range(1e-7, 1.0, 1)
  from tl_jax.config import validate
  config = validate({'model': {'weights': 'random'},
                     'stages': [{'name': 'head', 'epochs': 1}, {'name': 'all', 'epochs': 1}]})
  assert lr_find_lib.stage_index(config, 'all') == 1 and lr_find_lib.stage_index(config, '0') == 0
  with pytest.raises(lr_find_lib.LRFindError, match="no such stage; its stages are head, all"):
    lr_find_lib.stage_index(config, 'tail')


def _folder(root, per_class=6):
  from PIL import Image
  rng = np.random.default_rng(5)
  for split, n in (('train', per_class), ('val', 2)):
    for label, cls in enumerate(('ants', 'bees')):
      folder = root / split / cls
      folder.mkdir(parents=True)
      for i in range(n):
        pixels = np.clip(rng.normal(70 + 110 * label, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f'{cls}_{i}.png')
  return root


RECIPE = """
model: {arch: resnet18, weights: random}
data:
  batch_size: 4
  workers: 0
  train_transforms: [{RandomResizedCrop: {size: 32}}, {ToTensor: {}},
                     {Normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}]
  val_transforms: [{Resize: {size: 32}}, {CenterCrop: {size: 32}}, {ToTensor: {}},
                   {Normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}]
stages:
  - name: head
    epochs: 1
    trainable: [head]
    optimizer: {name: sgd, lr: 0.01, momentum: 0.9}
  - name: all
    epochs: 1
    accumulate: 2
    clip_grad_norm: 5.0
    optimizer: {name: sgd, lr: 0.01, momentum: 0.9, layer_decay: 0.5, norm_weight_decay: 0.0}
"""


def _digest(folder: Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.slow
def test_lr_find_writes_its_plot_suggests_an_lr_and_leaves_the_run_alone(tmp_path, capsys):
  data = _folder(tmp_path / 'data')
  recipe = tmp_path / 'recipe.yaml'
  recipe.write_text(RECIPE)
  workdir = tmp_path / 'run'
  # A run's files, which the finder must leave as they are.
  (workdir / 'checkpoints' / '3').mkdir(parents=True)
  (workdir / 'checkpoints' / '3' / 'state').write_bytes(b'weights')
  (workdir / 'history.json').write_text('{}')
  before = _digest(workdir)
  args = ['--config', recipe, '--data', data, '--workdir', workdir, '--no-progress', '--stage', 'all',
          '--start-lr', '1e-5', '--end-lr', '1e4', '--steps', '12']
  script = runpy.run_path(str(REPO / 'scripts' / 'lr_find.py'))   # the checkout's script, in this process
  run = lambda: script['main']([str(a) for a in args])
  with pytest.raises(SystemExit) as info:
    cli.run(run)
  out = capsys.readouterr()
  assert info.value.code == 0, out.err
  assert 'lr_find: stage all, 12 steps from 1e-05 to 10000 (2 batches each)' in out.out
  line = next(l for l in out.out.splitlines() if 'suggested lr' in l)
  # A sweep to 1e4 diverges before its end; the suggestion lies inside the sweep, below the divergence.
  assert 'diverged' in line, line
  suggested = float(line.split('suggested lr ')[1].split(' ')[0])
  assert 1e-5 <= suggested < 1e4
  assert (workdir / 'lr_find.png').stat().st_size > 1000
  after = _digest(workdir)
  del after['lr_find.png']
  assert after == before


@pytest.mark.slow
def test_lr_find_sweeps_every_step_when_nothing_diverges(tmp_path):
  from tl_jax.config import validate
  import yaml
  values = yaml.safe_load(RECIPE)
  values['data']['path'] = str(_folder(tmp_path / 'data'))
  config = validate(values)
  lines = []
  result = lr_find_lib.lr_find(config, tmp_path / 'out', start_lr=1e-6, end_lr=1e-4, steps=8, log=lines.append)
  assert not result.diverged and len(result.losses) == 8 and result.stage == 'head'
  np.testing.assert_allclose(result.lrs, lr_find_lib.exponential_lrs(1e-6, 1e-4, 8))
  assert all(np.isfinite(result.losses)) and (tmp_path / 'out' / 'lr_find.png').is_file()
