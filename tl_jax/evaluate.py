"""Evaluating a model on an image folder: metrics as text, `evaluation.json` and `confusion.png`.

Two ways in. `evaluate_checkpoint` loads a model checkpoint (or a training run's best one) and
scores it on a folder, preprocessing the images as the checkpoint says. `evaluate_model` scores
variables already in memory on a `Loader` (the training loop's val loader, at the end of a run),
and `evaluate_arrays` scores predictions computed elsewhere. All three return a `Report`;
`write_report` writes its files and `format_report` renders it as text.
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

from tl_jax import metrics as metrics_lib
from tl_jax.checkpoint import BEST_DIR, resolve_model_dir
from tl_jax.data.folder import ImageFolder, drop_bad_images
from tl_jax.data.loader import Loader
from tl_jax.inference import load_inference, make_forward

EVALUATION_JSON = 'evaluation.json'
CONFUSION_PNG = 'confusion.png'
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
  """
  metrics: dict
  info: dict = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  misclassified: list[dict] = dataclasses.field(default_factory=list)
  files: dict[str, str] = dataclasses.field(default_factory=dict)

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
                    notes: Sequence[str] = (), out_dir: Optional[str | Path] = None) -> Report:
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
  """
  metrics = metrics_lib.compute_metrics(labels, predictions, losses_or_logits, class_names)
  misclassified = []
  if paths is not None:
    if len(paths) != metrics['num_samples']:
      raise metrics_lib.MetricsError(f'{len(paths)} paths for {metrics["num_samples"]} labels')
    predicted = (np.argmax(np.asarray(losses_or_logits), axis=-1) if predictions is None
                 else np.asarray(predictions))
    names = metrics['class_names']
    misclassified = [{'path': str(path), 'true': names[int(t)], 'predicted': names[int(p)]}
                     for path, t, p in zip(paths, np.asarray(labels), predicted) if t != p]
  report = Report(metrics, dict(info or {}), list(notes) + _zero_division_notes(metrics), misclassified)
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
  """Writes `evaluation.json` (the report's JSON) and `confusion.png` into `out_dir`; returns their paths."""
  from tl_jax import plots
  out_dir = _usable_out_dir(out_dir)
  files = {'json': str(out_dir / EVALUATION_JSON), 'confusion': str(out_dir / CONFUSION_PNG)}
  report.files = files
  title = 'confusion matrix'
  if report.info.get('data'):
    data = Path(report.info['data'])
    title += f': {data.parent.name}/{data.name}'
  plots.save_confusion_matrix(np.array(report.metrics['confusion_matrix']), report.metrics['class_names'],
                              files['confusion'], title=title)
  # Written beside its destination and renamed, so a reader never sees half a file.
  tmp = Path(files['json'] + '.tmp')
  tmp.write_text(json.dumps(report.to_json(), indent=2) + '\n')
  os.replace(tmp, files['json'])
  return files


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
  logits: np.ndarray   # (N, C) float32
  labels: np.ndarray   # (N,) int
  indices: np.ndarray  # (N,) index into the loader's samples


def predict_loader(forward: Callable, variables: Mapping, loader: Loader) -> Outputs:
  """Runs `forward` on every batch of `loader` (one shape, so one compile) and drops padding rows."""
  pending = []
  for batch in loader.epoch(0):
    # Dispatched asynchronously: the loader's threads prepare the next batch meanwhile.
    pending.append((forward(variables, batch.images), batch.labels, batch.mask, batch.indices))
  logits = jax.device_get([p[0] for p in pending])
  keep = [p[2] for p in pending]
  return Outputs(logits=np.concatenate([np.asarray(l)[k] for l, k in zip(logits, keep)]),
                 labels=np.concatenate([p[1][k] for p, k in zip(pending, keep)]),
                 indices=np.concatenate([p[3][k] for p, k in zip(pending, keep)]))


def evaluate_model(model, variables: Mapping, loader: Loader, class_names: Sequence[str], *,
                   info: Optional[Mapping[str, Any]] = None, notes: Sequence[str] = (),
                   out_dir: Optional[str | Path] = None) -> Report:
  """Scores `variables` on every sample of `loader` (eval-mode BN); the end-of-training call.

  Args:
    model: the Flax module (`tl_jax.models.create_model(arch, num_classes)`).
    variables: {'params', 'batch_stats'}.
    loader: a non-shuffling Loader with the eval transform (e.g. training's val loader).
    class_names: name of each class index.
    info: where the numbers come from (checkpoint, epoch, data folder), copied into the report.
    notes: extra sentences for the reader.
    out_dir: if given, evaluation.json and confusion.png are written there.
  """
  if loader.shuffle:
    raise EvaluationError('evaluate_model needs a Loader with shuffle=False (random transforms '
                          'would change what is evaluated)')
  outputs = predict_loader(make_forward(model), variables, loader)
  paths = [loader.samples[i][0] for i in outputs.indices]
  return evaluate_arrays(outputs.labels, None, outputs.logits, class_names, paths=paths, info=info,
                         notes=notes, out_dir=out_dir)


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
                        warn: Callable[[str], None] = _warn) -> Report:
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
  class_names, notes = match_class_names(model_ckpt.class_names, model_ckpt.num_classes, folder, model_dir)
  folder, skipped = drop_bad_images(folder, skip_bad_images, warn=warn, num_threads=max(workers, 1))

  transform = inference.transform
  loader = Loader(folder.samples, lambda img, _rng: transform(img), batch_size, shuffle=False, workers=workers)
  info = {'checkpoint': str(model_dir), 'arch': model_ckpt.arch,
          'checkpoint_epoch': model_ckpt.metadata.get('epoch'), 'data': str(folder_path),
          'data_source': source, 'skipped_images': skipped,
          'preprocessing': model_ckpt.metadata.get('preprocessing')}
  report = evaluate_model(inference.model, inference.variables, loader, class_names, info=info, notes=notes)
  write_report(report, out_dir)
  return report
