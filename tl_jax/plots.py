"""PNG figures of a run: an augmented train batch, val predictions, loss/accuracy curves, and the
confusion matrix of an evaluation.

Figures are built from `matplotlib.figure.Figure` on an Agg canvas instead of pyplot: no
backend is switched under a user who already has pyplot open, and no figure enters pyplot's
global registry, so nothing accumulates across calls. Each PNG is written to a temporary file
beside its destination and moved into place with `os.replace`, so a reader never sees half a
file.
"""

from __future__ import annotations

import math
import os
import textwrap
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PANEL_INCHES = 2.4   # about one 224-pixel image per panel at DPI
DPI = 100
TITLE_CHARS = 28     # about a panel's width at 10 pt; longer title lines wrap
RIGHT_COLOR = 'tab:green'
WRONG_COLOR = 'tab:red'
CURVE_KEYS = ('epoch', 'train_loss', 'val_loss', 'train_acc', 'val_acc')


def denormalize(images_bhwc: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Inverse of ToTensor + Normalize: `x * std + mean` per channel, clipped to [0, 1], float32."""
  images = np.asarray(images_bhwc, np.float32)
  if images.ndim == 0:
    raise ValueError('denormalize needs images with a trailing channel axis, got a scalar')
  mean32, std32 = np.asarray(mean, np.float32).ravel(), np.asarray(std, np.float32).ravel()
  num_channels = images.shape[-1]
  for name, values in (('mean', mean32), ('std', std32)):
    if values.size not in (1, num_channels):
      raise ValueError(f'{name} has {values.size} values but the images have {num_channels} channels')
  return np.clip(images * std32 + mean32, 0.0, 1.0)


def save_train_batch(images_bhwc: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                     mean: Sequence[float], std: Sequence[float], path: str | Path,
                     max_images: int = 16) -> Path:
  """Writes a grid of (augmented) training images, each titled with its class name.

  The tutorial's `imshow(out, title=[class_names[x] for x in classes])`, one panel per image.

  Args:
    images_bhwc: normalised float images, (B, H, W, C).
    labels: (B,) class indices into `class_names`.
    class_names: name per class index.
    mean, std: the Normalize parameters the images went through.
    path: destination PNG; parent directories are created.
    max_images: show at most this many (the first ones).

  Returns:
    `path` as a Path.
  """
  images = _check_images(images_bhwc)
  labels = _check_labels(labels, len(images), class_names, 'labels')
  if max_images < 1:
    raise ValueError(f'max_images must be >= 1, got {max_images}')
  count = min(len(images), max_images)
  shown = denormalize(images[:count], mean, std)
  titles = [_wrap(str(class_names[label])) for label in labels[:count]]
  fig = _image_grid(shown, titles, [None] * count, ncols=min(count, 4))
  suffix = f' (first {count} of {len(images)})' if count < len(images) else ''
  fig.suptitle(f'train batch, augmented{suffix}')
  return _save(fig, path)


def save_predictions(images_bhwc: np.ndarray, predicted: Sequence[int], labels: Sequence[int],
                     class_names: Sequence[str], mean: Sequence[float], std: Sequence[float],
                     path: str | Path, num_images: int = 6) -> Path:
  """Writes val images titled `predicted: X / true: Y`, green when right and red when wrong.

  The tutorial's `visualize_model`, with the true class added.

  Args:
    images_bhwc: normalised float images, (B, H, W, C).
    predicted: (B,) predicted class indices (argmax of the logits).
    labels: (B,) true class indices.
    class_names: name per class index.
    mean, std: the Normalize parameters the images went through.
    path: destination PNG; parent directories are created.
    num_images: show the first `num_images` (fewer when the batch is smaller).

  Returns:
    `path` as a Path.
  """
  images = _check_images(images_bhwc)
  predicted = _check_labels(predicted, len(images), class_names, 'predicted')
  labels = _check_labels(labels, len(images), class_names, 'labels')
  if num_images < 1:
    raise ValueError(f'num_images must be >= 1, got {num_images}')
  count = min(len(images), num_images)
  shown = denormalize(images[:count], mean, std)
  titles, colors = [], []
  for pred, true in zip(predicted[:count], labels[:count]):
    title = f'predicted: {class_names[pred]} / true: {class_names[true]}'
    if len(title) > TITLE_CHARS:
      title = '\n'.join([_wrap(f'predicted: {class_names[pred]}'), _wrap(f'true: {class_names[true]}')])
    titles.append(title)
    colors.append(RIGHT_COLOR if pred == true else WRONG_COLOR)
  fig = _image_grid(shown, titles, colors, ncols=min(count, 3))
  correct = int(np.sum(predicted[:count] == labels[:count]))
  fig.suptitle(f'val predictions: {correct}/{count} correct')
  return _save(fig, path)


def save_curves(history: Sequence[dict], path: str | Path) -> Path:
  """Writes loss and accuracy per epoch (train and val), the best val epoch marked, and the lr.

  Args:
    history: one row per epoch with keys epoch, train_loss, val_loss, train_acc, val_acc and
      optionally lr (a log-scale third panel is drawn when every row has a positive lr).
    path: destination PNG; parent directories are created.

  Returns:
    `path` as a Path.
  """
  if not history:
    raise ValueError('history is empty: nothing to plot')
  for i, row in enumerate(history):
    missing = [key for key in CURVE_KEYS if key not in row]
    if missing:
      raise ValueError(f'history row {i} lacks {missing}; each row needs {list(CURVE_KEYS)}')

  def column(key: str) -> np.ndarray:
    return np.array([row[key] for row in history], np.float64)

  epochs = column('epoch')
  lrs = column('lr') if all('lr' in row for row in history) else None
  show_lr = lrs is not None and bool(np.all(lrs > 0))

  fig = Figure(figsize=(11.5 if show_lr else 9.0, 3.6), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 3 if show_lr else 2, gridspec_kw={'width_ratios': [1, 1, 0.6] if show_lr else [1, 1]})
  loss_ax, acc_ax = axes[0], axes[1]
  for ax, key, name in ((loss_ax, 'loss', 'loss'), (acc_ax, 'acc', 'accuracy')):
    ax.plot(epochs, column(f'train_{key}'), 'o-', markersize=3, label='train')
    ax.plot(epochs, column(f'val_{key}'), 's-', markersize=3, label='val')
    ax.set_title(name)
    _epoch_axis(ax, epochs)
    ax.grid(alpha=0.3)

  val_acc = column('val_acc')
  if np.any(np.isfinite(val_acc)):
    # The first maximum, as the training loop keeps the first epoch that reaches it.
    best = int(np.nanargmax(val_acc))
    for ax in (loss_ax, acc_ax):
      ax.axvline(epochs[best], color='0.5', linestyle='--', linewidth=1)
    acc_ax.plot(epochs[best], val_acc[best], '*', color='tab:red', markersize=12, zorder=3,
                label=f'best val {val_acc[best]:.4f} (epoch {epochs[best]:g})')
  loss_ax.legend(fontsize='small')
  acc_ax.legend(fontsize='small')

  if show_lr:
    lr_ax = axes[2]
    lr_ax.step(epochs, lrs, where='post', color='tab:purple')
    lr_ax.plot(epochs, lrs, '.', color='tab:purple')
    lr_ax.set_yscale('log')
    lr_ax.set_title('learning rate')
    _epoch_axis(lr_ax, epochs)
    lr_ax.grid(alpha=0.3, which='both')
  return _save(fig, path)


def save_confusion_matrix(confusion, class_names: Sequence[str], path: str | Path,
                          title: str = 'confusion matrix') -> Path:
  """Writes the confusion matrix: counts in the cells, shaded by the fraction of the true class.

  Shading by row (recall) rather than by count keeps a small class's mistakes as visible as a
  large class's; the diagonal is the per-class recall.

  Args:
    confusion: (C, C) counts, rows = true class, columns = predicted (as sklearn).
    class_names: name per class index.
    path: destination PNG; parent directories are created.
    title: figure title (the accuracy and sample count are appended).

  Returns:
    `path` as a Path.
  """
  counts = np.asarray(confusion)
  num_classes = len(class_names)
  if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
    raise ValueError(f'confusion must be a square (C, C) matrix, got shape {counts.shape}')
  if counts.shape[0] != num_classes:
    raise ValueError(f'confusion is {counts.shape[0]}x{counts.shape[0]} but {num_classes} class names are given')
  if not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
    raise ValueError('confusion must hold non-negative integer counts')
  total = int(counts.sum())
  if total == 0:
    raise ValueError('confusion holds no samples: nothing to plot')
  row_sums = counts.sum(axis=1, keepdims=True)
  fractions = counts / np.maximum(row_sums, 1)

  # About 0.6 inch per class, within a size a screen shows whole; cell text is dropped when
  # the cells get too small to hold it.
  side = float(np.clip(1.5 + 0.6 * num_classes, 4.0, 16.0))
  cell_inches = side / (num_classes + 2)
  fig = Figure(figsize=(side + 1.2, side), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  image = ax.imshow(fractions, cmap='Blues', vmin=0.0, vmax=1.0)
  colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
  colorbar.set_label('fraction of the true class')
  ticks = np.arange(num_classes)
  labels = [textwrap.shorten(str(name), 20, placeholder='...') for name in class_names]
  tick_size = float(np.clip(cell_inches * 30, 6, 11))
  ax.set_xticks(ticks, labels, rotation=45 if num_classes > 3 else 0, ha='right' if num_classes > 3 else 'center',
                fontsize=tick_size)
  ax.set_yticks(ticks, labels, fontsize=tick_size)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  if cell_inches >= 0.3:
    text_size = float(np.clip(cell_inches * 22, 6, 14))
    for t in range(num_classes):
      for p in range(num_classes):
        # White on dark cells, black on light ones.
        color = 'white' if fractions[t, p] > 0.5 else 'black'
        ax.text(p, t, str(int(counts[t, p])), ha='center', va='center', color=color, fontsize=text_size)
  accuracy = np.trace(counts) / total
  ax.set_title(f'{title}\naccuracy {accuracy:.4f} ({int(np.trace(counts))}/{total})')
  return _save(fig, path)


def save_reliability_diagram(panels: Sequence[tuple[str, dict]], path: str | Path,
                             title: str = 'reliability') -> Path:
  """Writes one reliability diagram per panel: accuracy per confidence bin against the diagonal.

  Each bar is a bin's accuracy; the red part up to the bin's mean confidence is the gap the ECE
  averages (weighted by the bin's share, drawn below as a histogram). Two panels show the
  calibration before and after temperature scaling side by side.

  Args:
    panels: (panel title, `tl_jax.calibration.calibration_metrics`' dict) per panel.
    path: destination PNG; parent directories are created.
    title: figure title.

  Returns:
    `path` as a Path.
  """
  if not panels:
    raise ValueError('no calibration to plot')
  fig = Figure(figsize=(4.2 * len(panels), 5.4), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, len(panels), squeeze=False, sharex=True, gridspec_kw={'height_ratios': [3, 1]})
  for col, (name, calibration) in enumerate(panels):
    bins = calibration['bins']
    if not bins or not sum(b['count'] for b in bins):
      raise ValueError(f'panel {name!r} has no samples in its bins')
    lower = np.array([b['lower'] for b in bins])
    width = np.array([b['upper'] - b['lower'] for b in bins])
    counts = np.array([b['count'] for b in bins])
    acc = np.array([b['accuracy'] for b in bins])
    conf = np.array([b['confidence'] for b in bins])
    full = counts > 0
    ax, hist = axes[0, col], axes[1, col]
    ax.plot([0, 1], [0, 1], '--', color='0.5', linewidth=1, label='perfect calibration')
    ax.bar(lower[full], acc[full], width[full], align='edge', color='tab:blue', edgecolor='white',
           label='accuracy')
    ax.bar(lower[full], conf[full] - acc[full], width[full], bottom=acc[full], align='edge', color=WRONG_COLOR,
           alpha=0.35, edgecolor=WRONG_COLOR, label='gap to confidence')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel('accuracy')
    ax.set_title(f'{name}\nECE {calibration["ece"]:.4f}, MCE {calibration["mce"]:.4f}', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small', loc='upper left')
    hist.bar(lower, counts, width, align='edge', color='0.55', edgecolor='white')
    hist.set_xlabel('confidence (top probability)')
    hist.set_ylabel('images')
    hist.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=3))
  fig.suptitle(title)
  return _save(fig, path)


def save_coverage_curve(coverage: Sequence[float], accuracy: Sequence[float], table: Sequence[dict],
                        path: str | Path, title: str = 'coverage and accuracy') -> Path:
  """Writes the accuracy of the answered images against the share answered, answering the most
  confident first; the thresholds of `table` (`tl_jax.calibration.coverage_table`) are marked.

  Args:
    coverage, accuracy: the curve (`tl_jax.calibration.coverage_curve`), coverage increasing.
    table: rows {'threshold', 'coverage', 'accuracy'}; rows that answer nothing are left out.
    path: destination PNG; parent directories are created.
    title: figure title.

  Returns:
    `path` as a Path.
  """
  coverage, accuracy = np.asarray(coverage, np.float64), np.asarray(accuracy, np.float64)
  if coverage.ndim != 1 or coverage.shape != accuracy.shape or not len(coverage):
    raise ValueError(f'coverage and accuracy must be equal-length 1-D curves, got {coverage.shape} '
                     f'and {accuracy.shape}')
  fig = Figure(figsize=(6.0, 4.2), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ax.plot(coverage, accuracy, '.-', color='tab:blue', markersize=3)
  shown = [row for row in table if row['accuracy'] is not None]
  ax.plot([r['coverage'] for r in shown], [r['accuracy'] for r in shown], 'o', color='tab:red', markersize=4)
  for row in shown:
    ax.annotate(f'P={row["threshold"]:g}', (row['coverage'], row['accuracy']), textcoords='offset points',
                xytext=(4, -10), fontsize=7)
  ax.set_xlim(0, 1.02)
  ax.set_ylim(max(0.0, float(np.nanmin(accuracy)) - 0.05), 1.01)
  ax.set_xlabel('share of images answered (top probability >= P)')
  ax.set_ylabel('accuracy of the answered images')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def _epoch_axis(ax, epochs: np.ndarray) -> None:
  ax.set_xlabel('epoch')
  ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
  # Half an epoch of margin; also keeps a one-epoch history from getting a zero-width axis.
  ax.set_xlim(np.nanmin(epochs) - 0.5, np.nanmax(epochs) + 0.5)


def _wrap(text: str) -> str:
  return textwrap.fill(text, TITLE_CHARS)


def _check_images(images_bhwc) -> np.ndarray:
  images = np.asarray(images_bhwc)
  if images.ndim != 4:
    raise ValueError(f'images must be (B, H, W, C), got shape {images.shape}')
  if len(images) == 0:
    raise ValueError('no images to plot')
  if images.shape[-1] not in (1, 3):
    raise ValueError(f'images must have 1 or 3 channels (channels last), got shape {images.shape}')
  return images


def _check_labels(labels, num_images: int, class_names: Sequence[str], name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'{name} must be one class index per image, got shape {labels.shape}')
  if len(labels) != num_images:
    raise ValueError(f'{len(labels)} {name} for {num_images} images')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{name} must be integer class indices, got dtype {labels.dtype}')
  bad = labels[(labels < 0) | (labels >= len(class_names))]
  if bad.size:
    raise ValueError(f'{name} holds {bad[0]}, outside the {len(class_names)} class names')
  return labels


def _image_grid(images_bhwc: np.ndarray, titles: list[str], colors: list, ncols: int) -> Figure:
  nrows = math.ceil(len(images_bhwc) / ncols)
  fig = Figure(figsize=(ncols * PANEL_INCHES, nrows * (PANEL_INCHES + 0.35) + 0.3), dpi=DPI,
               layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, image, title, color in zip(axes, images_bhwc, titles, colors):
    if image.shape[-1] == 1:
      ax.imshow(image[..., 0], cmap='gray', vmin=0.0, vmax=1.0)
    else:
      ax.imshow(image)
    ax.set_title(title, fontsize=10, **({'color': color} if color else {}))
  for ax in axes:
    ax.axis('off')
  return fig


def _save(fig: Figure, path: str | Path) -> Path:
  """Renders `fig` to `path` through a temporary file in the same directory, then frees it."""
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., 'xb') rather than mkstemp: mkstemp's 0600 mode would outlive the rename,
    # while this file gets the usual umask-derived mode.
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
      with open(tmp, 'xb') as f:
        fig.savefig(f, format='png')
      os.replace(tmp, path)
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
  finally:
    # Break the figure's reference cycles now rather than at the next gc pass.
    fig.clear()
  return path


def save_thumbnails(images_bhwc: np.ndarray, titles: Sequence[str], path: str | Path, ncols: int,
                    title: str = '', colors: Sequence = ()) -> Path:
  """Images in [0, 1] (B, H, W, 3) in rows of `ncols` panels, each captioned (a data check's
  duplicate pairs side by side, its likely mislabels)."""
  images = _check_images(images_bhwc)
  if len(titles) != len(images):
    raise ValueError(f'{len(titles)} titles for {len(images)} images')
  fig = _image_grid(images, [_wrap(t) for t in titles], list(colors) or [None] * len(images), ncols)
  if title:
    fig.suptitle(title)
  return _save(fig, path)
