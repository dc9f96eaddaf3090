"""scripts/evaluate.py and tl_jax.evaluate: the numbers against torchvision and scikit-learn, the
files it writes, the confusion matrix figure, and bad input."""

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import random_torchvision_model, within
from test_scripts import make_folder, run_script
from tl_jax import checkpoint, evaluate, plots
from tl_jax.data.folder import DataError
from tl_jax.models import create_model, init_variables

CLASS_NAMES = ['ants', 'bees']


@pytest.fixture(scope='module')
def torch_case(tmp_path_factory):
  """A generated folder, a converted random torchvision resnet18, and torchvision's logits on val/."""
  torch = pytest.importorskip('torch')
  import torchvision.transforms as T
  root = tmp_path_factory.mktemp('evaluate')
  data = make_folder(root / 'data', per_class=1, val_per_class=4)
  # make_folder's classes differ in brightness, which even a random net may split perfectly;
  # a bees image filed under ants keeps the accuracy below 1.
  shutil.copy(data / 'val' / 'bees' / 'bees_0.jpg', data / 'val' / 'ants' / 'ants_x.jpg')
  paths = sorted((data / 'val').glob('*/*.jpg'))  # ImageFolder's order: class folders, then file names
  labels = np.array([CLASS_NAMES.index(p.parent.name) for p in paths])
  tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                  T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
  images = torch.stack([tf(Image.open(p).convert('RGB')) for p in paths])
  tmodel = random_torchvision_model('resnet18', 2).eval()
  with torch.no_grad():
    # A random net predicts one class for every image; centring its fc bias on these images
    # makes it predict both, so the accuracy and the confusion matrix have something to get wrong.
    tmodel.fc.bias -= tmodel(images).mean(dim=0)
    logits = tmodel(images).numpy().astype(np.float64)
  src = root / 'resnet18.pth'
  torch.save(tmodel.state_dict(), src)
  run_script('convert_weights.py', '--from-torch', src, '--out', root / 'ckpt', '--class-names', ','.join(CLASS_NAMES))
  return {'root': root, 'data': data, 'ckpt': root / 'ckpt', 'paths': paths, 'labels': labels, 'logits': logits}


@pytest.mark.slow
def test_evaluate_script_reports_torchvisions_accuracy_loss_and_confusion(torch_case):
  torch = pytest.importorskip('torch')
  sk = pytest.importorskip('sklearn.metrics')
  out_dir = torch_case['root'] / 'out'
  # 9 images in batches of 4: the last batch is padded, and padding must not count.
  proc = run_script('evaluate.py', '--checkpoint', torch_case['ckpt'], '--data', torch_case['data'], '--json',
                    '--out', out_dir, '--batch-size', '4', '--workers', '1')
  report = json.loads(proc.stdout)

  labels, logits = torch_case['labels'], torch_case['logits']
  top2 = np.sort(logits, axis=1)[:, -2:]
  assert np.all(top2[:, 1] - top2[:, 0] > 1e-3), 'a near-tie would make the comparison depend on rounding'
  predictions = logits.argmax(axis=1)
  assert len(set(predictions)) == 2 and 0 < sk.accuracy_score(labels, predictions) < 1

  assert report['num_samples'] == len(labels)
  assert report['accuracy'] == sk.accuracy_score(labels, predictions)
  np.testing.assert_array_equal(report['confusion_matrix'], sk.confusion_matrix(labels, predictions))
  precision, recall, f1, support = sk.precision_recall_fscore_support(labels, predictions, zero_division=0)
  rows = [report['per_class'][n] for n in CLASS_NAMES]
  err = max(max(abs(r['precision'] - precision[i]), abs(r['recall'] - recall[i]), abs(r['f1'] - f1[i]))
            for i, r in enumerate(rows))
  assert within(err, 'metric_abs_f64', 'evaluate.py P/R/F1 vs sklearn on torchvision predictions (abs)'), err
  assert [report['per_class'][n]['support'] for n in CLASS_NAMES] == support.tolist()
  ref_loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
  err = abs(report['loss'] - ref_loss)
  assert within(err, 'eval_loss_abs', 'evaluate.py mean cross-entropy vs torchvision (abs)'), err

  wrong = {str(p) for p, t, y in zip(torch_case['paths'], labels, predictions) if t != y}
  assert {m['path'] for m in report['misclassified']} == wrong
  assert report['data'] == str(torch_case['data'] / 'val') and 'val/' in report['data_source']
  assert report['arch'] == 'resnet18' and report['class_names'] == CLASS_NAMES
  assert json.loads((out_dir / 'evaluation.json').read_text()) == report
  _check_png(out_dir / 'confusion.png')


@pytest.mark.slow
def test_evaluate_script_text_goes_to_the_run_directory(torch_case, tmp_path):
  run_dir = tmp_path / 'run'
  shutil.copytree(torch_case['ckpt'], run_dir / checkpoint.BEST_DIR / '3')
  proc = run_script('evaluate.py', '--checkpoint', run_dir, '--data', torch_case['data'] / 'val', '--workers', '0')
  text = proc.stdout
  assert f'data:       {torch_case["data"] / "val"} (class folders given directly)' in text
  report = json.loads((run_dir / 'evaluation.json').read_text())
  assert f'accuracy:   {report["accuracy"]:.4f}' in text
  assert report['checkpoint'] == str(run_dir / 'best' / '3')
  for name in CLASS_NAMES:
    row = report['per_class'][name]
    assert f'{name:<12}  {row["precision"]:9.4f}  {row["recall"]:6.4f}  {row["f1"]:8.4f}  {row["support"]:7d}' in text
  assert 'confusion matrix (rows: true class, columns: predicted class)' in text
  _check_png(run_dir / 'confusion.png')


@pytest.mark.slow
def test_evaluate_script_bad_input_is_one_line_and_status_2(torch_case, tmp_path):
  data, ckpt = torch_case['data'], torch_case['ckpt']
  other = tmp_path / 'other'
  for name in ('ants', 'wasps'):
    (other / name).mkdir(parents=True)
    Image.new('RGB', (40, 40)).save(other / name / 'x.jpg')
  (tmp_path / 'empty').mkdir()
  cases = [
      (['--checkpoint', ckpt, '--data', tmp_path / 'nope'], ['nope', 'does not exist']),
      (['--checkpoint', ckpt, '--data', other], ["['ants', 'wasps']", "['ants', 'bees']", 'wasps']),
      (['--checkpoint', tmp_path / 'empty', '--data', data], ['empty', 'no tl_jax model checkpoint']),
      (['--checkpoint', tmp_path / 'missing', '--data', data], ['missing', 'does not exist']),
  ]
  for args, needles in cases:
    proc = run_script('evaluate.py', *args, '--out', tmp_path / 'out', check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), (args, proc.stderr)
    for needle in needles:
      assert needle in lines[0], (needle, lines[0])
  assert not (tmp_path / 'out' / 'evaluation.json').exists()


# ------------------------------------------------------------------ library, with a small model


@pytest.fixture(scope='module')
def small_variables():
  return init_variables(create_model('resnet18', 3), jax.random.PRNGKey(0), image_size=32)


def _small_checkpoint(path, variables, class_names=('a', 'b', 'c')):
  """A random resnet18 checkpoint that reads 32-pixel crops (fast to compile and run)."""
  metadata = checkpoint.make_metadata('resnet18', 3, {'resize_size': 36, 'crop_size': 32},
                                      list(class_names) if class_names else None)
  checkpoint.save_model(path, variables, metadata)
  return path


def _folder(root, classes=('a', 'b', 'c'), per_class=3):
  rng = np.random.default_rng(0)
  for cls in classes:
    (root / cls).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8)).save(root / cls / f'{i}.png')
  return root


def test_unreadable_image_stops_unless_skipped(tmp_path, small_variables):
  ckpt = _small_checkpoint(tmp_path / 'ckpt', small_variables)
  data = _folder(tmp_path / 'data')
  (data / 'b' / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(DataError, match='broken.png.*--skip-bad-images'):
    evaluate.evaluate_checkpoint(ckpt, data, batch_size=4, workers=0, out_dir=tmp_path / 'out')
  warnings = []
  report = evaluate.evaluate_checkpoint(ckpt, data, batch_size=4, workers=0, out_dir=tmp_path / 'out',
                                        skip_bad_images=True, warn=warnings.append)
  assert report.info['skipped_images'] == 1 and len(warnings) == 1 and 'broken.png' in warnings[0]
  assert report.metrics['num_samples'] == 9
  assert '(1 unreadable skipped)' in evaluate.format_report(report)


@pytest.mark.slow
def test_evaluate_model_equals_a_direct_forward(tmp_path, small_variables):
  from tl_jax.data.loader import Loader
  ckpt = checkpoint.load_model(_small_checkpoint(tmp_path / 'ckpt', small_variables))
  model = create_model(ckpt.arch, ckpt.num_classes)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(5, 32, 32, 3)).astype(np.float32)
  samples = [(f'img{i}', int(label)) for i, label in enumerate([0, 2, 1, 1, 0])]
  loader = Loader(samples, lambda img, _rng: img, batch_size=2, shuffle=False, workers=0,
                  load=lambda path: images[int(path[3:])])
  report = evaluate.evaluate_model(model, ckpt.variables, loader, ['a', 'b', 'c'], out_dir=tmp_path / 'out')
  logits = np.asarray(model.apply(ckpt.variables, images, train=False), np.float64)
  direct = evaluate.evaluate_arrays([s[1] for s in samples], None, logits, ['a', 'b', 'c'])
  assert report.metrics['confusion_matrix'] == direct.metrics['confusion_matrix']
  assert report.metrics['loss'] == pytest.approx(direct.metrics['loss'], abs=1e-5)
  assert (tmp_path / 'out' / 'evaluation.json').is_file()
  shuffled = Loader(samples, lambda img, _rng: img, batch_size=2, shuffle=True, workers=0)
  with pytest.raises(evaluate.EvaluationError, match='shuffle=False'):
    evaluate.evaluate_model(model, ckpt.variables, shuffled, ['a', 'b', 'c'])


def test_class_names_must_be_the_checkpoints(tmp_path, small_variables):
  ckpt = _small_checkpoint(tmp_path / 'ckpt', small_variables, class_names=('c', 'b', 'a'))
  data = _folder(tmp_path / 'data')
  with pytest.raises(evaluate.EvaluationError, match=r"\['a', 'b', 'c'\].*\['c', 'b', 'a'\].*another order"):
    evaluate.evaluate_checkpoint(ckpt, data, out_dir=tmp_path / 'out')

  unnamed = _small_checkpoint(tmp_path / 'unnamed', small_variables, class_names=None)
  report = evaluate.evaluate_checkpoint(unnamed, data, batch_size=4, workers=0, out_dir=tmp_path / 'out')
  assert report.metrics['class_names'] == ['a', 'b', 'c']
  assert any('no class names' in note for note in report.notes)
  split_root = _folder(tmp_path / 'splits', classes=('test', 'train'))
  with pytest.raises(evaluate.EvaluationError, match='without val/.*--data .*splits/test'):
    evaluate.evaluate_checkpoint(ckpt, split_root, out_dir=tmp_path / 'out')
  two = _folder(tmp_path / 'two', classes=('a', 'b'))
  with pytest.raises(evaluate.EvaluationError, match='3 outputs and no class names.*2 class folders'):
    evaluate.evaluate_checkpoint(unnamed, two, out_dir=tmp_path / 'out')


def test_out_dir_defaults_to_the_run_directory_else_the_current_one(tmp_path, monkeypatch, small_variables):
  monkeypatch.chdir(tmp_path)
  assert evaluate.default_out_dir(tmp_path / 'run' / 'best' / '7') == tmp_path / 'run'
  assert evaluate.default_out_dir(tmp_path / 'ckpt') == tmp_path
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(evaluate.EvaluationError, match='a_file is a file'):
    evaluate.evaluate_checkpoint(_small_checkpoint(tmp_path / 'ckpt', small_variables), tmp_path,
                                 out_dir=tmp_path / 'a_file')


def test_arrays_report_text_json_and_notes(tmp_path):
  names = ['ants', 'bees', 'wasps']
  labels = np.array([0, 0, 1, 1, 1, 2, 2])
  predictions = np.array([0, 1, 1, 1, 0, 0, 0])  # wasps never predicted
  report = evaluate.evaluate_arrays(labels, predictions, None, names, paths=[f'p{i}' for i in range(7)],
                                    info={'data': '/x/val'}, out_dir=tmp_path)
  text = evaluate.format_report(report)
  assert 'accuracy:   0.4286 (3/7)' in text and 'loss:' not in text
  assert 'never predicted: wasps; precision reported as 0' in text
  assert 'wasps            0.0000  0.0000    0.0000        2' in text
  assert [m['path'] for m in report.misclassified] == ['p1', 'p4', 'p5', 'p6']
  saved = json.loads((tmp_path / 'evaluation.json').read_text())
  assert saved['accuracy'] == report.accuracy and saved['notes'] == report.notes
  assert saved['confusion_matrix'] == [[1, 1, 0], [1, 2, 0], [2, 0, 0]]
  assert saved['files']['confusion'] == str(tmp_path / 'confusion.png')
  _check_png(tmp_path / 'confusion.png')


# ------------------------------------------------------------------ the confusion matrix figure


def _check_png(path, min_size=300):
  with Image.open(path) as img:
    assert img.format == 'PNG' and min(img.size) >= min_size, img.size
    pixels = np.asarray(img.convert('RGB'), np.float32)
  assert pixels.std() > 0, 'blank image'
  return pixels


def test_confusion_figure_shades_rows_by_fraction(tmp_path):
  # One dark cell per row where that row's whole count is; all else white.
  counts = np.array([[5, 0, 0], [0, 0, 9], [0, 1, 0]])
  pixels = _check_png(plots.save_confusion_matrix(counts, ['a', 'b', 'c'], tmp_path / 'c.png'))
  many = _check_png(plots.save_confusion_matrix(np.eye(20, dtype=int), [f'class {i}' for i in range(20)],
                                                tmp_path / 'many.png'))
  assert many.shape[0] > pixels.shape[0]  # the figure grows with the number of classes


@pytest.mark.parametrize('counts, names, message', [
    (np.zeros((2, 3), int), ['a', 'b'], 'square'),
    (np.zeros((2, 2), int), ['a', 'b', 'c'], '3 class names'),
    (np.array([[1, -1], [0, 2]]), ['a', 'b'], 'non-negative integer'),
    (np.array([[0.5, 0], [0, 2]]), ['a', 'b'], 'non-negative integer'),
    (np.zeros((2, 2), int), ['a', 'b'], 'no samples'),
])
def test_confusion_figure_bad_input(tmp_path, counts, names, message):
  with pytest.raises(ValueError, match=message):
    plots.save_confusion_matrix(counts, names, tmp_path / 'x.png')
  assert not (tmp_path / 'x.png').exists()


def test_text_of_many_classes_leaves_the_matrix_to_the_files():
  names = [f'class_{i}' for i in range(31)]
  labels = np.arange(31)
  text = evaluate.format_report(evaluate.evaluate_arrays(labels, labels, None, names,
                                                         info={'checkpoint': '/c', 'arch': 'resnet18',
                                                               'checkpoint_epoch': 4}))
  assert 'checkpoint: /c (resnet18, epoch 4)' in text
  assert '31 classes are too many for text; see confusion.png' in text and 'rows: true class' not in text


# ------------------------------------------------------------------ calibration and TTA flags


def test_fit_temperature_flags(tmp_path, small_variables, capsys, monkeypatch):
  from tl_jax import calibration
  from tl_jax.commands import evaluate as evaluate_command
  from tl_jax.commands import predict as predict_command
  ckpt = _small_checkpoint(tmp_path / 'ckpt', small_variables)
  data = _folder(tmp_path / 'data')
  common = ['--checkpoint', str(ckpt), '--data', str(data), '--workers', '0', '--batch-size', '4']
  with pytest.raises(SystemExit):
    evaluate_command.main(common + ['--fit-temperature', '--no-temperature'])
  assert 'not allowed with argument' in capsys.readouterr().err

  def refuse(logits, labels):
    raise calibration.CalibrationError('all 9 images are classified right (nothing stored)')

  monkeypatch.setattr(calibration, 'fit_temperature', refuse)
  assert evaluate_command.main(common + ['--fit-temperature', '--out', str(tmp_path / 'out')]) == 1
  out, err = capsys.readouterr()
  assert err.strip() == 'error: no temperature fitted: all 9 images are classified right (nothing stored)'
  assert 'note: no temperature fitted' in out and 'calibration: ECE' in out
  assert 'temperature' not in checkpoint.load_model(ckpt).metadata
  with pytest.raises(SystemExit):
    predict_command.main(['--checkpoint', str(ckpt), '--min-confidence', '2', 'x.png'])
  assert 'expected a probability in [0, 1], got 2' in capsys.readouterr().err
