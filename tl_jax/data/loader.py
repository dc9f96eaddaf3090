"""Fixed-shape, masked, prefetched batches decoded and augmented by worker threads.

- One batch shape per phase, so each jitted step compiles once: a last partial batch is
  padded with zero images whose `mask` is False. Training keeps every sample each epoch, as
  the tutorial's DataLoader does; the masked BatchNorm and the masked loss make a padded
  batch compute exactly what torch computes on the smaller batch.
- Reproducible: the shuffle of epoch e comes from (seed, e) and the augmentation of a sample
  from (seed, e, position), so the same seed gives identical batches whatever the thread
  timing, and a resumed run sees the batches it would have seen.
- Threads, not processes: PIL decodes and resizes with the GIL released, and so does the
  jitted step, so workers run while the step computes. Measured with benchmarks/bench_loader.py
  (2 shared cores, 244 images, three runs): threads beat torchvision's DataLoader at 1 and 2
  workers. grain's worker processes, with their start-up left out, were as fast as threads on
  the tutorial's list at 2 workers in two runs of three and up to 1.4x faster on a heavy
  list; but spawning them costs 3-18 s per start (an epoch here takes 2-5 s), so they pay only
  if kept alive across epochs, and they need a picklable transform and `load`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from tl_jax.data.augment import Pipeline
from tl_jax.data.folder import load_image

# image -> float32 HWC array; `rng` is None for deterministic (eval) transforms.
Transform = Callable[[Image.Image, Optional[np.random.Generator]], np.ndarray]


def pipeline_row(pipeline: Pipeline, img: Image.Image, rng: Optional[np.random.Generator]) -> np.ndarray:
  """`pipeline(img, rng)` bit for bit, with ToTensor and Normalize in place on one float32 array.

  The same float32 operations in the same order (x / 255, - mean, / std), but without three
  temporary arrays; that was a fifth of the tutorial list's time per image.
  """
  params = pipeline.sample(rng, img.width, img.height)
  try:
    row = pipeline.apply_uint8(img, params)
  except ValueError:  # not an 8-bit image after the ops: the general path
    return pipeline.apply(img, params)
  mean, std = np.asarray(pipeline.mean, np.float32), np.asarray(pipeline.std, np.float32)
  if {mean.size, std.size} - {1, row.shape[-1]} or np.any(std == 0):
    return pipeline.apply(img, params)  # whose error names the mismatch
  out = row.astype(np.float32)
  np.divide(out, np.float32(255), out=out)
  np.subtract(out, mean, out=out)
  np.divide(out, std, out=out)
  return out


@dataclasses.dataclass
class Batch:
  images: np.ndarray   # (B, H, W, 3) float32 (or uint8, normalised on the device)
  labels: np.ndarray   # (B,) int32, or (B, C) float32 0/1 rows for multi-label data
  mask: np.ndarray     # (B,) bool, False on padding rows
  indices: np.ndarray  # (B,) dataset index per row, -1 on padding

  def as_dict(self) -> dict[str, np.ndarray]:
    return {'images': self.images, 'labels': self.labels, 'mask': self.mask}


def padded_batch(rows, template: np.ndarray, labels, indices, size: int) -> Batch:
  """A Batch of `size` rows: `rows` (shaped like `template`) with their labels and dataset indices,
  then zero rows with mask False and index -1, so every batch of a phase has one shape."""
  valid = len(rows)
  images = np.zeros((size,) + template.shape, template.dtype)   # float32, or uint8 for the device to normalise
  if valid:   # a process's share of the last batch may be all padding
    images[:valid] = rows
  # A multi-label sample's label is a row of C 0/1 values (tl_jax.data.multilabel): (B, C) float32.
  row_shape = np.shape(labels[0]) if valid else ()
  padded_labels = np.zeros((size,) + row_shape, np.float32 if row_shape else np.int32)
  padded_labels[:valid] = labels
  padded_indices = np.full(size, -1, np.int64)
  padded_indices[:valid] = indices
  return Batch(images, padded_labels, np.arange(size) < valid, padded_indices)


class Loader:
  """Batches of `samples` (path, label) through `transform`.

  Args:
    samples: (path, label) pairs, e.g. `ImageFolder.samples`.
    transform: image, rng -> float32 HWC array of a fixed shape.
    batch_size: rows per batch, padding included.
    shuffle: a new permutation each epoch.
    seed: base of every random draw.
    workers: decode/augment threads (0: in the calling thread).
    prefetch: batches in flight ahead of the consumer.
    load: path -> PIL image (default: `load_image`, RGB).
    process_index, process_count: in a multi-process run each process loads only its rows of
      every global batch: rows p*B/P .. (p+1)*B/P-1 of global batch b, i.e. positions of the
      epoch's one seeded order. A sample keeps its position, so its augmentation is the same
      whatever the process count.
    cache_rows: keep each finished row after it is first made and return it again in later
      epochs, for a `transform` that draws nothing at random (the val phase's Resize and
      CenterCrop): its rows are the same every epoch, so the work is done once.
  """

  def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform, batch_size: int,
               shuffle: bool, seed: int = 0, workers: int = 2, prefetch: int = 4,
               load: Callable[[str], Image.Image] = load_image, process_index: int = 0, process_count: int = 1,
               cache_rows: bool = False):
    if not samples:
      raise ValueError('no samples to load')
    if batch_size % process_count or not 0 <= process_index < process_count:
      raise ValueError(f'batch size {batch_size} does not split over {process_count} processes '
                       f'(process {process_index})')
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = batch_size // process_count
    self._row_template: Optional[np.ndarray] = None
    self.samples = list(samples)
    self.transform = transform
    self.batch_size = batch_size
    self.shuffle = shuffle
    self.seed = seed
    self.workers = workers
    self.prefetch = prefetch
    self.load = load
    self.wait_seconds = 0.0  # time the consumer spent blocked on data, reset each epoch
    # Finished rows by dataset index (cache_rows); rows are copied into each batch, never handed out.
    self._rows: Optional[dict[int, np.ndarray]] = {} if cache_rows else None

  def __len__(self) -> int:
    return -(-len(self.samples) // self.batch_size)

  def order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(len(self.samples))
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

  @property
  def cached_row_bytes(self) -> int:
    """Bytes of the rows kept so far (cache_rows)."""
    return sum(row.nbytes for row in self._rows.values()) if self._rows else 0

  def _example(self, epoch: int, position: int, index: int) -> np.ndarray:
    if self._rows is not None and index in self._rows:
      return self._rows[index]
    path, _ = self.samples[index]
    rng = np.random.default_rng([self.seed, epoch, position]) if self.shuffle else None
    if isinstance(self.transform, Pipeline):
      row = pipeline_row(self.transform, self.load(path), rng)
    else:
      row = self.transform(self.load(path), rng)
    if self._rows is not None:
      row.setflags(write=False)
      self._rows[index] = row   # two threads making the same row store equal arrays
    return row

  def _template(self) -> np.ndarray:
    """A row's shape and dtype, for a batch with no valid row (a process's share of the last one)."""
    if self._row_template is None:
      self._row_template = np.zeros_like(self._example(0, 0, 0))
    return self._row_template

  def _assemble(self, rows: list[np.ndarray], indices: np.ndarray) -> Batch:
    if rows and self._row_template is None:
      self._row_template = np.zeros_like(rows[0])
    template = rows[0] if rows else self._template()
    return padded_batch(rows, template, [self.samples[i][1] for i in indices], indices, self.local_batch_size)

  def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
    """The batches of `epoch`, prepared `prefetch` batches ahead by the worker threads.

    `start`: the batches before it are left out, not loaded: a run resumed from a mid-epoch
    checkpoint continues with the batches the uninterrupted epoch would have given from there.
    """
    self.wait_seconds = 0.0
    order = self.order(epoch)
    # A chunk is the (position in the epoch, dataset index) pairs of this process's rows of one batch.
    first = self.process_index * self.local_batch_size
    positions = list(enumerate(order))
    chunks = [positions[s + first:s + first + self.local_batch_size]
              for s in range(start * self.batch_size, len(order), self.batch_size)]

    def assemble(chunk, rows):
      return self._assemble(rows, np.array([index for _, index in chunk], np.int64))

    if self.workers == 0:
      for chunk in chunks:
        start = time.perf_counter()
        batch = assemble(chunk, [self._example(epoch, p, int(i)) for p, i in chunk])
        self.wait_seconds += time.perf_counter() - start
        yield batch
      return

    with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix='tl_jax-data') as pool:
      pending: collections.deque = collections.deque()
      upcoming = iter(chunks)

      def submit_next():
        chunk = next(upcoming, None)
        if chunk is not None:
          pending.append((chunk, [pool.submit(self._example, epoch, p, int(i)) for p, i in chunk]))

      for _ in range(self.prefetch):
        submit_next()
      try:
        while pending:
          chunk, futures = pending.popleft()
          start = time.perf_counter()
          batch = assemble(chunk, [f.result() for f in futures])
          self.wait_seconds += time.perf_counter() - start
          submit_next()
          yield batch
      finally:
        # An abandoned epoch (error, interrupt) must not keep decoding in the background.
        for _, futures in pending:
          for f in futures:
            f.cancel()
