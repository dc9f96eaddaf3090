"""Can the model's confidences be believed: calibration metrics, temperature scaling, and the
coverage-accuracy trade-off of answering only when confident.

Everything here is NumPy in float64 on the top-label ("confidence") view of a softmax classifier:

- `calibration_metrics`: expected calibration error over equal-width bins (Guo et al. 2017: 15
  bins, a sample with confidence c in bin (k-1)/M < c <= k/M), the same over equal-count bins
  (adaptive ECE, Mukhoti et al. 2020), the maximum calibration error (the worst non-empty bin),
  NLL and the Brier score (Brier 1950: the squared distance of the probability vector to the
  one-hot label, summed over classes, averaged over samples).
- `fit_temperature`: one T > 0 for all logits, minimising the NLL of softmax(z / T) (Guo et al.'s
  temperature scaling). It divides every logit alike, so the argmax, and hence the accuracy of a
  single view, does not move.
- `coverage_table` / `coverage_curve`: answer only when the top probability is at least P; the
  share answered and the accuracy of those answers.

Logits may carry a views axis, (N, V, C): the probability is then the mean over the V views of
softmax(z_v / T) (test-time augmentation); V = 1 is the plain case.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

NUM_BINS = 15   # Guo et al. 2017
# Thresholds of the printed coverage table; the figure draws every threshold.
COVERAGE_THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# The bounded search for T: an optimum at either end is reported as "does not fit", not stored.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2


class CalibrationError(ValueError):
  """Probabilities or logits that cannot be scored, or a temperature that cannot be fitted."""


# ------------------------------------------------------------------------- probabilities


def _views(logits: np.ndarray) -> np.ndarray:
  """(N, C) or (N, V, C) logits as float64 (N, V, C)."""
  z = np.asarray(logits, np.float64)
  if z.ndim == 2:
    z = z[:, None, :]
  if z.ndim != 3 or z.shape[-1] < 1:
    raise CalibrationError(f'logits must be (N, C) or (N, views, C), got shape {np.shape(logits)}')
  return z


def log_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """(N, C) log of the mean over views of softmax(z_v / T), in float64."""
  z = _views(logits) / float(temperature)
  z = z - z.max(axis=-1, keepdims=True)
  log_softmax = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))   # (N, V, C)
  if log_softmax.shape[1] == 1:
    return log_softmax[:, 0]
  top = log_softmax.max(axis=1, keepdims=True)
  return (top + np.log(np.exp(log_softmax - top).mean(axis=1, keepdims=True)))[:, 0]


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """(N, C) mean over views of softmax(z_v / T), float64."""
  return np.exp(log_probs(logits, temperature))


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if probs.ndim != 2 or labels.shape != (len(probs),):
    raise CalibrationError(f'need (N, C) probabilities and (N,) labels, got {probs.shape} and {labels.shape}')
  if not len(labels):
    raise CalibrationError('no samples to score')
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= probs.shape[1]:
    raise CalibrationError(f'labels must be class indices in [0, {probs.shape[1]})')
  return probs, labels.astype(np.int64)


# ------------------------------------------------------------------------------- metrics


def _bin_errors(confidence: np.ndarray, correct: np.ndarray, bin_of: np.ndarray, num_bins: int):
  """Per bin: count, mean confidence, accuracy (0 where empty)."""
  counts = np.bincount(bin_of, minlength=num_bins).astype(np.float64)
  safe = np.maximum(counts, 1)
  conf = np.bincount(bin_of, confidence, minlength=num_bins) / safe
  acc = np.bincount(bin_of, correct, minlength=num_bins) / safe
  return counts, conf, acc


def equal_width_bins(confidence: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
  """Bin index of each confidence: bin k holds k/M < c <= (k+1)/M (the first also holds 0), as
  Guo et al.'s reference code (`c > lower and c <= upper`)."""
  inner = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
  return np.searchsorted(inner, confidence, side='left')


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> float:
  """ECE over `num_bins` equal-width bins: sum over bins of |accuracy - confidence| x share of samples."""
  return calibration_metrics(probs, labels, num_bins)['ece']


def calibration_metrics(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> dict:
  """ECE, adaptive ECE, MCE, NLL and Brier score of (N, C) probabilities, and the reliability bins.

  Returns a JSON-ready dict: {'num_bins', 'ece', 'adaptive_ece', 'mce', 'nll', 'brier',
  'bins': [{'lower', 'upper', 'count', 'confidence', 'accuracy'}] (equal-width, empty ones too)}.
  """
  if num_bins < 1:
    raise CalibrationError(f'num_bins must be >= 1, got {num_bins}')
  probs, labels = _check(probs, labels)
  n = len(labels)
  predicted = probs.argmax(axis=1)
  confidence = probs[np.arange(n), predicted]
  correct = (predicted == labels).astype(np.float64)

  counts, conf, acc = _bin_errors(confidence, correct, equal_width_bins(confidence, num_bins), num_bins)
  gaps = np.abs(acc - conf)
  ece = float(np.sum(gaps * counts) / n)
  mce = float(gaps[counts > 0].max())

  # Adaptive: bins of (nearly) equal count over the sorted confidences; the first n % M bins get
  # one more sample (np.array_split's rule).
  order = np.argsort(confidence, kind='stable')
  adaptive = 0.0
  for chunk in np.array_split(order, min(num_bins, n)):
    adaptive += abs(correct[chunk].sum() - confidence[chunk].sum())
  adaptive /= n

  onehot = np.zeros_like(probs)
  onehot[np.arange(n), labels] = 1.0
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  return {
      'num_bins': int(num_bins),
      'ece': ece,
      'adaptive_ece': float(adaptive),
      'mce': mce,
      'nll': float(-np.mean(np.log(np.maximum(probs[np.arange(n), labels], np.finfo(np.float64).tiny)))),
      'brier': float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
      'bins': [{'lower': float(edges[k]), 'upper': float(edges[k + 1]), 'count': int(counts[k]),
                'confidence': float(conf[k]), 'accuracy': float(acc[k])} for k in range(num_bins)],
  }


# ------------------------------------------------------------------------------ coverage


def coverage_table(probs: np.ndarray, labels: np.ndarray,
                   thresholds: Sequence[float] = COVERAGE_THRESHOLDS) -> list[dict]:
  """Per threshold P: the share of samples whose top probability is >= P and their accuracy (None
  when none is answered) — what `predict.py --min-confidence P` would answer."""
  probs, labels = _check(probs, labels)
  confidence = probs.max(axis=1)
  correct = probs.argmax(axis=1) == labels
  rows = []
  for p in thresholds:
    answered = confidence >= p
    count = int(answered.sum())
    rows.append({'threshold': float(p), 'answered': count, 'coverage': count / len(labels),
                 'accuracy': float(correct[answered].mean()) if count else None})
  return rows


def coverage_curve(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(coverage, accuracy, threshold) answering the k most confident samples, k = 1..N.

  Samples with equal confidence are answered together (a threshold cannot split them), so only
  the last of each run of ties is a point of the curve.
  """
  probs, labels = _check(probs, labels)
  confidence = probs.max(axis=1)
  order = np.argsort(-confidence, kind='stable')
  conf_sorted = confidence[order]
  hits = np.cumsum(probs.argmax(axis=1)[order] == labels[order])
  k = np.arange(1, len(labels) + 1)
  last = np.append(conf_sorted[1:] != conf_sorted[:-1], True)
  return k[last] / len(labels), hits[last] / k[last], conf_sorted[last]


# ------------------------------------------------------------------- temperature scaling


@dataclasses.dataclass
class TemperatureFit:
  temperature: float
  nll_before: float   # at T = 1
  nll_after: float


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
  """Mean -log p_label of the (view-averaged) softmax of logits / T."""
  logp = log_probs(logits, temperature)
  return float(-np.mean(logp[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> TemperatureFit:
  """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the NLL of softmax(logits / T).

  For one view the NLL is convex in 1/T (a log-sum-exp of linear functions), so a bounded
  1-D search on log T finds its minimum (scipy's bounded Brent, `minimize_scalar`; scipy is a
  dependency of jax). When every sample is already classified right the NLL keeps falling as
  T -> 0 and no finite T is best; when the logits are no better than uniform it keeps falling
  as T grows. Both raise CalibrationError with one line, as does an optimum at a bound.

  Args:
    logits: (N, C), or (N, V, C) for view-averaged probabilities (TTA).
    labels: (N,) true class indices.
  """
  from scipy.optimize import minimize_scalar
  z = _views(logits)
  labels = np.asarray(labels)
  if not len(labels):
    raise CalibrationError('no labelled images to fit a temperature on')
  if labels.shape != (len(z),):
    raise CalibrationError(f'{len(labels)} labels for {len(z)} logits')
  labels = labels.astype(np.int64)
  n = len(labels)
  view_correct = z.argmax(axis=-1) == labels[:, None]
  others = np.where(np.arange(z.shape[-1]) == labels[:, None, None], -np.inf, z).max(axis=-1)
  if np.all(view_correct & (z[np.arange(n), :, labels] > others)):
    raise CalibrationError(
        f'all {n} images are classified right by every view, so the NLL keeps falling as the temperature '
        'goes to 0: no temperature fits these images (nothing stored); fit on more or harder val images')
  objective = lambda log_t: nll(z, labels, math.exp(log_t))
  lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
  result = minimize_scalar(objective, bounds=(lo, hi), method='bounded', options={'xatol': 1e-7})
  log_t = float(result.x)
  # Brent's bounded method never evaluates the bounds themselves; compare with them.
  if objective(lo) <= result.fun:
    raise CalibrationError(f'the NLL of these {n} images is lowest at the smallest temperature searched '
                           f'({MIN_TEMPERATURE:g}): the model is right with a margin on almost all of them and no '
                           'temperature fits (nothing stored); fit on more or harder val images')
  if objective(hi) <= result.fun or log_t > hi - 1e-3:
    raise CalibrationError(f'the NLL of these {n} images keeps falling as the temperature grows (to '
                           f'{MAX_TEMPERATURE:g}): the logits predict the labels no better than chance, so no '
                           'temperature fits (nothing stored)')
  return TemperatureFit(math.exp(log_t), nll(z, labels, 1.0), float(result.fun))

