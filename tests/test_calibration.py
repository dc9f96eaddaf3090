"""tl_jax.calibration: ECE/MCE against torchmetrics, NLL/Brier against scikit-learn, adaptive ECE and
the bins by hand, temperature scaling against a fine grid, the coverage table; and the temperature's
way through a checkpoint (evaluate.py --fit-temperature, predict.py, calibrate: true)."""

import json
import math

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import within
from tl_jax import calibration, checkpoint, evaluate, predict
from tl_jax.config import RUNTIME_KEYS, ConfigError, load_config
from tl_jax.models import create_model, init_variables


def _random_case(n=600, c=5, seed=0, scale=3.0):
  """Logits whose argmax is right about 60% of the time, and their labels."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  logits = rng.normal(size=(n, c)) * scale
  logits[np.arange(n), labels] += rng.choice([0.0, 3.0], size=n, p=[0.5, 0.5])
  return logits, labels


# ------------------------------------------------------------------ metrics against references


@pytest.mark.parametrize('num_bins', [15, 7])
def test_ece_and_mce_equal_torchmetrics(num_bins):
  torch = pytest.importorskip('torch')
  tmf = pytest.importorskip('torchmetrics.functional.classification')
  logits, labels = _random_case()
  probs = calibration.probabilities(logits)
  ours = calibration.calibration_metrics(probs, labels, num_bins)
  preds, target = torch.from_numpy(probs), torch.from_numpy(labels)
  for key, norm in (('ece', 'l1'), ('mce', 'max')):
    ref = float(tmf.multiclass_calibration_error(preds, target, num_classes=5, n_bins=num_bins, norm=norm))
    err = abs(ours[key] - ref)
    assert within(err, 'calibration_abs_f32', f'{key.upper()} vs torchmetrics ({norm})'), (key, ours[key], ref)
  assert 0.01 < ours['ece'] < ours['mce']


def test_nll_and_brier_equal_sklearn():
  sk = pytest.importorskip('sklearn.metrics')
  logits, labels = _random_case(c=4, seed=1)
  probs = calibration.probabilities(logits)
  ours = calibration.calibration_metrics(probs, labels)
  err = max(abs(ours['nll'] - sk.log_loss(labels, probs, labels=range(4))),
            abs(ours['brier'] - sk.brier_score_loss(labels, probs, labels=range(4), scale_by_half=False)))
  assert within(err, 'metric_abs_f64', 'NLL and Brier vs scikit-learn (float64)'), err


def test_hand_made_bins():
  # Two confident samples (0.9), one right; two at 0.6, both right: ECE = 0.5*0.4 + 0.5*0.4.
  probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
  labels = np.array([0, 0, 0, 1])
  m = calibration.calibration_metrics(probs, labels, num_bins=10)
  assert m['ece'] == pytest.approx(0.4, abs=1e-12) and m['mce'] == pytest.approx(0.4, abs=1e-12)
  full = [b for b in m['bins'] if b['count']]
  assert [(b['count'], b['accuracy']) for b in full] == [(2, 1.0), (2, 0.5)]
  assert m['nll'] == pytest.approx(-(np.log(0.9) + np.log(0.1) + np.log(0.6) + np.log(0.6)) / 4, abs=1e-12)
  assert m['brier'] == pytest.approx((0.02 + 1.62 + 0.32 + 0.32) / 4, abs=1e-12)
  # Adaptive bins (4 samples, 2 bins of 2, sorted by confidence): {0.6, 0.6} right, {0.9, 0.9} half right.
  m2 = calibration.calibration_metrics(probs, labels, num_bins=2)
  assert m2['adaptive_ece'] == pytest.approx((abs(2 - 1.2) + abs(1 - 1.8)) / 4, abs=1e-12)


def test_bins_are_closed_on_the_right_as_guo_et_al():
  """(k-1)/M < c <= k/M: a confidence on an edge belongs to the bin below; 1.0 to the last bin."""
  edges = np.linspace(0, 1, 16)
  assert calibration.equal_width_bins(np.array([edges[1], edges[1] + 1e-9, edges[7], 1.0, 0.0])).tolist() == \
      [0, 1, 6, 14, 0]
  probs = np.array([[1.0, 0.0], [edges[14], 1 - edges[14]]])
  m = calibration.calibration_metrics(probs, np.array([0, 1]))
  assert [b['count'] for b in m['bins']][13:] == [1, 1]


def test_adaptive_ece_uneven_split_and_independent_formula():
  """Equal-count bins as np.array_split (the first n % M bins one larger), checked by a loop."""
  logits, labels = _random_case(n=103, c=3, seed=2)
  probs = calibration.probabilities(logits)
  conf, correct = probs.max(1), probs.argmax(1) == labels
  order = np.argsort(conf, kind='stable')
  sizes = [103 // 15 + (1 if i < 103 % 15 else 0) for i in range(15)]
  total, start = 0.0, 0
  for size in sizes:
    chunk = order[start:start + size]
    total += size * abs(correct[chunk].mean() - conf[chunk].mean())
    start += size
  err = abs(calibration.calibration_metrics(probs, labels)['adaptive_ece'] - total / 103)
  assert within(err, 'metric_abs_f64', 'adaptive ECE vs a loop over equal-count bins'), err


def test_bad_input():
  with pytest.raises(calibration.CalibrationError, match='no samples'):
    calibration.calibration_metrics(np.zeros((0, 3)), np.zeros(0, int))
  with pytest.raises(calibration.CalibrationError, match=r'class indices in \[0, 2\)'):
    calibration.calibration_metrics(np.full((2, 2), 0.5), np.array([0, 2]))
  with pytest.raises(calibration.CalibrationError, match='num_bins'):
    calibration.calibration_metrics(np.full((2, 2), 0.5), np.array([0, 1]), num_bins=0)


# ------------------------------------------------------------------ coverage


def test_coverage_table_and_curve():
  probs = np.array([[0.95, 0.05], [0.3, 0.7], [0.55, 0.45], [0.2, 0.8], [0.6, 0.4]])
  labels = np.array([0, 1, 1, 0, 0])   # right, right, wrong, wrong, right
  rows = calibration.coverage_table(probs, labels, thresholds=(0.0, 0.6, 0.75, 0.99))
  assert [(r['answered'], r['accuracy']) for r in rows] == [(5, 0.6), (4, 0.75), (2, 0.5), (0, None)]
  coverage, accuracy, threshold = calibration.coverage_curve(probs, labels)
  np.testing.assert_allclose(coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
  np.testing.assert_allclose(accuracy, [1.0, 0.5, 2 / 3, 3 / 4, 3 / 5])
  np.testing.assert_allclose(threshold, [0.95, 0.8, 0.7, 0.6, 0.55])
  # Ties are answered together: one point for both.
  coverage, accuracy, _ = calibration.coverage_curve(np.array([[0.7, 0.3], [0.3, 0.7]]), np.array([0, 0]))
  assert coverage.tolist() == [1.0] and accuracy.tolist() == [0.5]


# ------------------------------------------------------------------ temperature scaling


def _grid_optimum(logits, labels, points=4001, span=(-3.0, 3.0)):
  """The best log T on a grid, then a finer grid around it."""
  grid = np.linspace(*span, points)
  values = [calibration.nll(logits, labels, math.exp(t)) for t in grid]
  best = grid[int(np.argmin(values))]
  step = grid[1] - grid[0]
  fine = np.linspace(best - step, best + step, 2001)
  values = [calibration.nll(logits, labels, math.exp(t)) for t in fine]
  return fine[int(np.argmin(values))], float(min(values)), fine[1] - fine[0]


@pytest.mark.parametrize('scale', [3.0, 0.4])   # over- and under-confident
def test_fitted_temperature_is_the_grid_optimum(scale):
  logits, labels = _random_case(n=300, c=4, seed=3, scale=scale)
  fit = calibration.fit_temperature(logits, labels)
  best_log_t, best_nll, step = _grid_optimum(logits, labels)
  assert (fit.temperature > 1) == (scale == 3.0), fit.temperature
  assert abs(math.log(fit.temperature) - best_log_t) <= 2 * step, (fit.temperature, math.exp(best_log_t))
  err = fit.nll_after - best_nll
  assert within(max(err, 0.0), 'metric_abs_f64', 'fitted temperature NLL above the fine grid\'s'), err
  assert fit.nll_before == pytest.approx(calibration.nll(logits, labels, 1.0)) and fit.nll_after < fit.nll_before
  # Accuracy unchanged: dividing by T > 0 keeps every argmax.
  assert np.array_equal(calibration.probabilities(logits, fit.temperature).argmax(1), logits.argmax(1))
  before = calibration.calibration_metrics(calibration.probabilities(logits), labels)['ece']
  after = calibration.calibration_metrics(calibration.probabilities(logits, fit.temperature), labels)['ece']
  assert after < before


def test_temperature_over_tta_views_is_the_grid_optimum():
  rng = np.random.default_rng(4)
  logits, labels = _random_case(n=200, c=3, seed=4)
  views = logits[:, None, :] + rng.normal(size=(200, 5, 3))   # five noisy views
  fit = calibration.fit_temperature(views, labels)
  best_log_t, _, step = _grid_optimum(views, labels, points=1201)
  assert abs(math.log(fit.temperature) - best_log_t) <= 2 * step


def test_temperature_that_will_not_fit_is_one_line():
  labels = np.array([0, 1, 2, 1])
  right = np.eye(3)[labels] * 4.0   # every image right with a margin
  with pytest.raises(calibration.CalibrationError,
                     match='all 4 images are classified right.*goes to 0.*nothing stored'):
    calibration.fit_temperature(right, labels)
  wrong = -np.eye(3)[labels] * 4.0   # the label always has the lowest logit
  with pytest.raises(calibration.CalibrationError, match='no better than chance.*nothing stored'):
    calibration.fit_temperature(wrong, labels)
  with pytest.raises(calibration.CalibrationError, match='no labelled images'):
    calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, int))


# ------------------------------------------------------------------ through a checkpoint


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """A random resnet18 checkpoint on 32-pixel crops and a labelled folder of 12 images."""
  root = tmp_path_factory.mktemp('calibration')
  variables = init_variables(create_model('resnet18', 3), jax.random.PRNGKey(0), image_size=32)
  metadata = checkpoint.make_metadata('resnet18', 3, {'resize_size': 36, 'crop_size': 32}, ['a', 'b', 'c'])
  checkpoint.save_model(root / 'ckpt', variables, metadata)
  rng = np.random.default_rng(0)
  for cls in 'abc':
    (root / 'data' / cls).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8)).save(root / 'data' / cls / f'{i}.png')
  return root


def test_update_metadata_keeps_the_variables(tmp_path, small):
  import shutil
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(small / 'ckpt', ckpt)
  before = checkpoint.load_model(ckpt)
  checkpoint.update_metadata(ckpt, {'temperature': 1.5})
  after = checkpoint.load_model(ckpt)
  assert after.metadata == {**before.metadata, 'temperature': 1.5}
  for a, b in zip(jax.tree_util.tree_leaves(before.variables), jax.tree_util.tree_leaves(after.variables)):
    np.testing.assert_array_equal(a, b)
  assert not list((ckpt / 'metadata').glob('.*tmp'))


def test_fit_store_apply_and_unknown(tmp_path, small):
  import shutil
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(small / 'ckpt', ckpt)
  plain = evaluate.evaluate_checkpoint(ckpt, small / 'data', batch_size=4, workers=0, out_dir=tmp_path / 'plain')
  assert 'temperature' not in checkpoint.load_model(ckpt).metadata
  fitted = evaluate.evaluate_checkpoint(ckpt, small / 'data', batch_size=4, workers=0, out_dir=tmp_path / 'fit',
                                        fit_temperature=True)
  t = fitted.info['temperature']
  stored = checkpoint.load_model(ckpt).metadata
  assert stored['temperature'] == t and stored['calibration']['ece_after'] == fitted.metrics['calibration']['ece']
  assert fitted.accuracy == plain.accuracy
  assert fitted.metrics['confusion_matrix'] == plain.metrics['confusion_matrix']
  assert fitted.metrics['calibration_uncalibrated']['ece'] == pytest.approx(plain.metrics['calibration']['ece'])
  assert fitted.metrics['calibration']['nll'] < plain.metrics['calibration']['nll']
  text = evaluate.format_report(fitted)
  assert f'temperature: {t:.4f} (fitted on these images, stored in {ckpt})' in text and 'coverage (' in text
  saved = json.loads((tmp_path / 'fit' / 'evaluation.json').read_text())
  assert saved['calibration']['ece'] == fitted.metrics['calibration']['ece'] and saved['temperature'] == t
  for name in ('reliability.png', 'coverage.png'):
    with Image.open(tmp_path / 'fit' / name) as img:
      assert img.format == 'PNG' and np.asarray(img.convert('L')).std() > 0

  # Applied from then on, unless asked not to.
  again = evaluate.evaluate_checkpoint(ckpt, small / 'data', batch_size=4, workers=0, out_dir=tmp_path / 'again')
  assert again.info['temperature'] == t and again.info['temperature_source'] == 'checkpoint'
  assert again.metrics['loss'] == pytest.approx(fitted.metrics['loss'], abs=1e-9)
  off = evaluate.evaluate_checkpoint(ckpt, small / 'data', batch_size=4, workers=0, out_dir=tmp_path / 'off',
                                     use_temperature=False)
  assert 'temperature' not in off.info and off.metrics['loss'] == pytest.approx(plain.metrics['loss'], abs=1e-12)

  paths = sorted((small / 'data').glob('*/*.png'))[:3]
  raw = predict.predict_files(ckpt, paths, use_temperature=False)
  calibrated = predict.predict_files(ckpt, paths)
  for r, c in zip(raw, calibrated):
    expected = calibration.probabilities(np.array([r.logits]), t)[0]
    np.testing.assert_allclose(c.probs, expected, rtol=1e-6)
    assert c.class_index == r.class_index
  cut = float(np.median([p.confidence for p in calibrated]))
  answered = predict.predict_files(ckpt, paths, min_confidence=cut)
  assert [p.answer == predict.UNKNOWN for p in answered] == [p.confidence < cut for p in calibrated]
  assert any(p.answer == predict.UNKNOWN for p in answered) and any(p.answer != predict.UNKNOWN for p in answered)
  line = predict.format_prediction(next(p for p in answered if p.answer == predict.UNKNOWN), ['a', 'b', 'c'], 1)
  assert ': unknown (top: ' in line
  with pytest.raises(predict.PredictError, match='--min-confidence must be a probability'):
    predict.predict_files(ckpt, paths, min_confidence=1.5)


def test_a_fit_that_fails_stores_nothing(tmp_path):
  labels = np.array([0, 1, 2, 1])
  report = evaluate.evaluate_logits(labels, np.eye(3)[labels] * 5.0, ['a', 'b', 'c'], fit_temperature=True)
  assert 'all 4 images are classified right' in report.info['temperature_fit_error']
  assert 'temperature' not in report.info and any('no temperature fitted' in n for n in report.notes)
  assert evaluate.store_temperature(tmp_path / 'never_read', report) is None
  line = evaluate.calibrate_run(tmp_path / 'never_read', report)
  assert line.startswith('calibrate: no temperature fitted: all 4 images') and '\n' not in line
  assert 'not fitted for multi-label' in evaluate.calibrate_run(tmp_path, report, multi_label=True)


def test_multi_label_and_empty_data_refused(tmp_path, small):
  import shutil
  ckpt = tmp_path / 'ckpt'
  shutil.copytree(small / 'ckpt', ckpt)
  checkpoint.update_metadata(ckpt, {'multi_label': True})
  with pytest.raises(evaluate.EvaluationError, match='multi-label.*drop --fit-temperature'):
    evaluate.evaluate_checkpoint(ckpt, small / 'data', workers=0, out_dir=tmp_path / 'out', fit_temperature=True)
  with pytest.raises(predict.PredictError, match='multi-label'):
    predict.predict_files(ckpt, [small / 'data' / 'a' / '0.png'], min_confidence=0.5)
  empty = tmp_path / 'empty'
  for cls in 'abc':
    (empty / cls).mkdir(parents=True)
    (empty / cls / 'bad.png').write_bytes(b'not a png')
  # No val images to fit on: the folder's own one-line error, before any work.
  from tl_jax.data.folder import DataError
  with pytest.raises(DataError, match='no readable image left in class folder'):
    evaluate.evaluate_checkpoint(small / 'ckpt', empty, workers=0, out_dir=tmp_path / 'out', fit_temperature=True,
                                 skip_bad_images=True, warn=lambda _: None)


def test_calibrate_key(tmp_path):
  recipe = tmp_path / 'r.yaml'
  recipe.write_text('stages: [{name: head, epochs: 1, trainable: [head]}]\ncalibrate: true\n')
  assert load_config(recipe).calibrate is True
  recipe.write_text('stages: [{name: head, epochs: 1, trainable: [head]}]\ncalibrate: sometimes\n')
  with pytest.raises(ConfigError, match='calibrate.*sometimes') as info:
    load_config(recipe)
  assert '\n' not in str(info.value)
  assert 'calibrate' in RUNTIME_KEYS   # fitting at the end changes nothing a resumed run computes


@pytest.mark.slow
def test_calibrate_true_at_the_end_of_a_run(tmp_path):
  """`calibrate: true`: the run's end fits on the val logits of the best checkpoint and stores it there."""
  from helpers import head_only_values, two_class_folder
  from tl_jax.config import validate
  from tl_jax.training import train_and_evaluate
  data = two_class_folder(tmp_path / 'data', per_class=8, val_per_class=6)
  config = validate(head_only_values(data, [{'name': 'head', 'epochs': 2}], calibrate=True))
  lines = []
  train_and_evaluate(config, tmp_path / 'run', log=lines.append, progress=False, plots=False, report=True)
  [line] = [line for line in lines if line.startswith('calibrate:')]
  metadata = checkpoint.load_model(tmp_path / 'run').metadata
  saved = json.loads((tmp_path / 'run' / 'evaluation.json').read_text())
  assert 'ece' in saved['calibration'] and (tmp_path / 'run' / 'reliability.png').is_file()
  if 'no temperature fitted' in line:   # a val set the random head gets all right: said, nothing stored
    assert 'temperature' not in metadata
  else:
    assert f'calibrate: temperature {metadata["temperature"]:.4f} fitted on the val data, stored in' in line
    assert saved['temperature'] == metadata['temperature']
    assert saved['calibration']['ece'] == pytest.approx(metadata['calibration']['ece_after'])
