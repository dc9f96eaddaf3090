"""Multi-label data: the labels CSV source, its batches, the metrics against scikit-learn, and a run."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import within
from tl_jax import metrics
from tl_jax.data import multilabel, sources
from tl_jax.data.loader import Loader

CLASSES = ['cat', 'dog', 'fish']


def _write(root, rows, header='path,labels', size=(20, 16)):
  """Images under root/img and root/labels.csv listing them with `rows` (labels[, split])."""
  (root / 'img').mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  lines = [header]
  for i, row in enumerate(rows):
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(root / 'img' / f'{i}.png')
    lines.append(f'img/{i}.png,' + ','.join(row))
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')
  return root / 'labels.csv'


def test_csv_gives_sorted_classes_and_0_1_rows_split_by_the_split_column(tmp_path):
  csv = _write(tmp_path, [('dog cat', 'train'), ('fish', 'val'), ('', 'train'), ('dog', 'validation')],
               header='path,labels,split')
  train, val, source = multilabel.read_labels_csv(csv, 0.2, 0)
  assert train.classes == CLASSES and source['kind'] == multilabel.KIND and source['multi_label']
  np.testing.assert_array_equal(train.targets, [[1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(val.targets, [[0, 0, 1], [0, 1, 0]])
  assert train.samples[0][0] == str(tmp_path.resolve() / 'img' / '0.png')


def test_csv_without_split_column_splits_val_fraction_seeded(tmp_path):
  csv = _write(tmp_path, [('cat',), ('dog',), ('fish',), ('cat dog',), ('dog',), ('fish cat',), ('cat',), ('dog',),
                          ('fish',), ('cat',)])
  train, val, source = multilabel.read_labels_csv(csv, 0.2, 0)
  assert (len(train), len(val)) == (8, 2) and source['split'] == 'val_fraction'
  again = multilabel.read_labels_csv(csv, 0.2, 0)[1]
  assert [s for s, _ in val.samples] == [s for s, _ in again.samples]
  other = multilabel.read_labels_csv(csv, 0.2, 1)[1]
  assert {s for s, _ in train.samples} | {s for s, _ in val.samples} == {s for s, _ in other.samples} | \
      {s for s, _ in multilabel.read_labels_csv(csv, 0.2, 1)[0].samples}


@pytest.mark.parametrize('header, rows, message', [
    ('path,label', [('cat',)], 'needs the columns path and labels'),
    ('path,labels,split', [('cat', 'test'), ('dog', 'train')], "line 2: split 'test'; use train or val"),
    ('path,labels,split', [('cat', 'train'), ('dog', 'train')], 'gives no val rows'),
    ('path,labels', [('',), ('',)], 'no labels in any row'),
])
def test_bad_csvs_give_one_line_errors(tmp_path, header, rows, message):
  csv = _write(tmp_path, rows, header=header)
  with pytest.raises(multilabel.LabelsCsvError, match=message) as info:
    multilabel.read_labels_csv(csv, 0.2, 0)
  assert '\n' not in str(info.value)
  with pytest.raises(multilabel.LabelsCsvError, match='no such file'):
    multilabel.read_labels_csv(tmp_path / 'nope.csv', 0.2, 0)


def test_evaluation_rows_follow_the_checkpoints_classes(tmp_path):
  csv = _write(tmp_path, [('dog',), ('fish cat',), ('cat',)])
  rows = multilabel.evaluation_rows(csv, ['fish', 'cat', 'dog', 'bird'])   # every row, in the file's order
  assert [s.rsplit('/', 1)[-1] for s, _ in rows.samples] == ['0.png', '1.png', '2.png']
  np.testing.assert_array_equal(rows.targets, [[0, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0]])
  with pytest.raises(multilabel.LabelsCsvError, match=r"classes \['fish'\] are not among"):
    multilabel.evaluation_rows(csv, ['cat', 'dog'])
  csv = _write(tmp_path / 'split', [('dog', 'train'), ('cat', 'val')], header='path,labels,split')
  assert len(multilabel.evaluation_rows(csv, CLASSES).samples) == 1   # the val rows


def test_load_data_reads_a_csv_and_batches_hold_0_1_rows_with_padding(tmp_path):
  csv = _write(tmp_path, [('dog cat', 'train'), ('fish', 'train'), ('cat', 'train'), ('dog', 'val')],
               header='path,labels,split')
  data = sources.load_data(str(csv), workdir=None, seed=0, skip_bad_images=False, workers=1)
  assert data.multi_label and data.classes == CLASSES
  loader = Loader(data.train.samples, lambda img, rng: np.zeros((4, 4, 3), np.float32), 2, shuffle=False, workers=0)
  batches = list(loader.epoch(0))
  assert batches[0].labels.dtype == np.float32 and batches[0].labels.shape == (2, 3)
  np.testing.assert_array_equal(batches[1].labels, [[1, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(batches[1].mask, [True, False])
  (tmp_path / 'img' / '1.png').unlink()
  with pytest.raises(sources.DataError, match='1.png'):
    sources.load_data(str(csv), workdir=None, seed=0, skip_bad_images=False, workers=1)
  kept = sources.load_data(str(csv), workdir=None, seed=0, skip_bad_images=True, workers=1, log=lambda m: None)
  assert len(kept.train.samples) == 2 and kept.skipped == 1


def test_multi_label_setting_must_fit_the_data(tmp_path):
  from tl_jax import config
  from tl_jax.training.stages import is_multi_label
  csv = _write(tmp_path, [('dog', 'train'), ('cat', 'val')], header='path,labels,split')
  data = sources.load_data(str(csv), workdir=None, seed=0, skip_bad_images=False, workers=1)
  values = config.default_values()
  assert is_multi_label(config.validate(values), data)
  values['data'] = {'multi_label': False}
  with pytest.raises(ValueError, match='data.multi_label is false but .* is a labels CSV'):
    is_multi_label(config.validate(values), data)
  data.source = {'kind': 'folder'}
  values['data'] = {'multi_label': True}
  with pytest.raises(ValueError, match='data.multi_label is true but .* has one label per image'):
    is_multi_label(config.validate(values), data)


def test_multilabel_metrics_are_sklearns():
  sk = pytest.importorskip('sklearn.metrics')
  rng = np.random.default_rng(0)
  targets = (rng.random((40, 4)) < 0.4).astype(np.float64)
  targets[:, 3] = 0   # a class with no positive
  logits = rng.normal(0, 2, (40, 4)) + 2 * targets
  logits[:5, 0] = logits[5, 0]   # tied scores
  names = ['a', 'b', 'c', 'd']
  with pytest.warns(UserWarning):   # sklearn's warning about the class with no positive
    ap = sk.average_precision_score(targets, logits, average=None)
  ours = metrics.multilabel_metrics(targets, logits, names)
  predicted = (1 / (1 + np.exp(-logits)) > 0.5).astype(int)
  p, r, f, s = sk.precision_recall_fscore_support(targets, predicted, average=None, zero_division=0)
  errs = [abs(ours['per_class'][n][k] - ref[i]) for i, n in enumerate(names)
          for k, ref in (('precision', p), ('recall', r), ('f1', f), ('average_precision', ap))]
  assert within(max(errs), 'metric_abs_f64', 'multi-label per-class precision/recall/F1/AP vs sklearn')
  assert [ours['per_class'][n]['support'] for n in names] == list(s)
  assert within(abs(ours['mAP'] - np.mean(ap)), 'metric_abs_f64', 'multi-label mAP vs sklearn (macro AP)')
  assert within(abs(ours['subset_accuracy'] - sk.accuracy_score(targets, predicted)), 'metric_abs_f64',
                'multi-label subset accuracy vs sklearn')
  for avg in ('macro', 'micro'):
    ref = sk.precision_recall_fscore_support(targets, predicted, average=avg, zero_division=0)[:3]
    assert max(abs(ours[f'{avg}_avg'][k] - v) for k, v in zip(('precision', 'recall', 'f1'), ref)) < 1e-12
  torch = pytest.importorskip('torch')
  ref_loss = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(logits), torch.from_numpy(targets)).item()
  assert within(abs(ours['loss'] - ref_loss), 'metric_abs_f64', 'multi-label BCE loss vs torch')
  assert ours['absent'] == ['d']
  assert metrics.mean_average_precision(targets, logits) == ours['mAP']   # what the val phase ranks epochs by
  assert 'mAP' in metrics.format_multilabel(ours)


@pytest.mark.slow
def test_train_script_trains_a_multi_label_csv_and_reports_map(tmp_path):
  """scripts/train.py on a labels CSV: BCE with pos_weight balanced, MixUp on, evaluation.json with mAP."""
  import subprocess
  import sys
  from pathlib import Path
  rows = [('cat', 'train'), ('dog', 'train'), ('cat dog', 'train'), ('fish', 'train'), ('fish cat', 'train'),
          ('dog', 'train'), ('cat', 'val'), ('dog fish', 'val'), ('fish', 'val')]
  csv = _write(tmp_path / 'data', rows, header='path,labels,split', size=(40, 48))
  recipe = tmp_path / 'recipe.yaml'
  recipe.write_text(
      'model: {arch: resnet18, weights: random}\n'
      'data: {batch_size: 4, eval_batch_size: 4, workers: 0, mixup_alpha: 0.4,\n'
      '       train_transforms: [{RandomResizedCrop: {size: 32}}, ToTensor,\n'
      '                          {Normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}],\n'
      '       val_transforms: [{Resize: {size: 32}}, {CenterCrop: {size: 32}}, ToTensor,\n'
      '                        {Normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}]}\n'
      'loss: {pos_weight: balanced}\n'
      'stages: [{name: finetune, epochs: 2, optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}]\n')
  repo = Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, str(repo / 'scripts' / 'train.py'), '--config', recipe, '--data', csv,
                         '--workdir', tmp_path / 'run', '--no-progress'], cwd=repo, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'mAP' in proc.stdout
  evaluation = json.loads((tmp_path / 'run' / 'evaluation.json').read_text())
  assert evaluation['multi_label'] and evaluation['num_samples'] == 3 and 0 <= evaluation['mAP'] <= 1
  history = json.loads((tmp_path / 'run' / 'history.json').read_text())
  assert all(np.isfinite(row['train_loss']) and row['val_acc'] * 3 == round(row['val_acc'] * 3)
             for row in history['epochs'])
  # best/ is chosen by the val mAP (kept in best_val_acc), the metric the evaluation reports.
  assert history['best_val_acc'] == max(row['val_mAP'] for row in history['epochs'])
  assert evaluation['mAP'] == pytest.approx(history['best_val_acc'], abs=1e-6)

  # evaluate.py on the CSV (its val rows) gives the end-of-run evaluation; predict.py names the classes above 0.5.
  proc = subprocess.run([sys.executable, str(repo / 'scripts' / 'evaluate.py'), '--checkpoint', tmp_path / 'run',
                         '--data', csv, '--out', tmp_path / 'eval', '--json'], cwd=repo, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = json.loads(proc.stdout)
  assert again['mAP'] == pytest.approx(evaluation['mAP'], abs=1e-6)
  assert again['subset_accuracy'] == pytest.approx(evaluation['subset_accuracy'])
  image = tmp_path / 'data' / 'img' / '7.png'
  proc = subprocess.run([sys.executable, str(repo / 'scripts' / 'predict.py'), '--checkpoint', tmp_path / 'run',
                         '--json', image], cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out, = json.loads(proc.stdout)
  probs = np.asarray(out['probs'])
  expected = ' '.join(n for n, p in zip(CLASSES, probs) if p > 0.5) or '(none)'
  assert out['answer'] == expected and not np.isclose(probs.sum(), 1.0)   # sigmoids, not a softmax
