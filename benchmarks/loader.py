"""Throughput of the input pipeline alone (images/s): our Loader against torchvision's DataLoader and grain.

Every framework reads the same files through the same transforms and yields float32 batches:
  - 'tl_jax': `tl_jax.data.loader.Loader` (worker threads) with `augment.build_pipeline(spec)`;
  - 'torchvision': `DataLoader(ImageFolder(root, Compose(...)), batch_size, shuffle=True, num_workers=W)`
    with torchvision.transforms (v1) classes built from the same spec, as the tutorial builds it;
  - 'grain': a grain `MapDataset` of the Loader's own batches (`loader_batch`, so the same pixels)
    prefetched by W worker processes (`mp_prefetch`), started once for all epochs (`GrainEpochs`).
Each case runs its frameworks interleaved epoch by epoch, so a shared machine's load hits them
alike; the first epoch is warm-up and the rate is the median over the remaining epochs (grain
draws its own warm-up epoch in every round, see `_GrainRounds`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from tl_jax.data import augment, transforms
from tl_jax.data.folder import ImageFolder
from tl_jax.data.loader import Loader

IMAGENET_MEAN, IMAGENET_STD = list(transforms.IMAGENET_MEAN), list(transforms.IMAGENET_STD)

# The tutorial's training transforms.
TUTORIAL = [
    {'RandomResizedCrop': {'size': 224}}, {'RandomHorizontalFlip': {}}, {'ToTensor': {}},
    {'Normalize': {'mean': IMAGENET_MEAN, 'std': IMAGENET_STD}},
]
# A heavy augmentation list: every PIL op of it costs more than the tutorial's crop.
HEAVY = [
    {'Resize': {'size': [244, 244]}}, {'RandomCrop': {'size': 192}}, {'RandomHorizontalFlip': {}},
    {'RandomRotation': {'degrees': 0.2}},
    {'ColorJitter': {'brightness': 0.5, 'contrast': 0.5, 'saturation': 0.5, 'hue': 0.5}},
    {'RandomGrayscale': {'p': 0.5}}, {'ToTensor': {}}, {'Normalize': {'mean': [0.5] * 3, 'std': [0.5] * 3}},
]
LISTS = {'tutorial': TUTORIAL, 'heavy': HEAVY}
# The material's VGG recipe: its train augmentation list and its val list (configs/vgg16_classifier.yaml).
MATERIAL_TRAIN = [
    {'Resize': {'size': [244, 244]}}, {'RandomCrop': {'size': 192}}, {'RandomHorizontalFlip': {}},
    {'RandomRotation': {'degrees': 0.2}}, {'ColorJitter': {'brightness': 0.5}}, {'ColorJitter': {'contrast': 0.5}},
    {'ColorJitter': {'saturation': 0.5}}, {'ColorJitter': {'hue': 0.5}}, {'RandomGrayscale': {'p': 0.5}},
    {'ToTensor': {}}, {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}},
]
MATERIAL_VAL = [{'Resize': {'size': [96, 96]}}, {'ToTensor': {}},
                {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}}]
FRAMEWORKS = ('tl_jax', 'torchvision', 'grain')


@dataclasses.dataclass(frozen=True)
class Case:
  """One row of the table: a transform list read by some workers in batches."""
  transforms: str
  workers: int
  batch_size: int


@dataclasses.dataclass
class Result:
  case: Case
  framework: str
  epoch_seconds: list[float]   # the timed epochs
  warmup_seconds: list[float]  # the untimed ones (worker start-up, first reads)
  num_images: int

  @property
  def rates(self) -> list[float]:
    """Images per second of each timed epoch."""
    return [self.num_images / s for s in self.epoch_seconds]

  @property
  def median(self) -> float:
    return statistics.median(self.rates)


def torchvision_compose(spec: Sequence[dict]):
  """torchvision.transforms.Compose of the same spec (v1 classes, the same keyword arguments)."""
  from torchvision import transforms as tvt

  def build(name: str, kwargs: Optional[dict]):
    kwargs = dict(kwargs or {})
    if 'interpolation' in kwargs:
      kwargs['interpolation'] = tvt.InterpolationMode(kwargs['interpolation'])
    return getattr(tvt, name)(**kwargs)

  return tvt.Compose([build(*next(iter(entry.items()))) for entry in spec])


@functools.lru_cache(maxsize=4)
def _order(loader: Loader, epoch: int) -> np.ndarray:
  return loader.order(epoch)  # once per epoch, not once per batch


def loader_batch(loader: Loader, epoch: int, number: int) -> dict[str, np.ndarray]:
  """Batch `number` of `epoch` exactly as `loader.epoch(epoch)` yields it, built in this thread."""
  positions = range(number * loader.batch_size, min((number + 1) * loader.batch_size, len(loader.samples)))
  order = _order(loader, epoch)
  indices = np.array([order[p] for p in positions], np.int64)
  rows = [loader._example(epoch, p, int(i)) for p, i in zip(positions, indices)]
  batch = loader._assemble(rows, indices)
  return {'images': batch.images, 'labels': batch.labels, 'mask': batch.mask, 'indices': batch.indices}


def _epoch_batch(loader: Loader, first_epoch: int, step: int) -> dict[str, np.ndarray]:
  epoch, number = divmod(step, len(loader))
  return loader_batch(loader, first_epoch + epoch, number)


class GrainEpochs:
  """`loader`'s batches built by grain worker processes (the loader, its transform and `load` pickled).

  One grain pipeline over `epochs` epochs starting at `first_epoch`: the processes are spawned once,
  on the first batch, and stay for every epoch (grain's way; spawning them per epoch costs seconds).
  `epoch(e)` yields the batches of epoch e; epochs must be drawn in order, each completely.
  """

  def __init__(self, loader: Loader, workers: int, epochs: int, first_epoch: int = 0):
    import grain.python as grain
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app nobody parsed them
      flags.FLAGS.mark_as_parsed()
    self.loader, self.first_epoch, self.next_epoch = loader, first_epoch, first_epoch
    dataset = grain.MapDataset.range(epochs * len(loader)).map(functools.partial(_epoch_batch, loader, first_epoch))
    if workers > 0:
      # One batch at a time per process, two ahead, as torch's DataLoader (prefetch_factor=2); grain's
      # default reads 16 elements at once with threads inside every process.
      read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
      options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
      dataset = dataset.to_iter_dataset(read).mp_prefetch(options)
    self._iterator = iter(dataset)

  def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    if epoch != self.next_epoch:
      raise ValueError(f'grain epochs run in order: expected epoch {self.next_epoch}, got {epoch}')
    self.next_epoch += 1
    for _ in range(len(self.loader)):
      yield next(self._iterator)

  def close(self) -> None:
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()


def _epochs(framework: str, root: Path, spec: Sequence[dict], workers: int, batch_size: int, seed: int):
  """An object whose `epoch(e)` iterates over the batches of epoch e, for `framework`."""
  if framework == 'torchvision':
    import torch
    from torchvision import datasets
    dataset = datasets.ImageFolder(os.fspath(root), torchvision_compose(spec))
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=generator)
    return types.SimpleNamespace(epoch=lambda epoch: loader)
  loader = Loader(ImageFolder(root).samples, augment.build_pipeline(spec), batch_size, shuffle=True, seed=seed,
                  workers=workers)
  if framework == 'tl_jax':
    return loader
  if framework == 'grain':
    return _GrainRounds(loader, workers)
  raise ValueError(f'unknown framework {framework!r}; allowed: {", ".join(FRAMEWORKS)}')


class _GrainRounds:
  """Grain for `run`: its worker processes keep building batches between calls, so they would fill
  their buffers while the other frameworks are timed. Each round therefore starts a fresh pipeline,
  draws one untimed epoch (start-up) and then times the next one, back to back."""

  def __init__(self, loader: Loader, workers: int):
    self.loader, self.workers = loader, workers

  def timed_epoch(self, epoch: int) -> tuple[float, float]:
    """(warm-up seconds of epoch - 1, seconds of epoch)."""
    pipeline = GrainEpochs(self.loader, self.workers, epochs=2, first_epoch=epoch - 1)
    try:
      warmup = time_epoch(pipeline.epoch(epoch - 1))
      return warmup, time_epoch(pipeline.epoch(epoch))
    finally:
      pipeline.close()


def time_epoch(batches: Iterable) -> float:
  """Seconds to draw every batch of one epoch (worker start-up included, as a training loop sees it)."""
  start = time.perf_counter()
  for _ in batches:
    pass
  return time.perf_counter() - start


def run(root: Path, cases: Sequence[Case], frameworks: Sequence[str] = FRAMEWORKS, epochs: int = 4,
        seed: int = 0, log: Callable[[str], None] = print) -> list[Result]:
  """Times `epochs` epochs (the first is warm-up) of each framework on each case, interleaved by epoch.

  Args:
    root: a folder of one sub-folder per class (e.g. hymenoptera_data/train).
    cases: transform list name (a key of LISTS) x workers x batch size.
    frameworks: a subset of FRAMEWORKS.
    epochs: epochs per framework and case, the first discarded; at least 2.
    seed: shuffle and augmentation seed.
    log: receives one line per finished case.
  """
  if epochs < 2:
    raise ValueError(f'epochs must be at least 2 (the first is warm-up), got {epochs}')
  unknown = [f for f in frameworks if f not in FRAMEWORKS]
  if unknown:
    raise ValueError(f'unknown framework(s) {unknown}; allowed: {", ".join(FRAMEWORKS)}')
  num_images = len(ImageFolder(root).samples)
  results = []
  for case in cases:
    spec = LISTS[case.transforms]
    sources = {f: _epochs(f, root, spec, case.workers, case.batch_size, seed) for f in frameworks}
    timed = {f: [] for f in frameworks}
    warmup = {f: [] for f in frameworks}
    for epoch in range(epochs):
      for framework, source in sources.items():
        if isinstance(source, _GrainRounds):
          if epoch > 0:  # its own warm-up epoch comes within each round
            start_seconds, seconds = source.timed_epoch(epoch)
            warmup[framework].append(start_seconds)
            timed[framework].append(seconds)
        else:
          seconds = time_epoch(source.epoch(epoch))
          (warmup if epoch == 0 else timed)[framework].append(seconds)
    for framework in frameworks:
      results.append(Result(case, framework, timed[framework], warmup[framework], num_images))
    log(format_table(results[-len(frameworks):], header=False))
  return results


def default_cases(worker_counts: Sequence[int], batch_size: int = 32,
                  tutorial_batch_size: int = 4) -> list[Case]:
  """Both lists at `batch_size` and the tutorial list at its own batch, for each worker count."""
  cases = []
  for workers in worker_counts:
    cases.append(Case('tutorial', workers, batch_size))
    if tutorial_batch_size and tutorial_batch_size != batch_size:
      cases.append(Case('tutorial', workers, tutorial_batch_size))
    cases.append(Case('heavy', workers, batch_size))
  return cases


def format_table(results: Sequence[Result], header: bool = True) -> str:
  """One line per case: each framework's median images/s (min-max), and the ratio to torchvision."""
  by_case: dict[Case, dict[str, Result]] = {}
  for r in results:
    by_case.setdefault(r.case, {})[r.framework] = r
  lines = []
  if header:
    lines.append('list      workers batch  framework     img/s (median; min-max of timed epochs)  / torchvision')
  for case, rows in by_case.items():
    reference = rows.get('torchvision')
    for framework, r in rows.items():
      ratio = f'{r.median / reference.median:5.2f}' if reference is not None else '    -'
      spread = f'{min(r.rates):6.1f}-{max(r.rates):6.1f}'
      lines.append(f'{case.transforms:<9} {case.workers:>7} {case.batch_size:>5}  {framework:<12} '
                   f'{r.median:7.1f} ({spread}, {len(r.rates)} epochs)       {ratio}')
  return '\n'.join(lines)


def to_json(results: Sequence[Result]) -> list[dict[str, Any]]:
  return [{**dataclasses.asdict(r.case), 'framework': r.framework, 'epoch_seconds': r.epoch_seconds,
           'warmup_seconds': r.warmup_seconds, 'num_images': r.num_images, 'images_per_second': r.median}
          for r in results]
