"""A TensorBoard log of a run, written with tensorboardX (no TensorFlow) under `<workdir>/tb/`.

`tensorboard --logdir <workdir>/tb` shows:
- per epoch (x: the run's epoch): `loss/train`, `loss/val`, `accuracy/train`, `accuracy/val`, `lr`;
- every `every` train steps (x: the run's train step, epoch * steps per epoch + step): `step/loss`,
  `step/accuracy` and `step/lr` of that step's batch (reading them makes the host wait for that step);
- `train_batch`: the first train batch as the model sees it (augmented, de-normalised), once;
- `confusion_matrix`: the best checkpoint's val confusion matrix (the run's confusion.png), at the end
  of a run that evaluates it (train_and_evaluate's `report`).

Only process 0 writes. A resumed run adds its own event file to the same folder; TensorBoard reads
them as one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tl_jax.training.loop import Callback, Run

TB_DIR = 'tb'


class TensorBoard(Callback):
  """Writes a run's scalars and images for TensorBoard (see the module docstring).

  Args:
    every: log the train step's loss, accuracy and lr every this many train steps (0: never).
    logdir: where (default: `<workdir>/tb`).
  """

  def __init__(self, every: int = 10, logdir: Optional[str | Path] = None):
    if every < 0:
      raise ValueError(f'every must be >= 0 (0: no per-step scalars), got {every}')
    self.every, self.logdir = every, logdir
    self.writer: Any = None
    self.epoch, self.lr, self.steps_per_epoch = 0, None, 1

  def on_run_start(self, run: Run) -> None:
    if not run.main:
      return
    from tensorboardX import SummaryWriter
    self.steps_per_epoch = len(run.pipeline.train)
    self.started = time.time()
    self.writer = SummaryWriter(logdir=str(self.logdir or run.dir.path / TB_DIR), flush_secs=30)
    if not run.history:   # a fresh run (a resumed one logged it already)
      self._train_batch(run)

  def _train_batch(self, run: Run) -> None:
    from tl_jax.plots import denormalize
    transforms = run.pipeline.transforms.train
    images = run.examples[0]['images']
    images = transforms.finish_uint8(images) if run.pipeline.uint8 else images
    shown = denormalize(np.asarray(images)[:16], transforms.mean, transforms.std)
    self.writer.add_images('train_batch', shown, global_step=0, dataformats='NHWC')

  def on_stage_start(self, run: Run, stage, state) -> None:
    self.stage = stage

  def on_epoch_start(self, run: Run, epoch: int) -> None:
    self.epoch = epoch
    stage = getattr(self, 'stage', None)
    self.lr = stage.lrs[epoch - stage.first_epoch] if stage is not None else None

  def on_step_end(self, run: Run, phase: str, step: int, sums: dict) -> None:
    if self.writer is None or phase != 'train' or not self.every:
      return
    global_step = self.epoch * self.steps_per_epoch + step
    if global_step % self.every:
      return
    count = float(np.asarray(sums['count']))
    if not count:   # a skipped non-finite step
      return
    self.writer.add_scalar('step/loss', float(np.asarray(sums['loss_sum'])) / count, global_step)
    if 'correct' in sums:
      self.writer.add_scalar('step/accuracy', float(np.asarray(sums['correct'])) / count, global_step)
    if self.lr is not None:
      self.writer.add_scalar('step/lr', self.lr, global_step)

  def on_epoch_end(self, run: Run, epoch: int, state, row: dict) -> None:
    if self.writer is None:
      return
    for tag, key in (('loss/train', 'train_loss'), ('loss/val', 'val_loss'), ('accuracy/train', 'train_acc'),
                     ('accuracy/val', 'val_acc'), ('lr', 'lr')):
      if key in row:
        self.writer.add_scalar(tag, float(row[key]), epoch)
    self.writer.flush()   # a run killed later keeps its epochs

  def on_run_end(self, run: Run, result) -> None:
    if self.writer is None:
      return
    confusion = run.dir.path / 'confusion.png'
    if confusion.is_file() and confusion.stat().st_mtime >= self.started:   # written by this run
      from PIL import Image
      with Image.open(confusion) as image:
        pixels = np.asarray(image.convert('RGB'))
      self.writer.add_image('confusion_matrix', pixels, global_step=max(result.best_epoch, 0), dataformats='HWC')
    self.writer.close()
    self.writer = None
