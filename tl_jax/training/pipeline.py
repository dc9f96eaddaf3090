"""A recipe's data pipeline: its samples, its train and val transforms, and their loaders."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from tl_jax.config import Config
from tl_jax.data import augment, cache, sources
from tl_jax.data.loader import Loader
from tl_jax.data.sources import Data
from tl_jax.rundir import RunError
from tl_jax.weights import Preprocessing


def load_data(config: Config, workdir: Optional[Path] = None, log: Callable[[str], None] = print) -> Data:
  """The recipe's train and val samples (tl_jax.data.sources): a folder, a split folder, or a TFDS set."""
  d = config.data
  return sources.load_data(d.path, workdir=workdir, seed=config.seed, skip_bad_images=d.skip_bad_images,
                           workers=max(d.workers, 1), train_split=d.train_split, val_split=d.val_split,
                           tfds_data_dir=d.tfds_data_dir, tfds_download=d.tfds_download,
                           val_fraction=d.val_fraction, log=log)


@dataclasses.dataclass(frozen=True)
class Transforms:
  """A run's train and val pipelines (tl_jax.data.augment.Pipeline): (image, rng) -> float32 HWC."""
  train: Any
  val: Any


def make_transforms(config: Config, preprocessing: Preprocessing) -> Transforms:
  """The configured transform lists; a list left out is the weights' own preprocessing (the tutorial's)."""
  train_spec = config.data.train_transforms or augment.tutorial_train_spec(preprocessing)
  val_spec = config.data.val_transforms or augment.tutorial_val_spec(preprocessing)
  return Transforms(augment.build_pipeline(train_spec, where='data.train_transforms'),
                    augment.build_pipeline(val_spec, where='data.val_transforms'))


def decoded_cache(config: Config, data: Data, samples: Sequence, budget_bytes: Optional[int] = None) -> Callable:
  """`data.load`, or a cache of the decoded images of `samples` (data.cache_decoded, tl_jax.data.cache);
  other samples are loaded as they are.

  'auto' sizes the set from the files' headers, so it applies to folders; a TFDS set is cached
  only when asked (true).
  """
  policy = config.data.cache_decoded
  if not samples or (policy == 'auto' and data.source.get('kind') == 'tfds'):
    return data.load
  return cache.cached_loader(data.load, samples, policy, budget_bytes)


def _uint8_transform(pipeline, img, rng):
  """Every op before ToTensor on the host; ToTensor and Normalize happen on the device."""
  return pipeline.apply_uint8(img, pipeline.sample(rng, img.width, img.height))


def make_loaders(config: Config, data: Data, transforms: Transforms, uint8: bool = False
                 ) -> tuple[Loader, Loader]:
  """The train (shuffled) and val loaders; in a multi-process run each loads its own rows of every batch.

  Args:
    uint8: batches hold uint8 pixels and the steps normalise them on the device (4x fewer bytes
      to the device), to the same float32 values.
  """
  d = config.data
  # A phase whose transforms draw nothing at random (val) keeps its finished rows, the others their
  # decoded images (data.cache_decoded); each process holds its own rows.
  phases = {'train': (data.train.samples, transforms.train), 'val': (data.val.samples, transforms.val)}
  row_bytes = {name: len(samples) // jax.process_count() * _row_nbytes(pipeline, uint8)
               for name, (samples, pipeline) in phases.items() if pipeline.deterministic}
  if not all(row_bytes.values()) or not cache.should_cache_rows(d.cache_decoded, sum(row_bytes.values())):
    row_bytes = {}
  budget = cache.default_budget_bytes() - sum(row_bytes.values())
  decoded = [s for name, (samples, _) in phases.items() if name not in row_bytes for s in samples]
  common = dict(seed=config.seed, workers=d.workers, prefetch=d.prefetch,
                load=decoded_cache(config, data, decoded, budget),
                process_index=jax.process_index(), process_count=jax.process_count())
  train_tf, val_tf = transforms.train, transforms.val
  if uint8:
    train_tf = functools.partial(_uint8_transform, transforms.train)
    val_tf = functools.partial(_uint8_transform, transforms.val)
  train = Loader(data.train.samples, train_tf, d.batch_size, shuffle=True, cache_rows='train' in row_bytes,
                 **common)
  val = Loader(data.val.samples, val_tf, d.eval_batch_size, shuffle=False, cache_rows='val' in row_bytes, **common)
  return train, val


def _row_nbytes(pipeline, uint8: bool) -> int:
  """Bytes of one of `pipeline`'s rows (float32, or uint8 for on-device normalisation); 0 when its
  output size depends on the image."""
  size_hw = pipeline.output_size
  return 0 if size_hw is None else size_hw[0] * size_hw[1] * 3 * (1 if uint8 else 4)


def spread_sample_loader(loader: Loader, count: int) -> Loader:
  """`count` samples evenly spaced through `loader`'s (class-sorted) samples, in its batch shape.

  The val folder lists classes one after the other, so its first batch may hold one class only;
  the tutorial's figure draws from a shuffled loader and shows a mix.
  """
  picks = np.unique(np.linspace(0, len(loader.samples) - 1, min(count, len(loader.samples))).astype(int))
  return Loader([loader.samples[i] for i in picks], loader.transform, loader.batch_size, shuffle=False,
                workers=0, load=loader.load)


@dataclasses.dataclass
class Pipeline:
  """Everything a run reads: the samples, the transforms, and one loader per phase.

  `normalization` is (mean, std) when batches come as uint8 and the steps normalise them on the
  device (data.uint8_batches), else None.
  """
  data: Data
  transforms: Transforms
  train: Loader
  val: Loader
  normalization: Optional[tuple]

  @property
  def uint8(self) -> bool:
    return self.normalization is not None


def make_pipeline(config: Config, preprocessing: Preprocessing, workdir: Optional[Path] = None,
                  log: Callable[[str], None] = print) -> Pipeline:
  """The recipe's data, transforms and loaders (uint8 batches where data.uint8_batches asks for them)."""
  data = load_data(config, workdir, log)
  transforms = make_transforms(config, preprocessing)
  # Transforms after Normalize (RandomErasing) need the float rows: uint8 batches cannot carry them.
  fits_uint8 = transforms.train.supports_uint8 and transforms.val.supports_uint8
  if config.data.uint8_batches is True and not fits_uint8:
    raise RunError('data.uint8_batches: true cannot carry a transform that runs after Normalize (RandomErasing); '
                   'set data.uint8_batches: false')
  uint8 = config.data.uint8_batches is True or (config.data.uint8_batches == 'auto' and fits_uint8 and
                                                jax.default_backend() != 'cpu')
  normalization = None
  if uint8:
    if (transforms.train.mean, transforms.train.std) != (transforms.val.mean, transforms.val.std):
      raise RunError('data.uint8_batches needs the same Normalize mean/std in train and val transforms; '
                     'set data.uint8_batches: false')
    normalization = (transforms.train.mean, transforms.train.std)
  train, val = make_loaders(config, data, transforms, uint8)
  return Pipeline(data, transforms, train, val, normalization)
