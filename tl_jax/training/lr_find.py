"""The LR range test (fastai's `lr_find`): a short run whose lr grows exponentially, to read a good lr off
the loss curve.

On a copy of the recipe's initial state (its pretrained weights and fresh head, its stage's trainable
stages, BatchNorm policy, optimizer, param groups, clipping and accumulation) it takes up to `steps`
optimizer steps with lr_i = start_lr * (end_lr / start_lr) ** (i / steps) (fastai's SchedExp; param
groups keep their ratio to the optimizer's lr), smooths the loss as fastai's AvgSmoothLoss
(an exponential moving average with bias correction, beta 0.98), stops once the smoothed loss
exceeds 4x its best (divergence), and suggests the lr of the steepest descent of the smoothed curve
(fastai's `steep`). Nothing of the run is touched: no run directory, no checkpoint; `lr_find.png` is
the only file written.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax import optim, parallel
from tl_jax.config import Config
from tl_jax.models import create_model
from tl_jax.training.pipeline import make_pipeline
from tl_jax.training.stages import initial_variables, is_multi_label, recipe_loss, setup_stage
from tl_jax.weights import resolve_weights

_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}   # as the run loop's


class LRFindError(ValueError):
  """A bad LR-finder argument (a range that does not grow, no steps, an unknown stage)."""


@dataclasses.dataclass
class LRFindResult:
  lrs: list[float]            # the optimizer's lr at each step taken
  losses: list[float]         # each step's mean train loss
  smoothed: list[float]       # fastai's smoothed loss
  suggested_lr: Optional[float]
  diverged: bool              # stopped early: the smoothed loss went past `diverge` x its best (or non-finite)
  stage: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def exponential_lrs(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
  """lr_i = start * (end / start) ** (i / steps), i < steps: fastai's SchedExp at pos = i / steps."""
  check_range(start_lr, end_lr, steps)
  return start_lr * (end_lr / start_lr) ** (np.arange(steps) / steps)


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
  if not (isinstance(steps, int) and steps >= 2):
    raise LRFindError(f'--steps must be an integer >= 2, got {steps!r}')
  if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
    raise LRFindError(f'the lr range must grow from a start > 0: --start-lr {start_lr:g} --end-lr {end_lr:g}')


def smooth(losses: Sequence[float], beta: float = 0.98) -> list[float]:
  """fastai's AvgSmoothLoss: val = beta * val + (1 - beta) * loss from 0, divided by 1 - beta ** count."""
  val, out = 0.0, []
  for count, loss in enumerate(losses, 1):
    val = beta * val + (1 - beta) * loss
    out.append(val / (1 - beta ** count))
  return out


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> Optional[float]:
  """The lr where the smoothed loss falls fastest against log(lr) (fastai's `steep`), leaving out the
  first tenth and the last 5 points as fastai's lr_find does (where fewer would be left: none left out).
  None when fewer than 2 finite points remain."""
  lrs, losses = np.asarray(lrs, float), np.asarray(smoothed, float)
  keep = slice(len(lrs) // 10, len(lrs) - 5)
  if len(lrs[keep]) >= 3:
    lrs, losses = lrs[keep], losses[keep]
  finite = np.isfinite(losses)
  lrs, losses = lrs[finite], losses[finite]
  if len(lrs) < 2:
    return None
  slopes = np.diff(losses) / np.diff(np.log(lrs))
  return float(lrs[int(np.argmin(slopes))])


def sweep_schedules(start_lr: float, end_lr: float, steps: int, base_lr: float) -> Callable[[float], Callable]:
  """A param group's lr -> its lr per optimizer step in the sweep: the sweep times lr / base_lr."""
  if not base_lr > 0:
    raise LRFindError('the optimizer\'s lr is 0: the sweep scales each param group by its lr / that lr')
  growth = math.log(end_lr / start_lr) / steps

  def schedule_of(lr):
    scale = start_lr * lr / base_lr
    return lambda step: scale * jnp.exp(growth * jnp.asarray(step, dtype=float))

  return schedule_of


def record_until_divergence(step_losses: Callable[[], Optional[float]], lrs: Sequence[float], beta: float = 0.98,
                            diverge: float = 4.0) -> tuple[list[float], list[float], bool]:
  """Calls `step_losses()` (one optimizer step, its loss; None: no more data) once per lr; stops after
  the step whose smoothed loss exceeds `diverge` x the best so far, or is not finite (fastai's stop_div).
  Returns (losses, smoothed, diverged)."""
  losses, smoothed, best = [], [], math.inf
  for _ in lrs:
    loss = step_losses()
    if loss is None:
      break
    losses.append(loss)
    smoothed = smooth(losses, beta)
    current = smoothed[-1]
    best = min(best, current)
    if not math.isfinite(current) or current > diverge * best:
      return losses, smoothed, True
  return losses, smoothed, False


def save_plot(result: LRFindResult, path: Path) -> None:
  """lr_find.png: the smoothed loss (and the raw one, faint) against the lr on a log axis, the suggestion marked."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  n = len(result.losses)
  ax.plot(result.lrs[:n], result.losses, color='0.75', linewidth=0.8, label='loss')
  ax.plot(result.lrs[:n], result.smoothed, color='C0', label='smoothed loss')
  if result.suggested_lr is not None:
    ax.axvline(result.suggested_lr, color='C3', linestyle='--', label=f'suggested lr {result.suggested_lr:.2e}')
  ax.set_xscale('log')
  ax.set_xlabel('learning rate')
  ax.set_ylabel('train loss')
  finite = [v for v in result.smoothed if math.isfinite(v)]
  if finite:   # a diverged tail would squash the curve: show up to 4x the best
    ax.set_ylim(min(finite + [v for v in result.losses if math.isfinite(v)]) * 0.95, min(finite) * 4)
  ax.set_title(f'LR range test, stage {result.stage}' + (' (stopped: diverged)' if result.diverged else ''))
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)


def stage_index(config: Config, stage: str | int) -> int:
  """A stage given by name or index -> its index."""
  names = [s.name for s in config.stages]
  if isinstance(stage, int) or (isinstance(stage, str) and stage.isdigit()):
    index = int(stage)
    if not 0 <= index < len(names):
      raise LRFindError(f'--stage {stage}: the recipe has stages 0..{len(names) - 1} ({", ".join(names)})')
    return index
  if stage not in names:
    raise LRFindError(f'--stage {stage!r}: the recipe has no such stage; its stages are {", ".join(names)}')
  return names.index(stage)


def lr_find(config: Config, out_dir: str | Path, *, stage: str | int = 0, start_lr: float = 1e-7,
            end_lr: float = 10.0, steps: int = 100, beta: float = 0.98, diverge: float = 4.0,
            devices: Optional[int] = None, progress: bool = False,
            log: Callable[[str], None] = print) -> LRFindResult:
  """Runs the LR range test on `config`'s stage `stage` and writes `out_dir`/lr_find.png.

  Args:
    config: the recipe; its stage gives what learns and the optimizer (its lr is the reference for
      param groups' ratios; its schedule is replaced by the sweep).
    out_dir: where lr_find.png goes (a run's workdir: nothing else in it is read or written).
    stage: the stage's name or index.
    start_lr, end_lr, steps: the sweep (fastai's defaults: 1e-7, 10, 100 optimizer steps).
    beta: the loss smoothing; diverge: stop once the smoothed loss is this many times its best.
    devices: use the first N local devices.
  """
  check_range(start_lr, end_lr, steps)
  index = stage_index(config, stage)
  stage_config = config.stages[index]
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.data.batch_size, mesh.size, '--batch-size')
  weights = resolve_weights(config.model.weights, config.model.arch, progress=progress)
  # No workdir: a folder's split is seeded, so it is the run's without reading or writing the run's files.
  pipeline = make_pipeline(config, weights.preprocessing, None, log)
  num_classes = len(pipeline.data.classes)
  crop_size = weights.preprocessing.crop_size
  model = create_model(config.model.arch, num_classes, dtype=_DTYPES[config.model.dtype], image_size=crop_size,
                       winograd=None if config.model.winograd else False)
  variables = initial_variables(config.model.arch, num_classes, config.seed, weights.state_dict, crop_size)
  loss, mixing = recipe_loss(config, [label for _, label in pipeline.data.train.samples], num_classes,
                             is_multi_label(config, pipeline.data))
  examples = (next(iter(pipeline.train.epoch(0))).as_dict(), next(iter(pipeline.val.epoch(0))).as_dict())
  accumulate = stage_config.accumulate
  base_lr = optim.torch_kwargs(stage_config.optimizer.model_dump())['lr']
  # Every optimizer step takes `accumulate` batches: an "epoch" as long as the sweep has no short last step.
  state, sweep_stage = setup_stage(config, index, model, variables, accumulate * steps, *examples, compiled={},
                                mesh=mesh, normalization=pipeline.normalization, loss=loss, mixing=mixing,
                                schedule_of=sweep_schedules(start_lr, end_lr, steps, base_lr))
  put = lambda batch: parallel.shard_batch(batch, mesh)

  def batches():
    epoch = 0
    while True:
      yielded = False
      for batch in pipeline.train.epoch(epoch):
        yielded = True
        yield batch
      if not yielded:
        return
      epoch += 1

  source = batches()
  holder = {'state': state}

  def one_step() -> Optional[float]:
    total, count = 0.0, 0.0
    for _ in range(accumulate):
      batch = next(source, None)
      if batch is None:
        return None
      holder['state'], sums = sweep_stage.train_fn(holder['state'], put(batch.as_dict()))
      sums = jax.device_get(sums)
      total += float(sums['loss_sum']) / max(float(sums['count']), 1.0)
      count += 1
    return total / count

  lrs = [float(v) for v in exponential_lrs(start_lr, end_lr, steps)]
  log(f'lr_find: stage {stage_config.name}, {steps} steps from {start_lr:g} to {end_lr:g}'
      + (f' ({accumulate} batches each)' if accumulate > 1 else ''))
  losses, smoothed, diverged = record_until_divergence(one_step, lrs, beta, diverge)
  result = LRFindResult(lrs[:len(losses)], losses, smoothed, suggest(lrs[:len(losses)], smoothed), diverged,
                        stage_config.name)
  path = Path(out_dir) / 'lr_find.png'
  save_plot(result, path)
  stopped = f'stopped after {len(losses)} steps: the smoothed loss diverged' if diverged else f'{len(losses)} steps'
  suggestion = f'{result.suggested_lr:.3g}' if result.suggested_lr is not None else 'none (too few steps)'
  log(f'lr_find: {stopped}; suggested lr {suggestion} (steepest descent of the smoothed loss); wrote {path}')
  return result
