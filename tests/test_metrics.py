"""Metrics against scikit-learn on the same predictions, and bad input."""

import numpy as np
import pytest

from helpers import within
from tl_jax import metrics

CLASS_NAMES = ['ants', 'bees', 'wasps', 'flies']


def _case(seed: int = 0, n: int = 60, num_classes: int = 4, never_predicted: int = 2):
  """Random labels and logits over `num_classes`; class `never_predicted` is never the argmax."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  logits = rng.normal(0, 2, (n, num_classes))
  logits[:, never_predicted] -= 10.0
  # Make the predictions informative, so precision and recall are not all near 1/C.
  logits[np.arange(n), labels] += rng.uniform(0, 3, n)
  logits[:, never_predicted] = np.minimum(logits[:, never_predicted], logits.max(axis=1) - 0.5)
  return labels, logits


def _sklearn(labels, predictions, num_classes):
  sk = pytest.importorskip('sklearn.metrics')
  every = list(range(num_classes))
  out = {'confusion': sk.confusion_matrix(labels, predictions, labels=every),
         'accuracy': sk.accuracy_score(labels, predictions)}
  out['per_class'] = sk.precision_recall_fscore_support(labels, predictions, labels=every, zero_division=0)
  for avg in ('macro', 'weighted'):
    out[avg] = sk.precision_recall_fscore_support(labels, predictions, labels=every, average=avg,
                                                  zero_division=0)[:3]
  return out


def _check_against_sklearn(result, labels, predictions, class_names):
  ref = _sklearn(labels, predictions, len(class_names))
  np.testing.assert_array_equal(np.array(result['confusion_matrix']), ref['confusion'])
  err = abs(result['accuracy'] - ref['accuracy'])
  precision, recall, f1, support = ref['per_class']
  for i, name in enumerate(class_names):
    row = result['per_class'][name]
    assert row['support'] == support[i], name
    err = max(err, abs(row['precision'] - precision[i]), abs(row['recall'] - recall[i]), abs(row['f1'] - f1[i]))
  for avg in ('macro', 'weighted'):
    ours = result[f'{avg}_avg']
    err = max(err, *(abs(ours[k] - v) for k, v in zip(('precision', 'recall', 'f1'), ref[avg])))
  assert within(err, 'metric_abs_f64', 'metrics: accuracy, P/R/F1 and averages vs sklearn (abs)'), err


def test_metrics_equal_sklearn_with_a_class_never_predicted():
  sk = pytest.importorskip('sklearn.metrics')
  labels, logits = _case()
  predictions = logits.argmax(axis=1)
  assert 2 in labels and 2 not in predictions  # the case the test is about
  result = metrics.compute_metrics(labels, predictions, logits, CLASS_NAMES)
  _check_against_sklearn(result, labels, predictions, CLASS_NAMES)
  assert result['per_class']['wasps']['precision'] == 0.0
  assert result['never_predicted'] == ['wasps'] and result['absent'] == []

  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  ref_loss = sk.log_loss(labels, probs, labels=list(range(4)))
  err = abs(result['loss'] - ref_loss)
  assert within(err, 'metric_abs_f64', 'metrics: mean cross-entropy vs sklearn log_loss (abs)'), err


def test_per_sample_losses_give_their_mean_and_predictions_default_to_the_argmax():
  labels, logits = _case(seed=1)
  from_logits = metrics.compute_metrics(labels, None, logits, CLASS_NAMES)
  losses = metrics.cross_entropy(logits, labels)
  from_losses = metrics.compute_metrics(labels, logits.argmax(axis=1), losses, CLASS_NAMES)
  assert from_losses == from_logits
  # A hand cross-entropy: -log of the softmax probability of the true class.
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  err = abs(from_logits['loss'] - np.mean(-np.log(probs[np.arange(len(labels)), labels])))
  assert within(err, 'metric_abs_f64', 'metrics: mean cross-entropy vs hand softmax (abs)'), err
  assert metrics.compute_metrics(labels, logits.argmax(axis=1), None, CLASS_NAMES)['loss'] is None


def test_a_class_absent_from_the_labels_has_recall_zero_as_sklearn():
  labels, logits = _case(seed=2, n=40, num_classes=5, never_predicted=4)
  labels = np.where(labels == 1, 0, labels)  # class 1 has no samples
  predictions = logits.argmax(axis=1)
  predictions[:3] = 1                        # but is predicted a few times
  names = CLASS_NAMES + ['moths']
  result = metrics.compute_metrics(labels, predictions, None, names)
  _check_against_sklearn(result, labels, predictions, names)
  assert result['per_class']['bees'] == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 0}
  assert result['absent'] == ['bees'] and result['never_predicted'] == ['moths']


def test_two_classes_and_all_right():
  labels = np.array([0, 1, 1, 0, 1])
  result = metrics.compute_metrics(labels, labels, None, ['a', 'b'])
  _check_against_sklearn(result, labels, labels, ['a', 'b'])
  assert result['accuracy'] == 1.0 and result['confusion_matrix'] == [[2, 0], [0, 3]]


def test_the_confusion_matrix_is_true_by_predicted():
  result = metrics.compute_metrics([0, 0, 1, 2], [1, 1, 1, 0], None, ['a', 'b', 'c'])
  assert result['confusion_matrix'] == [[0, 2, 0], [0, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize('labels, predictions, scores, names, message', [
    ([0, 1], [0, 3], None, ['a', 'b'], 'predictions holds 3'),
    ([0, -1], [0, 1], None, ['a', 'b'], 'labels holds -1'),
    ([0, 1], [0], None, ['a', 'b'], '1 predictions for 2 labels'),
    ([0.0, 1.0], [0, 1], None, ['a', 'b'], 'integer'),
    ([], [], None, ['a', 'b'], 'no samples'),
    ([0, 1], [0, 1], np.zeros((2, 3)), ['a', 'b'], 'logits must be (N, C) = (2, 2)'),
    ([0, 1], [0, 1], np.zeros(3), ['a', 'b'], 'got shape (3,)'),
    ([0, 1], None, np.zeros(2), ['a', 'b'], 'predictions are needed'),
    ([0, 1], [0, 1], None, ['a', 'a'], 'repeat'),
])
def test_bad_input_is_named(labels, predictions, scores, names, message):
  with pytest.raises(metrics.MetricsError, match=message.replace('(', r'\(').replace(')', r'\)')):
    metrics.compute_metrics(np.asarray(labels), predictions, scores, names)
