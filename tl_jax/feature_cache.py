"""Cached backbone features: train the head on features computed once instead of every epoch.

A stage in which only what `from_features` computes learns (ResNet: fc; VGG: classifier and/or
head) and whose backbone keeps its BatchNorm running statistics (`bn: frozen`, or a backbone
without BatchNorm, the plain VGGs) has a fixed backbone for its whole length. Then:
- val features are the same every epoch: they are computed once, at the stage's start;
- train features are too when the train transforms are deterministic (no random op). With
  random augmentations (the tutorial's RandomResizedCrop) each epoch sees new pixels, so the
  train phase runs the backbone as before (still without a backward pass through it).
Under `bn: train` the backbone's running statistics change with every train step, and so do
the val features: nothing is cached.

The cached phases run the same steps on the same batches as the uncached ones: the image
loader's order, padding and mask, the eval-mode backbone, the same head and loss
(`train.train_step` and `train.eval_step` read 'features' in place of 'images';
`train.features_step` computes them). Only float32
rounding can differ, as the backbone runs on other batch compositions (tested to 1e-6 on every
metric). `data.cache_features: false` (`--no-cache-features`) turns it off.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np

from tl_jax.data.loader import padded_batch
from tl_jax.models import features_are_random, features_have_batch_norm, head_stages


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which phases of a stage read cached features, and why not when neither does."""
  train: bool
  val: bool
  reason: str = ''
  backbone_learns: bool = False   # the usual reason, not worth a log line

  @property
  def any(self) -> bool:
    return self.train or self.val

  def describe(self) -> str:
    phases = [p for p, on in (('train', self.train), ('val', self.val)) if on]
    return f'cached backbone features for {" and ".join(phases)}' if phases else f'no cached features: {self.reason}'


def plan(arch: str, trainable_stages: Sequence[str], bn: str, train_deterministic: bool,
         enabled: bool = True, process_count: int = 1) -> Plan:
  """The phases of a stage that can read cached features (see the module docstring).

  Args:
    arch: the model's architecture.
    trainable_stages: the stages that learn in this stage of the recipe.
    bn: the stage's BatchNorm policy, 'train' or 'frozen'.
    train_deterministic: the train transforms draw nothing at random.
    enabled: data.cache_features.
    process_count: processes of the run; a multi-process run loads only its own rows of each
      batch and is not cached.
  """
  if not enabled:
    return Plan(False, False, 'data.cache_features is false')
  if process_count > 1:
    return Plan(False, False, 'not built for multi-process runs')
  learning = [s for s in trainable_stages if s not in head_stages(arch)]
  if learning:
    return Plan(False, False, f'the backbone learns ({", ".join(learning)})', backbone_learns=True)
  if bn == 'train' and features_have_batch_norm(arch):
    return Plan(False, False, "bn: train updates the backbone's BatchNorm statistics every step")
  if features_are_random(arch):
    # torch's model.train() keeps a frozen backbone's stochastic depth on: train features differ each step.
    return Plan(False, True)
  return Plan(train_deterministic, True)


@dataclasses.dataclass
class FeatureBatch:
  features: np.ndarray   # (B, F) float32, zeros on padding rows
  labels: np.ndarray     # (B,) int32
  mask: np.ndarray       # (B,) bool
  indices: np.ndarray    # (B,) dataset index per row, -1 on padding

  def as_dict(self) -> dict[str, np.ndarray]:
    return {'features': self.features, 'labels': self.labels, 'mask': self.mask}


def example_batch(image_batch: Mapping[str, np.ndarray], num_features: int) -> dict[str, np.ndarray]:
  """A feature batch of `image_batch`'s rows, for compiling the steps ahead of time."""
  rows = len(image_batch['mask'])
  return {'features': np.zeros((rows, num_features), np.float32), 'labels': np.asarray(image_batch['labels']),
          'mask': np.asarray(image_batch['mask'])}


def extract(fn: Callable, state, loader, put: Callable[[dict], Any] = lambda b: b) -> np.ndarray:
  """(N, F) features of every sample of `loader` (its epoch 0 pixels), row i for sample i.

  `fn(state, batch) -> {'features'}` (e.g. jitted `tl_jax.training.steps.features_step`). Steps are dispatched
  before any result is read, so the loader's threads prepare the next batch meanwhile.
  """
  pending = []
  for batch in loader.epoch(0):
    pending.append((batch.indices[batch.mask], batch.mask, fn(state, put(batch.as_dict()))['features']))
  out: Optional[np.ndarray] = None
  for indices, mask, features in pending:
    features = np.asarray(jax.device_get(features), np.float32)
    if out is None:
      out = np.zeros((len(loader.samples), features.shape[-1]), np.float32)
    out[indices] = features[mask]
  return out


class FeatureLoader:
  """`loader`'s batches (same order, padding and mask every epoch) with features in place of images."""

  def __init__(self, loader, features: np.ndarray):
    if len(features) != len(loader.samples):
      raise ValueError(f'{len(features)} feature rows for {len(loader.samples)} samples')
    self.loader, self.features = loader, features
    self.samples, self.batch_size = loader.samples, loader.batch_size

  def __len__(self) -> int:
    return len(self.loader)

  def epoch(self, epoch: int, start: int = 0) -> Iterator[FeatureBatch]:
    """The batches of `epoch` from batch `start` on (a run resumed mid-epoch), as `Loader.epoch`."""
    order = self.loader.order(epoch)
    for first in range(start * self.batch_size, len(order), self.batch_size):
      rows = order[first:first + self.batch_size]
      batch = padded_batch(self.features[rows], self.features[0], [self.samples[i][1] for i in rows], rows,
                           self.batch_size)
      yield FeatureBatch(batch.images, batch.labels, batch.mask, batch.indices)
