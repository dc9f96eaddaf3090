"""Evaluating a model on an image folder: metrics as text, `evaluation.json`, `confusion.png`, and
for softmax outputs the calibration (`reliability.png`) and coverage-accuracy curve (`coverage.png`).

Two ways in. `evaluate_checkpoint` loads a model checkpoint (or a training run's best one) and
scores it on a folder, preprocessing the images as the checkpoint says. `evaluate_model` scores
variables already in memory on a `Loader` (the training loop's val loader, at the end of a run),
and `evaluate_arrays` scores predictions computed elsewhere. All three return a `Report`;
`write_report` writes its files and `format_report` renders it as text.

A checkpoint's fitted temperature (tl_jax.calibration) divides its logits before the softmax unless
`use_temperature=False`; `fit_temperature=True` fits one on the evaluated images, reports the
calibration before and after, and stores it in the checkpoint's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from tl_jax import calibration
from tl_jax import metrics as metrics_lib
from tl_jax.checkpoint import BEST_DIR, resolve_model_dir, update_metadata
from tl_jax.data.folder import ImageFolder, drop_bad_images
from tl_jax.data.loader import Loader
from tl_jax.inference import load_inference, make_forward, tta_transform

EVALUATION_JSON = 'evaluation.json'
CONFUSION_PNG = 'confusion.png'
RELIABILITY_PNG = 'reliability.png'
COVERAGE_PNG = 'coverage.png'
# Columns of the text report's confusion matrix show at most this many characters of a class name.
NAME_CHARS = 12
# Beyond this many classes the text confusion matrix is wider than a terminal; the PNG and JSON have it.
MAX_TEXT_CLASSES = 30


class EvaluationError(ValueError):
  """The checkpoint and the data cannot be evaluated together."""


@dataclasses.dataclass
class Report:
  """The result of an evaluation.

  Attributes:
    metrics: `tl_jax.metrics.compute_metrics`'s dict (accuracy, loss, per_class, ...).
    info: where the numbers come from (checkpoint, arch, data folder, skipped images, ...).
    notes: sentences a reader needs to read the numbers right (e.g. a never-predicted class).
    misclassified: {'path', 'true', 'predicted'} per wrong prediction, when paths are known.
    files: name -> path of what `write_report` wrote.
    probs, labels: (N, C) probabilities and (N,) labels the calibration figures are drawn from
      (not in the JSON).
  """
  metrics: dict
  info: dict = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  misclassified: list[dict] = dataclasses.field(default_factory=list)
  files: dict[str, str] = dataclasses.field(default_factory=dict)
  probs: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
  labels: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)

  @property
  def accuracy(self) -> float:
    return self.metrics['accuracy']

  def to_json(self) -> dict:
    return {**self.info, **self.metrics, 'notes': self.notes, 'misclassified': self.misclassified,
            'files': self.files}


# ---------------------------------------------------------------------------------- reports


def _zero_division_notes(metrics: Mapping[str, Any]) -> list[str]:
  notes = []
  if metrics['never_predicted']:
    notes.append(f'never predicted: {", ".join(metrics["never_predicted"])}; precision reported as 0 '
                 '(no predictions to divide by: scikit-learn\'s zero_division=0)')
  if metrics['absent']:
    notes.append(f'no samples of: {", ".join(metrics["absent"])}; recall reported as 0 '
                 '(scikit-learn\'s zero_division=0), and these classes still count in the macro average')
  return notes


def evaluate_arrays(labels: Sequence[int], predictions: Optional[Sequence[int]],
                    losses_or_logits: Optional[np.ndarray], class_names: Sequence[str], *,
                    paths: Optional[Sequence[str]] = None, info: Optional[Mapping[str, Any]] = None,
                    notes: Sequence[str] = (), out_dir: Optional[str | Path] = None,
                    probs: Optional[np.ndarray] = None) -> Report:
  """A report from predictions made elsewhere (e.g. the training loop's own eval step).

  Args:
    labels: (N,) true class indices.
    predictions: (N,) predicted class indices; None takes the argmax of the logits.
    losses_or_logits: (N, C) logits, (N,) per-sample cross-entropies, or None (no loss).
    class_names: name of each class index.
    paths: (N,) image file per sample, to list the misclassified ones.
    info: where the numbers come from; copied into the report and its JSON.
    notes: extra sentences for the reader.
    out_dir: if given, `write_report` writes evaluation.json and confusion.png there.
    probs: (N, C) probabilities to score the calibration of; by default the softmax of (N, C)
      logits (none without them).
  """
  metrics = metrics_lib.compute_metrics(labels, predictions, losses_or_logits, class_names)
  if probs is None and losses_or_logits is not None and np.ndim(losses_or_logits) == 2:
    probs = calibration.probabilities(losses_or_logits)
  if probs is not None:
    labels_array = np.asarray(labels, np.int64)
    metrics['calibration'] = calibration.calibration_metrics(probs, labels_array)
    metrics['coverage'] = calibration.coverage_table(probs, labels_array)
  misclassified = []
  if paths is not None:
    if len(paths) != metrics['num_samples']:
      raise metrics_lib.MetricsError(f'{len(paths)} paths for {metrics["num_samples"]} labels')
    predicted = (np.argmax(np.asarray(losses_or_logits), axis=-1) if predictions is None
                 else np.asarray(predictions))
    names = metrics['class_names']
    misclassified = [{'path': str(path), 'true': names[int(t)], 'predicted': names[int(p)]}
                     for path, t, p in zip(paths, np.asarray(labels), predicted) if t != p]
  report = Report(metrics, dict(info or {}), list(notes) + _zero_division_notes(metrics), misclassified,
                  probs=None if probs is None else np.asarray(probs, np.float64),
                  labels=None if probs is None else np.asarray(labels, np.int64))
  if out_dir is not None:
    write_report(report, out_dir)
  return report


def _usable_out_dir(out_dir: str | Path) -> Path:
  """`out_dir`, created; checked before any slow work so a bad --out fails at once."""
  out_dir = Path(out_dir).absolute()
  if out_dir.exists() and not out_dir.is_dir():
    raise EvaluationError(f'--out {out_dir} is a file, not a directory; choose another --out')
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise EvaluationError(f'--out {out_dir} cannot be created ({e.strerror or e}); choose another --out') from e
  return out_dir


def write_report(report: Report, out_dir: str | Path) -> dict[str, str]:
  """Writes `evaluation.json` (the report's JSON) and `confusion.png` into `out_dir`, and with
  probabilities `reliability.png` and `coverage.png`; returns their paths."""
  from tl_jax import plots
  out_dir = _usable_out_dir(out_dir)
  files = {'json': str(out_dir / EVALUATION_JSON), 'confusion': str(out_dir / CONFUSION_PNG)}
  m = report.metrics
  if 'calibration' in m:
    files['reliability'] = str(out_dir / RELIABILITY_PNG)
    if report.probs is not None:
      files['coverage'] = str(out_dir / COVERAGE_PNG)
  report.files = files
  where = ''
  if report.info.get('data'):
    data = Path(report.info['data'])
    where = f': {data.parent.name}/{data.name}'
  plots.save_confusion_matrix(np.array(m['confusion_matrix']), m['class_names'], files['confusion'],
                              title='confusion matrix' + where)
  if 'reliability' in files:
    temperature = report.info.get('temperature')
    if 'calibration_uncalibrated' in m:
      panels = [('without temperature', m['calibration_uncalibrated']),
                (f'temperature {temperature:.3f}', m['calibration'])]
    else:
      panels = [(f'temperature {temperature:.3f}' if temperature else 'softmax', m['calibration'])]
    plots.save_reliability_diagram(panels, files['reliability'], title='reliability' + where)
  if 'coverage' in files:
    coverage, accuracy, _ = calibration.coverage_curve(report.probs, report.labels)
    plots.save_coverage_curve(coverage, accuracy, m['coverage'], files['coverage'],
                              title='answering only when confident' + where)
  # Written beside its destination and renamed, so a reader never sees half a file.
  tmp = Path(files['json'] + '.tmp')
  tmp.write_text(json.dumps(report.to_json(), indent=2) + '\n')
  os.replace(tmp, files['json'])
  return files


def _calibration_lines(report: Report) -> list[str]:
  m, info = report.metrics, report.info
  if 'calibration' not in m:
    return []

  def summary(c: Mapping[str, Any]) -> str:
    return (f'ECE {c["ece"]:.4f}, adaptive ECE {c["adaptive_ece"]:.4f}, MCE {c["mce"]:.4f}, '
            f'NLL {c["nll"]:.4f}, Brier {c["brier"]:.4f}')

  c = m['calibration']
  lines = [f'calibration: {summary(c)} ({c["num_bins"]} bins)']
  temperature = info.get('temperature')
  if temperature is not None:
    before = m['calibration_uncalibrated']
    how = ('fitted on these images' if info.get('temperature_source') == 'fitted'
           else "the checkpoint's; --no-temperature leaves it out")
    stored = f', stored in {info["temperature_stored"]}' if info.get('temperature_stored') else ''
    lines.append(f'temperature: {temperature:.4f} ({how}{stored}): ECE {before["ece"]:.4f} -> {c["ece"]:.4f}, '
                 f'NLL {before["nll"]:.4f} -> {c["nll"]:.4f}')
    lines.append(f'  without it: {summary(before)}')
  lines.append('coverage (answer only when the top probability >= P):')
  lines.append('  P      answered    accuracy')
  for row in m['coverage']:
    acc = f'{row["accuracy"]:.4f}' if row['accuracy'] is not None else '-'
    lines.append(f'  {row["threshold"]:<5.2f}  {row["coverage"]:6.1%} {row["answered"]:>4d}  {acc}')
  return lines


def _short(name: str, width: int) -> str:
  return name if len(name) <= width else name[:width - 1] + '~'


def format_report(report: Report) -> str:
  """The report as text: where from, accuracy and loss, a per-class table, the confusion matrix."""
  m, info = report.metrics, report.info
  lines = []
  if info.get('checkpoint'):
    about = [info['arch']] if info.get('arch') else []
    if info.get('checkpoint_epoch') is not None:
      about.append(f'epoch {info["checkpoint_epoch"]}')
    lines.append(f'checkpoint: {info["checkpoint"]}' + (f' ({", ".join(about)})' if about else ''))
  if info.get('data'):
    source = f' ({info["data_source"]})' if info.get('data_source') else ''
    lines.append(f'data:       {info["data"]}{source}')
  correct = int(np.trace(np.array(m['confusion_matrix'])))
  lines.append(f'images:     {m["num_samples"]}' + (f' ({info["skipped_images"]} unreadable skipped)'
                                                     if info.get('skipped_images') else ''))
  lines.append(f'accuracy:   {m["accuracy"]:.4f} ({correct}/{m["num_samples"]})')
  if m['loss'] is not None:
    lines.append(f'loss:       {m["loss"]:.4f} (mean cross-entropy)')
  if info.get('tta'):
    lines.append(f'tta:        {info["tta"]} (mean softmax over {info["tta_views"]} views)')
  lines += _calibration_lines(report)
  lines.append('')

  names = m['class_names']
  width = max([len(name) for name in names] + [len('weighted avg')])
  lines.append(f'{"":<{width}}  precision  recall  f1-score  support')

  def row(label: str, r: Mapping[str, Any]) -> str:
    return f'{label:<{width}}  {r["precision"]:9.4f}  {r["recall"]:6.4f}  {r["f1"]:8.4f}  {r["support"]:7d}'

  lines += [row(name, m['per_class'][name]) for name in names]
  lines += ['', row('macro avg', m['macro_avg']), row('weighted avg', m['weighted_avg']), '']

  if len(names) > MAX_TEXT_CLASSES:
    lines.append(f'confusion matrix: {len(names)} classes are too many for text; see confusion.png '
                 'or evaluation.json')
  else:
    lines.append('confusion matrix (rows: true class, columns: predicted class)')
    confusion = np.array(m['confusion_matrix'])
    short = [_short(name, NAME_CHARS) for name in names]
    cell = max([len(s) for s in short] + [len(str(confusion.max()))])
    first = max(len(s) for s in short)
    lines.append(' ' * first + ''.join(f'  {s:>{cell}}' for s in short))
    for s, counts in zip(short, confusion):
      lines.append(f'{s:<{first}}' + ''.join(f'  {int(c):>{cell}}' for c in counts))
  if report.notes:
    lines.append('')
    lines += [f'note: {note}' for note in report.notes]
  if report.files:
    lines += ['', 'wrote ' + ', '.join(report.files.values())]
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------- models


@dataclasses.dataclass
class Outputs:
  """The model's outputs on every sample of a loader, padding dropped, in the loader's order."""
  logits: np.ndarray   # (N, C) float32, or (N, V, C) for a loader of (V, H, W, C) views (TTA)
  labels: np.ndarray   # (N,) int
  indices: np.ndarray  # (N,) index into the loader's samples


def predict_loader(forward: Callable, variables: Mapping, loader: Loader) -> Outputs:
  """Runs `forward` on every batch of `loader` (one shape, so one compile) and drops padding rows."""
  pending = []
  for batch in loader.epoch(0):
    images = batch.images
    if images.ndim == 5:   # views: one (B*V, H, W, C) forward, logits back to (B, V, C)
      b, v = images.shape[:2]
      logits = forward(variables, images.reshape((b * v,) + images.shape[2:])).reshape(b, v, -1)
    else:
      logits = forward(variables, images)
    # Dispatched asynchronously: the loader's threads prepare the next batch meanwhile.
    pending.append((logits, batch.labels, batch.mask, batch.indices))
  logits = jax.device_get([p[0] for p in pending])
  keep = [p[2] for p in pending]
  return Outputs(logits=np.concatenate([np.asarray(l)[k] for l, k in zip(logits, keep)]),
                 labels=np.concatenate([p[1][k] for p, k in zip(pending, keep)]),
                 indices=np.concatenate([p[3][k] for p, k in zip(pending, keep)]))


def evaluate_logits(labels: np.ndarray, logits: np.ndarray, class_names: Sequence[str], *,
                    temperature: Optional[float] = None, fit_temperature: bool = False,
                    paths: Optional[Sequence[str]] = None, info: Optional[Mapping[str, Any]] = None,
                    notes: Sequence[str] = (), out_dir: Optional[str | Path] = None) -> Report:
  """A report from (N, C) logits, or (N, V, C) logits of V views (mean softmax), with a temperature.

  Args:
    labels: (N,) true class indices.
    logits: (N, C) or (N, V, C).
    class_names: name of each class index.
    temperature: divides the logits before the softmax (None: 1, no calibration section for it).
    fit_temperature: fit one on these logits instead (tl_jax.calibration.fit_temperature); when
      none fits, the report says why in `info['temperature_fit_error']` and uses `temperature`.
    paths, info, notes, out_dir: as `evaluate_arrays`.
  """
  info, notes = dict(info or {}), list(notes)
  logits = np.asarray(logits)
  labels = np.asarray(labels, np.int64)
  source = 'checkpoint' if temperature is not None else None
  if fit_temperature:
    try:
      fit = calibration.fit_temperature(logits, labels)
    except calibration.CalibrationError as e:
      info['temperature_fit_error'] = str(e)
      notes.append(f'no temperature fitted: {e}')
    else:
      temperature, source = fit.temperature, 'fitted'
      info['temperature_fit'] = {'temperature': fit.temperature, 'nll_before': fit.nll_before,
                                 'nll_after': fit.nll_after, 'num_samples': int(len(labels))}
  if logits.ndim == 3:
    info['tta_views'] = int(logits.shape[1])
  if logits.ndim == 2 and temperature is None:
    report = evaluate_arrays(labels, None, logits, class_names, paths=paths, info=info, notes=notes)
  else:
    log_p = calibration.log_probs(logits, 1.0 if temperature is None else temperature)
    losses = -log_p[np.arange(len(labels)), labels]
    report = evaluate_arrays(labels, np.argmax(log_p, axis=-1), losses, class_names, paths=paths, info=info,
                             notes=notes, probs=np.exp(log_p))
  if temperature is not None:
    report.info.update(temperature=float(temperature), temperature_source=source)
    report.metrics['calibration_uncalibrated'] = calibration.calibration_metrics(
        calibration.probabilities(logits), labels)
  if out_dir is not None:
    write_report(report, out_dir)
  return report


def evaluate_model(model, variables: Mapping, loader: Loader, class_names: Sequence[str], *,
                   info: Optional[Mapping[str, Any]] = None, notes: Sequence[str] = (),
                   out_dir: Optional[str | Path] = None, temperature: Optional[float] = None,
                   fit_temperature: bool = False) -> Report:
  """Scores `variables` on every sample of `loader` (eval-mode BN); the end-of-training call.

  Args:
    model: the Flax module (`tl_jax.models.create_model(arch, num_classes)`).
    variables: {'params', 'batch_stats'}.
    loader: a non-shuffling Loader with the eval transform (e.g. training's val loader), or one
      giving (V, H, W, C) views per image (TTA: the mean softmax of the views is scored).
    class_names: name of each class index.
    info: where the numbers come from (checkpoint, epoch, data folder), copied into the report.
    notes: extra sentences for the reader.
    out_dir: if given, evaluation.json and confusion.png are written there.
    temperature, fit_temperature: as `evaluate_logits`.
  """
  if loader.shuffle:
    raise EvaluationError('evaluate_model needs a Loader with shuffle=False (random transforms '
                          'would change what is evaluated)')
  outputs = predict_loader(make_forward(model), variables, loader)
  paths = [loader.samples[i][0] for i in outputs.indices]
  return evaluate_logits(outputs.labels, outputs.logits, class_names, temperature=temperature,
                         fit_temperature=fit_temperature, paths=paths, info=info, notes=notes, out_dir=out_dir)


def store_temperature(model_dir: str | Path, report: Report) -> Optional[Path]:
  """Writes the temperature `report` fitted into the checkpoint's metadata (nothing when none was
  fitted); records where in the report. Returns the checkpoint directory written, or None."""
  fit = report.info.get('temperature_fit')
  if fit is None:
    return None
  model_dir = resolve_model_dir(model_dir)
  before, after = report.metrics['calibration_uncalibrated'], report.metrics['calibration']
  update_metadata(model_dir, {'temperature': fit['temperature'], 'calibration': {
      'fitted_on': report.info.get('data'), 'num_samples': fit['num_samples'], 'tta': report.info.get('tta'),
      'nll_before': fit['nll_before'], 'nll_after': fit['nll_after'],
      'ece_before': before['ece'], 'ece_after': after['ece']}})
  report.info['temperature_stored'] = str(model_dir)
  return model_dir


NO_MULTI_LABEL_TEMPERATURE = 'calibrate: temperatures are not fitted for multi-label (sigmoid) heads; nothing stored'


def calibrate_run(model_dir: str | Path, report: Report, multi_label: bool = False) -> str:
  """`calibrate: true` at the end of a run: stores the temperature `report` fitted on the val data in
  the best checkpoint; returns the line to log (why nothing was stored, when so)."""
  if multi_label:
    return NO_MULTI_LABEL_TEMPERATURE
  if report.info.get('temperature_fit_error'):
    return f'calibrate: no temperature fitted: {report.info["temperature_fit_error"]}'
  if 'temperature_fit' not in report.info:
    return 'calibrate: no temperature fitted (the evaluation was run without fit_temperature)'
  where = store_temperature(model_dir, report)
  before, after = report.metrics['calibration_uncalibrated'], report.metrics['calibration']
  return (f'calibrate: temperature {report.info["temperature"]:.4f} fitted on the val data, stored in {where}: '
          f'ECE {before["ece"]:.4f} -> {after["ece"]:.4f}, NLL {before["nll"]:.4f} -> {after["nll"]:.4f}')


# ---------------------------------------------------------------------------------- checkpoints


def resolve_data_folder(data: str | Path) -> tuple[Path, str]:
  """The class folder to evaluate: `data/val` when there is one, else `data`; and which it was."""
  root = Path(data).expanduser().absolute()
  if (root / 'val').is_dir():
    return root / 'val', f'the val/ folder of {root}'
  return root, 'class folders given directly'


def match_class_names(checkpoint_names: Optional[Sequence[str]], num_outputs: int, folder: ImageFolder,
                      checkpoint_dir: Path) -> tuple[list[str], list[str]]:
  """The class names to report and any note; raises unless the folder's classes are the model's."""
  classes = list(folder.classes)
  if checkpoint_names is None:
    if len(classes) != num_outputs:
      raise EvaluationError(
          f'the checkpoint {checkpoint_dir} has {num_outputs} outputs and no class names, but '
          f'{folder.root} has {len(classes)} class folders {classes}; evaluate on a folder with one '
          f'sub-folder per output')
    return classes, [f'the checkpoint has no class names: its outputs 0..{num_outputs - 1} are taken to be '
                     f'the sorted class folders {classes}']
  expected = list(checkpoint_names)
  if classes == expected:
    return classes, []
  if sorted(classes) == sorted(expected):
    why = 'the same classes in another order (class folders are read in sorted order)'
  else:
    only_ckpt = [c for c in expected if c not in classes]
    only_data = [c for c in classes if c not in expected]
    why = f'only in the checkpoint: {only_ckpt or "none"}; only in the folder: {only_data or "none"}'
  splits = [c for c in classes if c in ('train', 'test', 'valid', 'validation')]
  hint = (f' {folder.root} looks like a data set root without val/: pass its split folder, e.g. '
          f'--data {os.path.join(folder.root, splits[0])}.' if splits else '')
  raise EvaluationError(f'the class folders of {folder.root} {classes} are not the checkpoint\'s classes '
                        f'{expected} ({checkpoint_dir}): {why}. Evaluate on a folder with the classes '
                        f'the model was trained on.{hint}')


def default_out_dir(model_dir: Path) -> Path:
  """The run directory of a training run's best checkpoint (RUN/best/<epoch>), else the current directory."""
  model_dir = Path(model_dir).absolute()
  if model_dir.parent.name == BEST_DIR:
    return model_dir.parent.parent
  return Path.cwd()


def _warn(message: str) -> None:
  print(f'warning: {message}', file=sys.stderr)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, batch_size: int = 32, workers: int = 2,
                        out_dir: Optional[str | Path] = None, skip_bad_images: bool = False,
                        warn: Callable[[str], None] = _warn, tta: Optional[str] = None,
                        use_temperature: bool = True, fit_temperature: bool = False) -> Report:
  """Evaluates a model checkpoint on an image folder and writes evaluation.json and confusion.png.

  Args:
    checkpoint: a model checkpoint dir, a training run dir (its best checkpoint) or its best/.
    data: a folder of class sub-folders, or a folder with val/ (then val/ is evaluated).
    batch_size: images per forward (the last batch is padded to it: one compile).
    workers: image decoding threads.
    out_dir: where the files go; default: the run directory of a training run's checkpoint,
      else the current directory.
    skip_bad_images: drop unreadable images with a warning instead of stopping.
    warn: receives one message per skipped image.
    tta: None, 'flip' or 'five-crop' (tl_jax.inference): score the mean softmax of the views.
    use_temperature: divide the logits by the checkpoint's fitted temperature, if it has one.
    fit_temperature: fit a temperature on these images and store it in the checkpoint's metadata
      (when none fits, `report.info['temperature_fit_error']` says why and nothing is stored).
  """
  if batch_size < 1:
    raise EvaluationError(f'--batch-size must be >= 1, got {batch_size}')
  if workers < 0:
    raise EvaluationError(f'--workers must be >= 0, got {workers}')
  model_dir = resolve_model_dir(checkpoint)
  out_dir = _usable_out_dir(out_dir if out_dir is not None else default_out_dir(model_dir))
  folder_path, source = resolve_data_folder(data)
  folder = ImageFolder(folder_path)
  inference = load_inference(model_dir)
  model_ckpt = inference.checkpoint
  if fit_temperature and model_ckpt.metadata.get('multi_label'):
    raise EvaluationError(f'--fit-temperature: {model_dir} has a multi-label (sigmoid) head; temperatures are '
                          'fitted for softmax heads only (no per-class temperatures): drop --fit-temperature')
  transform = tta_transform(inference.transform, tta)
  class_names, notes = match_class_names(model_ckpt.class_names, model_ckpt.num_classes, folder, model_dir)
  folder, skipped = drop_bad_images(folder, skip_bad_images, warn=warn, num_threads=max(workers, 1))

  loader = Loader(folder.samples, lambda img, _rng: transform(img), batch_size, shuffle=False, workers=workers)
  info = {'checkpoint': str(model_dir), 'arch': model_ckpt.arch,
          'checkpoint_epoch': model_ckpt.metadata.get('epoch'), 'data': str(folder_path),
          'data_source': source, 'skipped_images': skipped,
          'preprocessing': model_ckpt.metadata.get('preprocessing'), 'tta': tta}
  report = evaluate_model(inference.model, inference.variables, loader, class_names, info=info, notes=notes,
                          temperature=inference.temperature if use_temperature else None,
                          fit_temperature=fit_temperature)
  store_temperature(model_dir, report)
  write_report(report, out_dir)
  return report


def evaluate_labels_csv(checkpoint: str | Path, data: str | Path, *, batch_size: int = 32, workers: int = 2,
                        out_dir: Optional[str | Path] = None, skip_bad_images: bool = False,
                        warn: Callable[[str], None] = _warn) -> dict:
  """A multi-label checkpoint on a labels CSV (tl_jax.data.multilabel: its val rows, or every row without a
  split column): tl_jax.metrics.multilabel_metrics, written to evaluation.json and returned."""
  from tl_jax.data import multilabel
  model_dir = resolve_model_dir(checkpoint)
  out_dir = _usable_out_dir(out_dir if out_dir is not None else default_out_dir(model_dir))
  inference = load_inference(model_dir)
  model_ckpt = inference.checkpoint
  if not model_ckpt.metadata.get('multi_label'):
    raise EvaluationError(f'--data {data} is a labels CSV (multi-label) but {model_dir} has a single-label '
                          '(softmax) head; pass a folder of class sub-folders')
  rows = multilabel.evaluation_rows(data, model_ckpt.class_names)
  rows, skipped = multilabel.drop_bad_rows(rows, skip_bad_images, warn, max(workers, 1))
  loader = Loader(rows.samples, lambda img, _rng: inference.transform(img), batch_size, shuffle=False,
                  workers=workers)
  outputs = predict_loader(inference.forward, inference.variables, loader)
  result = metrics_lib.multilabel_metrics(outputs.labels, outputs.logits, model_ckpt.class_names)
  result['info'] = {'checkpoint': str(model_dir), 'arch': model_ckpt.arch, 'data': str(data),
                    'checkpoint_epoch': model_ckpt.metadata.get('epoch'), 'skipped_images': skipped}
  (out_dir / 'evaluation.json').write_text(json.dumps(result, indent=1))
  return result
