"""The loader benchmark: its arithmetic, equal work for every framework, and a tiny run of the script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import within
from benchmarks import loader as bench
from tl_jax.data import augment
from tl_jax.data.folder import ImageFolder
from tl_jax.data.loader import Loader

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, per_class: int = 3, size=(40, 30)) -> Path:
  rng = np.random.default_rng(0)
  for name in ('ants', 'bees'):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      pixels = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
      Image.fromarray(pixels).save(root / name / f'{i}.jpg', quality=90)
  return root


def test_rates_are_images_over_seconds_and_the_median_of_the_timed_epochs():
  case = bench.Case('tutorial', 2, 32)
  ours = bench.Result(case, 'tl_jax', epoch_seconds=[2.0, 4.0, 1.0], warmup_seconds=[9.0], num_images=100)
  theirs = bench.Result(case, 'torchvision', epoch_seconds=[4.0, 4.0, 5.0], warmup_seconds=[9.0], num_images=100)
  assert ours.rates == [50.0, 25.0, 100.0]  # the warm-up epoch is not among them
  assert ours.median == 50.0 and theirs.median == 25.0
  table = bench.format_table([ours, theirs])
  row = next(line for line in table.splitlines() if 'tl_jax' in line)
  assert ' 50.0 ' in row and row.split()[-1] == '2.00'  # 50 / 25 img/s


def test_default_cases_cover_both_lists_and_the_tutorial_batch_at_each_worker_count():
  cases = bench.default_cases([1, 2], batch_size=32, tutorial_batch_size=4)
  assert set(cases) == {bench.Case(t, w, b) for w in (1, 2)
                        for t, b in (('tutorial', 32), ('tutorial', 4), ('heavy', 32))}
  assert len(cases) == 6


def test_both_lists_build_and_torchvision_gets_the_same_classes_and_arguments():
  pytest.importorskip('torchvision')
  for spec in bench.LISTS.values():
    augment.build_pipeline(spec)
    names = [type(t).__name__ for t in bench.torchvision_compose(spec).transforms]
    assert names == [next(iter(entry)) for entry in spec]
  jitter = bench.torchvision_compose(bench.HEAVY).transforms[4]
  assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.5, 1.5), (0.5, 1.5),
                                                                              (0.5, 1.5), (-0.5, 0.5))


def test_torchvision_compose_computes_what_our_pipeline_computes(tmp_path):
  # The deterministic ops of the lists (with the tutorial's interpolation and normalisation), so
  # both sides see the same image with no random draws to align.
  pytest.importorskip('torchvision')
  spec = [{'Resize': {'size': [44, 44]}}, {'CenterCrop': {'size': 32}}, {'ToTensor': {}},
          {'Normalize': {'mean': bench.IMAGENET_MEAN, 'std': bench.IMAGENET_STD}}]
  path, _ = ImageFolder(_folder(tmp_path, per_class=1)).samples[0]
  img = Image.open(path).convert('RGB')
  ours = augment.build_pipeline(spec)(img)
  theirs = bench.torchvision_compose(spec)(img).permute(1, 2, 0).numpy()
  assert within(float(np.max(np.abs(ours - theirs))), 'pixel_abs', 'bench: Resize+CenterCrop+Normalize vs torchvision')


def _tiny_loader(tmp_path, batch_size=4):
  samples = ImageFolder(_folder(tmp_path)).samples
  spec = [{'RandomResizedCrop': {'size': 16}}, {'RandomHorizontalFlip': {}}, {'ToTensor': {}},
          {'Normalize': {'mean': [0.5] * 3, 'std': [0.5] * 3}}]
  return Loader(samples, augment.build_pipeline(spec), batch_size, shuffle=True, seed=3, workers=2)


def _assert_same_batches(batches, expected):
  assert len(batches) == len(expected)
  for got, want in zip(batches, expected):
    for key in ('images', 'labels', 'mask', 'indices'):
      np.testing.assert_array_equal(got[key], getattr(want, key))


def test_loader_batch_builds_the_batches_of_loader_epoch(tmp_path):
  loader = _tiny_loader(tmp_path)
  for epoch in (0, 1):
    _assert_same_batches([bench.loader_batch(loader, epoch, b) for b in range(len(loader))], list(loader.epoch(epoch)))


@pytest.mark.parametrize('workers', [0, 1])
@pytest.mark.slow
def test_grain_workers_yield_the_loader_batches_epoch_after_epoch(tmp_path, monkeypatch, workers):
  pytest.importorskip('grain')
  # Spawned grain workers import tl_jax: the worktree's, not an installed copy.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  loader = _tiny_loader(tmp_path)
  pipeline = bench.GrainEpochs(loader, workers, epochs=2, first_epoch=5)
  try:
    with pytest.raises(ValueError, match='expected epoch 5'):
      next(pipeline.epoch(6))
    for epoch in (5, 6):
      _assert_same_batches(list(pipeline.epoch(epoch)), list(loader.epoch(epoch)))
  finally:
    pipeline.close()


@pytest.mark.slow
def test_script_prints_a_row_per_case_and_framework(tmp_path):
  pytest.importorskip('torchvision')
  root = _folder(tmp_path / 'data', per_class=2, size=(24, 20))
  out = tmp_path / 'rates.json'
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  proc = subprocess.run(
      [sys.executable, str(REPO / 'benchmarks' / 'bench_loader.py'), '--data', str(root), '--workers', '0', '1',
       '--frameworks', 'tl_jax', 'torchvision', '--lists', 'tutorial', '--tutorial-batch-size', '0', '--epochs', '2',
       '--json', str(out)],
      capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(out.read_text())
  assert {(r['workers'], r['batch_size'], r['framework']) for r in rows} == {
      (w, 32, f) for w in (0, 1) for f in ('tl_jax', 'torchvision')}
  for r in rows:
    assert len(r['epoch_seconds']) == 1 and len(r['warmup_seconds']) == 1 and r['num_images'] == 4
    assert r['images_per_second'] == pytest.approx(4 / r['epoch_seconds'][0])
  assert proc.stdout.count('tutorial') >= 2 * len(rows)  # each case once as it ends, then the table


def test_too_few_epochs_and_unknown_frameworks_are_refused(tmp_path):
  with pytest.raises(ValueError, match='at least 2'):
    bench.run(tmp_path, [], epochs=1)
  with pytest.raises(ValueError, match="unknown framework.*'tf'"):
    bench.run(tmp_path, [], frameworks=['tf'])
