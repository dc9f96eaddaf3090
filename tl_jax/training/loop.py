"""The run loop: set up, resume, then for each stage set it up and run its epochs, then finish.

Per epoch a train phase and a val phase, as the tutorial; the best val accuracy (strict >) over
the whole run is kept in `best/`, the latest finished epoch in `checkpoints/` for --resume.
`Callback`s are called at the start and end of the run, of each stage, epoch and step.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tl_jax import checkpoint, feature_cache, models, parallel
from tl_jax.config import Config, recipe_warnings
from tl_jax.data.loader import Loader
from tl_jax.models import create_model
from tl_jax.rundir import RunDir
from tl_jax.training.features import cached_loaders, feature_plan
from tl_jax.training.finish import TrainResult, final_outputs
from tl_jax.training.pipeline import Pipeline, make_pipeline
from tl_jax.training.stages import Stage, initial_variables, setup_stage
from tl_jax.training.state import TrainState, model_variables, state_tree
from tl_jax.weights import resolve_weights

_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}   # None: the inputs' dtype (float32)


class Callback:
  """Extension points of a run; override what you need. Each receives the `Run` (config, run
  directory, model, pipeline, history and best so far). Called on every process; `run.main` says
  whether this one logs and writes the run's files. `on_step_end` gets the step's device sums
  (fetching them makes the host wait for the step)."""

  def on_run_start(self, run: 'Run') -> None: ...
  def on_stage_start(self, run: 'Run', stage: Stage, state: TrainState) -> None: ...
  def on_epoch_start(self, run: 'Run', epoch: int) -> None: ...
  def on_step_start(self, run: 'Run', phase: str, step: int) -> None: ...
  def on_step_end(self, run: 'Run', phase: str, step: int, sums: dict) -> None: ...
  def on_epoch_end(self, run: 'Run', epoch: int, state: TrainState, row: dict) -> None: ...
  def on_stage_end(self, run: 'Run', stage: Stage, state: TrainState) -> None: ...
  def on_run_end(self, run: 'Run', result: TrainResult) -> None: ...


class _Callbacks(Callback):
  """Several callbacks called in order, as one."""

  def __init__(self, callbacks: Sequence[Callback]):
    self.callbacks = list(callbacks)

  def __getattribute__(self, name):
    if name.startswith('on_'):
      return lambda *args: [getattr(c, name)(*args) for c in object.__getattribute__(self, 'callbacks')]
    return object.__getattribute__(self, name)


@dataclasses.dataclass
class Run:
  """One training run in progress: what every stage and epoch reads and what they leave behind."""
  config: Config
  dir: RunDir
  mesh: Mesh
  pipeline: Pipeline
  model: Any
  metadata: dict                    # of the best/ model checkpoints
  examples: tuple[dict, dict]       # a train and a val batch: the shapes steps compile for
  log: Callable[[str], None]
  progress: bool
  main: bool                        # process 0: logs, writes history and figures
  history: list[dict] = dataclasses.field(default_factory=list)
  best_val_acc: float = -1.0
  best_epoch: int = -1
  compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  compiled: dict = dataclasses.field(default_factory=dict)   # steps shared between stages

  @property
  def class_names(self) -> list[str]:
    return self.pipeline.data.classes


def run_phase(step_fn, state, loader: Loader, epoch: int, train: bool, progress: bool,
              desc: str, put: Callable[[dict], Any] = lambda batch: batch,
              callbacks: Optional[Callback] = None, run: Optional[Run] = None) -> tuple[Any, dict, float]:
  """Runs one phase; returns (state, host-summed metrics, seconds the device starved for data).

  Steps are dispatched asynchronously, so the host fetches batch n+1 while step n runs and the
  device never idles between well-fed steps. Starvation is the part of a wait for data during
  which no step was running: a wait counts when the step in flight had finished by the time
  the batch arrived (an upper bound: it may have finished partway through), and not at all
  when that step was still running. `put` places a host batch on the devices (split over the mesh).
  `callbacks` hear of each step's start and end (phase `desc`), with `run` passed on.
  """
  from tqdm.auto import tqdm
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  device_sums = []
  starved = 0.0
  in_flight = None
  multi_process = jax.process_count() > 1
  batches = iter(loader.epoch(epoch))
  with tqdm(total=len(loader), desc=desc, leave=False, disable=not progress) as bar:
    while True:
      start = time.perf_counter()
      batch = next(batches, None)
      if in_flight is None or in_flight.is_ready():
        starved += time.perf_counter() - start
      if batch is None:
        break
      if callbacks is not None:
        callbacks.on_step_start(run, desc, len(device_sums))
      if train:
        state, sums = step_fn(state, put(batch.as_dict()))
      else:
        sums = step_fn(state, put(batch.as_dict()))
      if callbacks is not None:
        callbacks.on_step_end(run, desc, len(device_sums), sums)
      in_flight = sums['count']
      if multi_process:
        # Across processes (gloo on CPU), steps in flight at once may enter their collectives in
        # different orders in different processes and wait on each other for ever: one at a time.
        in_flight.block_until_ready()
      device_sums.append({k: sums[k] for k in totals})
      bar.update()
  # One transfer at the end: per-step float() calls would block the host on every step. The sums
  # are replicated (global over devices and processes), so the local copy is the whole value.
  for sums in device_sums:
    for k in totals:
      totals[k] += float(np.asarray(sums[k].addressable_data(0) if isinstance(sums[k], jax.Array) else sums[k]))
  return state, totals, starved


def run_epoch(stage: Stage, state: TrainState, train_loader: Loader, val_loader: Loader, epoch: int,
              progress: bool = False, feature_seconds: float = 0.0, callbacks: Optional[Callback] = None,
              run: Optional[Run] = None) -> tuple[TrainState, dict]:
  """A train phase and a val phase of global `epoch`; returns the new state and the history row.

  The loaders may give cached features instead of images (tl_jax.feature_cache.FeatureLoader);
  `feature_seconds`, the time spent computing them before this epoch, goes into the row.
  """
  put = functools.partial(parallel.shard_batch, mesh=stage.mesh)
  t0 = time.perf_counter()
  state, train_sums, train_wait = run_phase(stage.train_fn, state, train_loader, epoch, True, progress, 'train',
                                            put, callbacks, run)
  t1 = time.perf_counter()
  _, val_sums, _ = run_phase(stage.eval_fn, state, val_loader, epoch, False, progress, 'val', put, callbacks, run)
  t2 = time.perf_counter()
  return state, {
      'epoch': epoch, 'stage': stage.name, 'stage_epoch': epoch - stage.first_epoch,
      'lr': stage.lrs[epoch - stage.first_epoch],
      'train_loss': train_sums['loss_sum'] / train_sums['count'],
      'train_acc': train_sums['correct'] / train_sums['count'],
      'val_loss': val_sums['loss_sum'] / val_sums['count'],
      'val_acc': val_sums['correct'] / val_sums['count'],
      'train_seconds': t1 - t0, 'val_seconds': t2 - t1, 'seconds': t2 - t0,
      'data_wait_seconds': train_wait, 'train_steps': len(train_loader), 'feature_seconds': feature_seconds,
  }


def setup_run(config: Config, workdir: str | Path, resume: bool, progress: bool, devices: Optional[int],
              log: Callable[[str], None]) -> tuple[Run, dict]:
  """The run directory, devices, data pipeline, model and initial variables (a pretrained backbone
  and a fresh head); every check that can fail runs before anything slow."""
  main = parallel.is_main_process()
  if not main:
    log, progress = (lambda _: None), False
  run_dir = RunDir(workdir, resume, log)
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.data.batch_size, mesh.size, '--batch-size')
  parallel.check_batch_size(config.data.eval_batch_size, mesh.size, '--eval-batch-size')
  for warning in recipe_warnings(config):
    log(f'warning: {warning}')
  weights = resolve_weights(config.model.weights, config.model.arch, progress=progress)
  pipeline = make_pipeline(config, weights.preprocessing, run_dir.path, log)
  num_classes = len(pipeline.data.classes)
  model = create_model(config.model.arch, num_classes, dtype=_DTYPES[config.model.dtype])
  variables = initial_variables(config.model.arch, num_classes, config.seed, weights.state_dict)
  metadata = checkpoint.make_metadata(
      config.model.arch, num_classes, weights.preprocessing.to_dict(), pipeline.data.classes,
      source=weights.source, data=pipeline.data.describe(), stages=[s.name for s in config.stages],
      val_transforms=pipeline.transforms.val.to_spec(), config=config.to_dict())
  log(f'devices: {parallel.describe(mesh)}; batches of {config.data.batch_size} '
      f'({"uint8, normalised on the device" if pipeline.uint8 else "float32"}); compute {config.model.dtype}')
  examples = (next(iter(pipeline.train.epoch(0))).as_dict(), next(iter(pipeline.val.epoch(0))).as_dict())
  run = Run(config, run_dir, mesh, pipeline, model, metadata, examples, log, progress, main)
  return run, variables   # initial_variables gives {'params', 'batch_stats'} ({} without BatchNorm)


def resume_point(run: Run, variables: dict) -> tuple[dict, int, Any, int]:
  """(variables, first epoch to run, optimizer state and step within its stage or None, 0) of a
  resumed run; a new run starts at epoch 0 with `variables`."""
  if not run.dir.resuming:
    return variables, 0, None, 0
  config = run.config
  meta = run.dir.restore_meta()
  run.dir.check_recipe(meta['config'], config.to_dict())
  last = run.dir.latest_epoch()
  saved_index, _ = config.stage_at(last)
  # The saved optimizer state has the structure of its own stage's optimizer.
  template, _ = setup_stage(config, saved_index, run.model, variables, len(run.pipeline.train),
                            *run.examples, mesh=run.mesh, compile_steps=False)
  restored = run.dir.restore_state(state_tree(template))
  run.history = meta['history']
  run.best_val_acc, run.best_epoch = meta['best_val_acc'], meta['best_epoch']
  start_epoch = last + 1
  opt_state, step = None, 0
  if start_epoch < config.epochs and config.stage_at(start_epoch)[0] == saved_index:
    opt_state, step = restored['opt_state'], restored['step']
  run.log(f'resuming {run.dir.path} after epoch {last}')
  return {'params': restored['params'], 'batch_stats': restored['batch_stats']}, start_epoch, opt_state, step


def start_stage(run: Run, index: int, variables: dict, opt_state: Any = None, step: int = 0
                ) -> tuple[TrainState, Stage, tuple, float]:
  """Stage `index` set up over `variables`: (state, stage, its (train, val) loaders, seconds spent
  caching backbone features)."""
  config, pipeline = run.config, run.pipeline
  plan = feature_plan(config, index, pipeline.transforms.train.deterministic)
  example_train, example_val = run.examples
  # Feature width of the arch (VGG's adaptive pool makes it independent of the image size).
  num_features = models.num_features(config.model.arch)
  state, stage = setup_stage(
      config, index, run.model, variables, len(pipeline.train),
      feature_cache.example_batch(example_train, num_features) if plan.train else example_train,
      feature_cache.example_batch(example_val, num_features) if plan.val else example_val,
      run.compiled, opt_state, step, run.mesh, pipeline.normalization)
  for name, seconds in stage.compile_seconds.items():
    run.compile_seconds[name] = run.compile_seconds.get(name, 0.0) + seconds
  if any(stage.compile_seconds.values()):
    run.log(f'stage {stage.name}: compiled train_step in {stage.compile_seconds["train_step"]:.1f}s, '
            f'eval_step in {stage.compile_seconds["eval_step"]:.1f}s ({jax.devices()[0].platform})')
  start = time.perf_counter()
  loaders = cached_loaders(plan, run.model, state, stage, pipeline.train, pipeline.val, run.compiled,
                           pipeline.normalization)
  feature_seconds = time.perf_counter() - start if plan.any else 0.0
  if not plan.backbone_learns:
    run.log(f'stage {stage.name}: {plan.describe()}' + (f' ({feature_seconds:.1f}s)' if plan.any else ''))
  return state, stage, loaders, feature_seconds


def save_train_batch(run: Run) -> None:
  """train_batch.png: the first train batch as the model sees it, de-normalised."""
  from tl_jax import plots as plot_lib
  transforms = run.pipeline.transforms
  example_train, _ = run.examples
  images = example_train['images']
  images = transforms.train.finish_uint8(images) if run.pipeline.uint8 else images
  plot_lib.save_train_batch(images, example_train['labels'], run.class_names,
                            transforms.train.mean, transforms.train.std, run.dir.path / 'train_batch.png')


def end_epoch(run: Run, stage: Stage, state: TrainState, row: dict) -> None:
  """Logs the epoch, keeps the best model (strict >), checkpoints the run and writes history.json."""
  config, epoch = run.config, row['epoch']
  run.history.append(row)
  run.log(f"train Loss: {row['train_loss']:.4f} Acc: {row['train_acc']:.4f}")
  run.log(f"val Loss: {row['val_loss']:.4f} Acc: {row['val_acc']:.4f}")
  if row['val_acc'] > run.best_val_acc:
    run.best_val_acc, run.best_epoch = row['val_acc'], epoch
    run.dir.save_best(epoch, model_variables(state),
                      {**run.metadata, 'epoch': epoch, 'stage': stage.name, 'val_acc': row['val_acc']})
  run.dir.save_epoch(epoch, state_tree(state), {'config': config.to_dict(), 'history': run.history,
                                                'best_val_acc': run.best_val_acc, 'best_epoch': run.best_epoch})
  if run.main:
    data = run.pipeline.data
    run.dir.write_history({'config': config.to_dict(), 'class_names': data.classes, 'data': data.describe(),
                           'devices': parallel.describe(run.mesh), 'compile_seconds': run.compile_seconds,
                           'skipped_images': data.skipped, 'best_val_acc': run.best_val_acc,
                           'best_epoch': run.best_epoch, 'epochs': run.history})
  run.log('')


def finish(run: Run, state: Optional[TrainState], elapsed: float, plots: bool, report: bool) -> TrainResult:
  """Loads the best weights back, as the tutorial's model.load_state_dict(best_model_wts); figures
  and the evaluation of the best checkpoint."""
  run.log(f'Training complete in {elapsed // 60:.0f}m {elapsed % 60:.0f}s')
  run.log(f'Best val Acc: {run.best_val_acc:4f}')
  best = run.dir.load_best()
  best_variables = {'params': best.variables['params'], 'batch_stats': best.variables.get('batch_stats', {})}
  if state is not None:
    state = state.replace(**parallel.replicate(best_variables, run.mesh))
  if run.main and (plots or report):
    final_outputs(run.model, best_variables, run.pipeline, run.config, run.dir, run.history, run.best_epoch,
                  plots, report, run.log)
  # The others wait for process 0's figures and evaluation, so that no process reaches JAX's
  # shutdown barrier long before the rest.
  parallel.wait_for_all('tl_jax: run finished')
  run.dir.close()
  return TrainResult(run.history, run.best_val_acc, run.best_epoch, run.compile_seconds, state, run.class_names,
                     run.dir.path)


def train_and_evaluate(config: Config, workdir: str | Path, *, resume: bool = False,
                       progress: bool = True, plots: bool = True, report: bool = True,
                       devices: Optional[int] = None, log: Callable[[str], None] = print,
                       callbacks: Sequence[Callback] = ()) -> TrainResult:
  """Trains `config`'s stages one after the other; writes checkpoints, history.json and plots to `workdir`.

  Each stage starts a fresh optimizer (and schedule) over the weights and BatchNorm statistics the
  previous stage left; the best val accuracy (strict >) over the whole run is kept in `best/`.
  Batches are split over every local device (and every process of a multi-process run, see
  tl_jax.parallel); only process 0 logs and writes history, plots and the evaluation, every
  process writes its part of the checkpoints.

  Args:
    config: the recipe (see configs/*.yaml and tl_jax.config).
    workdir: run directory (tl_jax.rundir): `best/` holds the best-val model checkpoint,
      `checkpoints/` the latest finished epoch for --resume.
    resume: continue from the latest finished epoch in `workdir`, with its optimizer state.
    progress: show progress bars.
    plots: write train_batch.png, predictions.png and curves.png.
    report: evaluate the best checkpoint on the val data at the end (evaluation.json, confusion.png,
      as scripts/evaluate.py).
    devices: use the first N local devices (default: all).
    log: receives the printed lines.
    callbacks: `Callback`s called at the start and end of the run, of each stage, epoch and step.
  """
  run, variables = setup_run(config, workdir, resume, progress, devices, log)
  variables, start_epoch, opt_state, step = resume_point(run, variables)
  hooks = _Callbacks(callbacks)
  hooks.on_run_start(run)
  state = None
  run_start = time.perf_counter()
  first_stage = config.stage_at(start_epoch)[0] if start_epoch < config.epochs else len(config.stages)
  for index in range(first_stage, len(config.stages)):
    state, stage, (train_loader, val_loader), feature_seconds = start_stage(run, index, variables, opt_state, step)
    opt_state, step = None, 0
    if plots and run.main and start_epoch == 0 and index == 0:
      save_train_batch(run)
    hooks.on_stage_start(run, stage, state)
    for epoch in range(max(start_epoch, stage.first_epoch), stage.first_epoch + stage.epochs):
      run.log(f'Epoch {epoch}/{config.epochs - 1}' + (f' (stage {stage.name})' if len(config.stages) > 1 else '') +
          '\n' + '-' * 10)
      hooks.on_epoch_start(run, epoch)
      state, row = run_epoch(stage, state, train_loader, val_loader, epoch, run.progress, feature_seconds,
                             hooks, run)
      feature_seconds = 0.0
      end_epoch(run, stage, state, row)
      hooks.on_epoch_end(run, epoch, state, row)
    hooks.on_stage_end(run, stage, state)
    variables = model_variables(state)
  result = finish(run, state, time.perf_counter() - run_start, plots, report)
  hooks.on_run_end(run, result)
  return result
