"""The run loop: set up, resume, then for each stage set it up and run its epochs, then finish.

Per epoch a train phase and a val phase, as the tutorial; the best val accuracy (strict >) over
the whole run is kept in `best/`, the newest run checkpoints in `checkpoints/` for --resume: one per
finished epoch, and mid-epoch ones on SIGTERM/SIGINT or `checkpoint_every` (tl_jax.training.faults).
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

from tl_jax import checkpoint, feature_cache, parallel
from tl_jax.config import Config, recipe_warnings
from tl_jax.data.loader import Loader
from tl_jax.models import create_model
from tl_jax.rundir import RunDir
from tl_jax.training import faults
from tl_jax.training.faults import PhaseProgress
from tl_jax.training.features import cached_loaders, feature_plan
from tl_jax.training.finish import TrainResult, final_outputs
from tl_jax.training.pipeline import Pipeline, make_pipeline
from tl_jax.training.stages import Stage, initial_variables, is_multi_label, recipe_loss, setup_stage
from tl_jax.training import early_stopping
from tl_jax.training.state import TrainState, eval_variables, model_variables, state_tree
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
  signals: faults.SignalWatcher     # SIGTERM / SIGINT: stop after the step in flight, saved
  saves: faults.SaveSchedule        # when checkpoint_every asks for a mid-epoch checkpoint
  history: list[dict] = dataclasses.field(default_factory=list)
  best_val_acc: float = -1.0
  best_epoch: int = -1
  compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  compiled: dict = dataclasses.field(default_factory=dict)   # steps shared between stages
  early_stopping: dict = dataclasses.field(default_factory=dict)   # stage name -> its record
  resumed_ema: Any = None           # the moving average of the weights restored for the stage resumed

  @property
  def class_names(self) -> list[str]:
    return self.pipeline.data.classes


def run_steps(step_fn, state, loader: Loader, epoch: int, train: bool, progress: bool, desc: str,
              put: Callable[[dict], Any] = lambda batch: batch, callbacks: Optional[Callback] = None,
              run: Optional[Run] = None, start: Optional[PhaseProgress] = None,
              guard: Optional[Callable[[Any, faults.StepSums], None]] = None) -> tuple[Any, PhaseProgress]:
  """Runs one phase; returns the state and how the phase went (`PhaseProgress`: host-summed metrics,
  seconds the device starved for data, steps skipped as non-finite).

  Steps are dispatched asynchronously, so the host fetches batch n+1 while step n runs and the
  device never idles between well-fed steps. Each step's sums are read once the step is done,
  without waiting for it (`faults.StepSums`), so a non-finite step stops the phase a step or two
  later (NonFiniteError) and the sums of an interrupted phase are at hand. Starvation is the part
  of a wait for data during which no step was running: a wait counts when the step in flight had
  finished by the time the batch arrived (an upper bound: it may have finished partway through),
  and not at all when that step was still running. `put` places a host batch on the devices
  (split over the mesh). `callbacks` hear of each step's start and end (phase `desc`), with `run`.

  Args:
    start: how far the phase got before a mid-epoch checkpoint: its batches are not loaded again
      and its sums carry over.
    guard: called after each step with the state and the sums so far; saves mid-epoch checkpoints
      and stops the run on a signal (`EpochGuard`).
  """
  from tqdm.auto import tqdm
  sums = faults.StepSums(dataclasses.replace(start, totals=dict(start.totals)) if start else PhaseProgress())
  done = sums.progress
  in_flight = None
  multi_process = jax.process_count() > 1
  batches = iter(loader.epoch(epoch, start=done.steps) if done.steps else loader.epoch(epoch))
  with tqdm(total=len(loader), initial=done.steps, desc=desc, leave=False, disable=not progress) as bar:
    while True:
      wait_start = time.perf_counter()
      batch = next(batches, None)
      if in_flight is None or in_flight.is_ready():
        done.starved += time.perf_counter() - wait_start
      if batch is None:
        break
      index = sums.dispatched
      if callbacks is not None:
        callbacks.on_step_start(run, desc, index)
      if train:
        state, step_sums = step_fn(state, put(batch.as_dict()))
      else:
        step_sums = step_fn(state, put(batch.as_dict()))
      if callbacks is not None:
        callbacks.on_step_end(run, desc, index, step_sums)
      in_flight = step_sums['count']
      if multi_process:
        # Across processes (gloo on CPU), steps in flight at once may enter their collectives in
        # different orders in different processes and wait on each other for ever: one at a time.
        in_flight.block_until_ready()
      sums.add(step_sums)
      bar.update()
      if guard is not None:
        guard(state, sums)
  return state, sums.read_all()


def run_phase(step_fn, state, loader: Loader, epoch: int, train: bool, progress: bool, desc: str,
              put: Callable[[dict], Any] = lambda batch: batch, callbacks: Optional[Callback] = None,
              run: Optional[Run] = None) -> tuple[Any, dict, float]:
  """`run_steps` from the phase's start: (state, host-summed metrics, seconds the device starved for data)."""
  state, done = run_steps(step_fn, state, loader, epoch, train, progress, desc, put, callbacks, run)
  return state, done.totals, done.starved


def run_epoch(stage: Stage, state: TrainState, train_loader: Loader, val_loader: Loader, epoch: int,
              progress: bool = False, feature_seconds: float = 0.0, callbacks: Optional[Callback] = None,
              run: Optional[Run] = None, start: Optional[PhaseProgress] = None,
              guard: Optional['EpochGuard'] = None) -> tuple[TrainState, dict]:
  """A train phase and a val phase of global `epoch`; returns the new state and the history row.

  The loaders may give cached features instead of images (tl_jax.feature_cache.FeatureLoader);
  `feature_seconds`, the time spent computing them before this epoch, goes into the row. `start`:
  the train phase's progress saved by a mid-epoch checkpoint; `guard`: see `run_steps`.
  """
  put = functools.partial(parallel.shard_batch, mesh=stage.mesh)
  t0 = time.perf_counter()
  state, train = run_steps(stage.train_fn, state, train_loader, epoch, True, progress, 'train', put, callbacks,
                           run, start, guard.after_train_step if guard else None)
  train.seconds = (start.seconds if start else 0.0) + time.perf_counter() - t0
  if not train.totals['count']:
    raise faults.NonFiniteError('every train step non-finite (and skipped)')
  t1 = time.perf_counter()
  val_guard = functools.partial(guard.after_val_step, train) if guard else None
  scores = _ValScores() if run is not None and run.pipeline.data.multi_label else None
  val_hooks = _Callbacks([c for c in (callbacks, scores) if c is not None]) if scores else callbacks
  _, val = run_steps(stage.eval_fn, state, val_loader, epoch, False, progress, 'val', put, val_hooks, run,
                     guard=val_guard)
  val_seconds = time.perf_counter() - t1
  return state, {
      'epoch': epoch, 'stage': stage.name, 'stage_epoch': epoch - stage.first_epoch,
      'lr': stage.lrs[epoch - stage.first_epoch],
      'train_loss': train.totals['loss_sum'] / train.totals['count'],
      # A weighted loss's count is the rows' weight (tl_jax.losses); accuracy counts rows.
      'train_acc': train.totals['correct'] / train.totals.get('rows', train.totals['count']),
      'val_loss': val.totals['loss_sum'] / val.totals['count'],
      'val_acc': val.totals['correct'] / val.totals.get('rows', val.totals['count']),
      'train_seconds': train.seconds, 'val_seconds': val_seconds, 'seconds': train.seconds + val_seconds,
      'data_wait_seconds': train.starved, 'train_steps': len(train_loader), 'feature_seconds': feature_seconds,
      'skipped_steps': train.skipped,
      **({'val_mAP': scores.mean_average_precision()} if scores else {}),
  }


class _ValScores(Callback):
  """A multi-label val phase's outputs and targets, for its mAP (tl_jax.metrics): val_acc is then subset
  accuracy, too strict to rank epochs by."""

  def __init__(self):
    self.parts = []

  def on_step_end(self, run, phase, step, sums):
    if phase == 'val':
      self.parts.append((sums['outputs'], sums['targets'], sums['mask']))

  def mean_average_precision(self) -> float:
    from tl_jax import metrics
    outputs, targets, mask = (np.concatenate([parallel.gather_rows(p[i]) for p in self.parts]) for i in range(3))
    return metrics.mean_average_precision(targets[mask], outputs[mask])


class EpochGuard:
  """Within an epoch, after each step: a mid-epoch checkpoint when `checkpoint_every` asks for one, or
  after SIGTERM/SIGINT, and then the stop. Every process of the run takes the same decision at the
  same step (`faults.across_processes`), so all save the same step."""

  def __init__(self, run: Run, epoch: int, start: Optional[PhaseProgress]):
    self.run, self.epoch = run, epoch
    self.seconds_before = start.seconds if start else 0.0
    self.started = time.perf_counter()

  def after_train_step(self, state: TrainState, sums: faults.StepSums) -> None:
    run = self.run
    signum, due = faults.across_processes(run.signals.received, run.saves.due(self.epoch, sums.dispatched))
    if not (signum or due):
      return
    done = sums.read_all()   # waits for the step in flight; a non-finite one raises here, unsaved
    done.seconds = self.seconds_before + time.perf_counter() - self.started
    path = save_run_checkpoint(run, self.epoch, state, done)
    if signum:
      raise run.signals.stop(signum, f'stopped in epoch {self.epoch} after train step {done.steps} of '
                                     f'{len(run.pipeline.train)}; saved {path}; continue it with --resume')

  def after_val_step(self, train: PhaseProgress, state: TrainState, sums: faults.StepSums) -> None:
    run = self.run
    signum, = faults.across_processes(run.signals.received)
    if signum:
      path = save_run_checkpoint(run, self.epoch, state, train)   # val steps leave the state as it was
      raise run.signals.stop(signum, f'stopped in the val phase of epoch {self.epoch}; saved {path} (its train '
                                     'phase done); continue it with --resume')


def setup_run(config: Config, workdir: str | Path, resume: bool, progress: bool, devices: Optional[int],
              log: Callable[[str], None]) -> tuple[Run, dict]:
  """The run directory, devices, data pipeline, model and initial variables (a pretrained backbone
  and a fresh head); every check that can fail runs before anything slow."""
  main = parallel.is_main_process()
  if not main:
    log, progress = (lambda _: None), False
  run_dir = RunDir(workdir, resume, log, keep=config.keep_checkpoints)
  try:
    return _setup(config, run_dir, progress, devices, log, main)
  except BaseException:
    run_dir.close()   # and its lock: the directory is free again
    raise


def _setup(config: Config, run_dir: RunDir, progress: bool, devices: Optional[int], log: Callable[[str], None],
           main: bool) -> tuple[Run, dict]:
  """`setup_run`'s work once the run directory is held."""
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.data.batch_size, mesh.size, '--batch-size')
  parallel.check_batch_size(config.data.eval_batch_size, mesh.size, '--eval-batch-size')
  for warning in recipe_warnings(config):
    log(f'warning: {warning}')
  weights = resolve_weights(config.model.weights, config.model.arch, progress=progress)
  pipeline = make_pipeline(config, weights.preprocessing, run_dir.path, log)
  num_classes = len(pipeline.data.classes)
  crop_size = weights.preprocessing.crop_size   # ViT's position embedding is built for it
  # winograd None: the family's default (on where it has Winograd convolutions); False: off.
  model = create_model(config.model.arch, num_classes, dtype=_DTYPES[config.model.dtype], image_size=crop_size,
                       winograd=None if config.model.winograd else False)
  variables = initial_variables(config.model.arch, num_classes, config.seed, weights.state_dict, crop_size)
  metadata = checkpoint.make_metadata(
      config.model.arch, num_classes, weights.preprocessing.to_dict(), pipeline.data.classes,
      source=weights.source, data=pipeline.data.describe(), stages=[s.name for s in config.stages],
      val_transforms=pipeline.transforms.val.to_spec(), config=config.to_dict(),
      multi_label=pipeline.data.multi_label)   # a sigmoid head: evaluate/predict score it per class
  log(f'devices: {parallel.describe(mesh)}; batches of {config.data.batch_size} '
      f'({"uint8, normalised on the device" if pipeline.uint8 else "float32"}); compute {config.model.dtype}')
  examples = (next(iter(pipeline.train.epoch(0))).as_dict(), next(iter(pipeline.val.epoch(0))).as_dict())
  signals = faults.SignalWatcher(lambda: str(run_dir.latest_path() or 'nothing yet (no checkpoint)'))
  saves = faults.SaveSchedule(config.checkpoint_every, len(pipeline.train))
  run = Run(config, run_dir, mesh, pipeline, model, metadata, examples, log, progress, main, signals, saves)
  return run, variables   # initial_variables gives {'params', 'batch_stats'} ({} without BatchNorm)


def _saved_epoch(meta: dict) -> int:
  """The epoch a run checkpoint was saved in (finished, or in progress when it holds `partial`);
  checkpoints written before mid-epoch saves existed hold finished epochs only, one history row each."""
  return meta['epoch'] if 'epoch' in meta else len(meta['history']) - 1


def resume_point(run: Run, variables: dict) -> tuple[dict, int, Any, int, Optional[PhaseProgress]]:
  """(variables, first epoch to run, optimizer state and step within its stage or None, 0, the progress
  of that epoch's train phase saved mid-epoch or None) of a resumed run, from its newest run
  checkpoint that restores; a new run starts at epoch 0 with `variables`."""
  config = run.config

  def template_for(meta: dict) -> dict:
    run.dir.check_recipe(meta['config'], config.to_dict())
    # The saved optimizer state has the structure of its own stage's optimizer.
    template, _ = setup_stage(config, config.stage_at(_saved_epoch(meta))[0], run.model, variables,
                              len(run.pipeline.train), *run.examples, mesh=run.mesh, compile_steps=False)
    return state_tree(template)

  restored = run.dir.restore(template_for) if run.dir.resuming else None
  if restored is None:
    return variables, 0, None, 0, None
  meta, tree = restored.meta, restored.state
  run.history = meta['history']
  run.best_val_acc, run.best_epoch = meta['best_val_acc'], meta['best_epoch']
  run.early_stopping = dict(meta.get('early_stopping') or {})
  epoch = _saved_epoch(meta)
  partial = PhaseProgress.from_json(meta['partial']) if meta.get('partial') else None
  start_epoch = epoch if partial else epoch + 1
  opt_state, step = None, 0
  saved_stage = config.stages[config.stage_at(epoch)[0]]
  if early_stopping.stopped(run.early_stopping, saved_stage.name):   # go on with the next stage
    start_epoch = sum(s.epochs for s in config.stages[:config.stage_at(epoch)[0] + 1])
  if start_epoch < config.epochs and config.stage_at(start_epoch)[0] == config.stage_at(epoch)[0]:
    opt_state, step = tree['opt_state'], tree['step']
    run.resumed_ema = tree.get('ema')
  run.log(f'resuming {run.dir.path} in epoch {epoch} after train step {partial.steps} of '
          f'{len(run.pipeline.train)}' if partial else f'resuming {run.dir.path} after epoch {epoch}')
  return {'params': tree['params'], 'batch_stats': tree['batch_stats']}, start_epoch, opt_state, step, partial


def start_stage(run: Run, index: int, variables: dict, opt_state: Any = None, step: int = 0
                ) -> tuple[TrainState, Stage, tuple, float]:
  """Stage `index` set up over `variables`: (state, stage, its (train, val) loaders, seconds spent
  caching backbone features)."""
  config, pipeline = run.config, run.pipeline
  plan = feature_plan(config, index, pipeline.transforms.train.deterministic)
  example_train, example_val = run.examples
  # The features' width at this run's image size (SqueezeNet's, the unpooled map, depends on it),
  # from the shapes alone.
  num_features = jax.eval_shape(lambda v, x: run.model.apply(v, x, method='features'), variables,
                                example_val['images'].astype(np.float32)).shape[-1]
  loss, mixing = recipe_loss(config, [label for _, label in pipeline.data.train.samples], len(pipeline.data.classes),
                             is_multi_label(config, pipeline.data))
  state, stage = setup_stage(
      config, index, run.model, variables, len(pipeline.train),
      feature_cache.example_batch(example_train, num_features) if plan.train else example_train,
      feature_cache.example_batch(example_val, num_features) if plan.val else example_val,
      run.compiled, opt_state, step, run.mesh, pipeline.normalization,
      ema=run.resumed_ema if opt_state is not None else None, loss=loss, mixing=mixing)
  run.resumed_ema = None
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
  if run.pipeline.data.multi_label:   # its titles name one class per image
    return
  from tl_jax import plots as plot_lib
  transforms = run.pipeline.transforms
  example_train, _ = run.examples
  images = example_train['images']
  images = transforms.train.finish_uint8(images) if run.pipeline.uint8 else images
  plot_lib.save_train_batch(images, example_train['labels'], run.class_names,
                            transforms.train.mean, transforms.train.std, run.dir.path / 'train_batch.png')


def check_weights(run: Run, state: TrainState, steps: int) -> None:
  """NonFiniteError unless the weights after `steps` train steps of the epoch are finite, so no
  non-finite model is ever saved."""
  if not faults.weights_finite(model_variables(state)):
    raise faults.NonFiniteError(f'non-finite weights after train step {steps} of {len(run.pipeline.train)} '
                                '(an update too large for float32)')


def save_run_checkpoint(run: Run, epoch: int, state: TrainState, partial: Optional[PhaseProgress] = None) -> Path:
  """A run checkpoint of `epoch`: finished (`end_epoch` checked its weights), or within it with its
  train phase's `partial` progress."""
  if partial is not None:
    check_weights(run, state, partial.steps)
  meta = {'config': run.config.to_dict(), 'history': run.history, 'best_val_acc': run.best_val_acc,
          'best_epoch': run.best_epoch, 'epoch': epoch, 'partial': partial.to_json() if partial else None,
          'early_stopping': run.early_stopping}
  path = run.dir.save(state_tree(state), meta)
  run.saves.saved()
  if partial is not None:
    run.log(f'saved {path} (epoch {epoch}, after train step {partial.steps} of {len(run.pipeline.train)})')
  return path


def write_history(run: Run, **extra: Any) -> None:
  """history.json: the recipe, the data, every finished epoch's row and the best so far (process 0)."""
  if not run.main:
    return
  data = run.pipeline.data
  run.dir.write_history({'config': run.config.to_dict(), 'class_names': data.classes, 'data': data.describe(),
                         'devices': parallel.describe(run.mesh), 'compile_seconds': run.compile_seconds,
                         'skipped_images': data.skipped, 'best_val_acc': run.best_val_acc,
                         'best_epoch': run.best_epoch, 'early_stopping': run.early_stopping,
                         'epochs': run.history, **extra})


def end_epoch(run: Run, stage: Stage, state: TrainState, row: dict) -> None:
  """Logs the epoch, keeps the best model (strict >), checkpoints the run and writes history.json."""
  check_weights(run, state, row['train_steps'])
  epoch = row['epoch']
  run.history.append(row)
  run.log(f"train Loss: {row['train_loss']:.4f} Acc: {row['train_acc']:.4f}")
  run.log(f"val Loss: {row['val_loss']:.4f} Acc: {row['val_acc']:.4f}" +
          (f" mAP: {row['val_mAP']:.4f}" if 'val_mAP' in row else ''))
  if row['skipped_steps']:
    run.log(f"skipped {row['skipped_steps']} of {row['train_steps']} train steps: their loss or gradient was "
            'not finite (on_nonfinite: skip_step)')
  # Before the run checkpoint, which keeps the count for --resume.
  early_stopping.after_epoch(run.early_stopping, run.config.stages[stage.index], row, run.log)
  # A multi-label run keeps its best val mAP (in best_val_acc); val_acc is its subset accuracy.
  score = row.get('val_mAP', row['val_acc'])
  if score > run.best_val_acc:
    run.best_val_acc, run.best_epoch = score, epoch
    run.dir.save_best(epoch, eval_variables(state),   # the moving average of the weights, if kept
                      {**run.metadata, 'epoch': epoch, 'stage': stage.name, 'val_acc': row['val_acc'],
                       'ema': state.ema is not None})
  save_run_checkpoint(run, epoch, state)
  write_history(run)
  run.log('')


def diverged(run: Run, stage: Stage, epoch: int, error: faults.NonFiniteError) -> faults.NonFiniteError:
  """The one-line error of a non-finite step: where, what is saved, what to try; recorded in stop.json
  (which lets --resume take a lower lr) and history.json."""
  where = f'stage {stage.name}, epoch {epoch}'
  if error.step is not None:
    where += f', train step {error.step} of {len(run.pipeline.train)} (loss {error.loss:g})'
  latest = run.dir.latest_path()
  saved = (f'{latest} holds the last finite state (--resume continues from it)' if latest is not None
           else 'no checkpoint was saved yet')
  message = (f'{error} in {where}: stopped; nothing non-finite was saved, {saved}. Try a lower lr (--lr, or '
             f'stages[{stage.index}].optimizer.lr in the recipe: --resume accepts the change), clip_grad_norm: 1.0 '
             'for the stage, or on_nonfinite: skip_step for the stage to skip such steps')
  record = {'reason': 'nonfinite', 'stage': stage.name, 'epoch': epoch, 'step': error.step, 'loss': error.loss,
            'message': message}
  run.dir.record_stop(record)
  write_history(run, stopped=record)
  return faults.NonFiniteError(message, error.step, error.loss)


def finish(run: Run, state: Optional[TrainState], elapsed: float, plots: bool, report: bool) -> TrainResult:
  """Loads the best weights back, as the tutorial's model.load_state_dict(best_model_wts); figures
  and the evaluation of the best checkpoint."""
  run.log(f'Training complete in {elapsed // 60:.0f}m {elapsed % 60:.0f}s')
  run.log(f'Best val Acc: {run.best_val_acc:4f}')
  best = run.dir.load_best()
  best_variables = {'params': best.variables['params'], 'batch_stats': best.variables.get('batch_stats', {})}
  if state is not None:
    state = state.replace(**parallel.replicate(best_variables, run.mesh), ema=None)
  if run.main and (plots or report):
    final_outputs(run.model, best_variables, run.pipeline, run.config, run.dir, run.history, run.best_epoch,
                  plots, report, run.log)
  # The others wait for process 0's figures and evaluation, so that no process reaches JAX's
  # shutdown barrier long before the rest.
  parallel.wait_for_all('tl_jax: run finished')
  return TrainResult(run.history, run.best_val_acc, run.best_epoch, run.compile_seconds, state, run.class_names,
                     run.dir.path)


def run_one_epoch(run: Run, hooks: Callback, stage: Stage, state: TrainState, loaders: tuple, epoch: int,
                  feature_seconds: float, start: Optional[PhaseProgress]) -> TrainState:
  """Epoch `epoch` from its start or from `start` (a mid-epoch checkpoint's), its checkpoints and history.

  A signal is acted on after the step in flight (saved, then `faults.Preempted`); one that came while
  the previous epoch ended stops the run here, where all is saved."""
  with run.signals.deferred():
    signum, = faults.across_processes(run.signals.received)
    if signum:
      raise run.signals.stop_at_once(signum)
    config = run.config
    run.log(f'Epoch {epoch}/{config.epochs - 1}' + (f' (stage {stage.name})' if len(config.stages) > 1 else '') +
            '\n' + '-' * 10)
    hooks.on_epoch_start(run, epoch)
    try:
      state, row = run_epoch(stage, state, *loaders, epoch, run.progress, feature_seconds, hooks, run, start,
                             EpochGuard(run, epoch, start))
      end_epoch(run, stage, state, row)
    except faults.NonFiniteError as e:
      raise diverged(run, stage, epoch, e) from None
    hooks.on_epoch_end(run, epoch, state, row)
  return state


def run_stages(run: Run, hooks: Callback, variables: dict, start_epoch: int, opt_state: Any, step: int,
               start: Optional[PhaseProgress], plots: bool) -> Optional[TrainState]:
  """The stages from `start_epoch` on (in it, from `start`); the last state (None: nothing left to run)."""
  config, state = run.config, None
  first_stage = config.stage_at(start_epoch)[0] if start_epoch < config.epochs else len(config.stages)
  for index in range(first_stage, len(config.stages)):
    state, stage, loaders, feature_seconds = start_stage(run, index, variables, opt_state, step)
    opt_state, step = None, 0
    if plots and run.main and start_epoch == 0 and index == 0 and start is None:
      save_train_batch(run)
    hooks.on_stage_start(run, stage, state)
    for epoch in range(max(start_epoch, stage.first_epoch), stage.first_epoch + stage.epochs):
      state = run_one_epoch(run, hooks, stage, state, loaders, epoch, feature_seconds,
                            start if epoch == start_epoch else None)
      feature_seconds = 0.0
      if early_stopping.stopped(run.early_stopping, stage.name):
        break
    hooks.on_stage_end(run, stage, state)
    variables = model_variables(state)
  return state


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

  Faults (tl_jax.training.faults): a non-finite step stops the run with NonFiniteError (on_nonfinite:
  stop), nothing non-finite saved; SIGTERM/SIGINT stop it with `faults.Preempted` (exit status 143 /
  130) after saving where it got, mid-epoch; a workdir in use raises RunError, a checkpoint that
  cannot be written CheckpointError.

  Args:
    config: the recipe (see configs/*.yaml and tl_jax.config).
    workdir: run directory (tl_jax.rundir): `best/` holds the best-val model checkpoint,
      `checkpoints/` the newest run checkpoints for --resume.
    resume: continue from the newest run checkpoint in `workdir` that restores (mid-epoch ones
      included), with its optimizer state.
    progress: show progress bars.
    plots: write train_batch.png, predictions.png and curves.png.
    report: evaluate the best checkpoint on the val data at the end (evaluation.json, confusion.png,
      as scripts/evaluate.py).
    devices: use the first N local devices (default: all).
    log: receives the printed lines.
    callbacks: `Callback`s called at the start and end of the run, of each stage, epoch and step.
  """
  run, variables = setup_run(config, workdir, resume, progress, devices, log)
  hooks = _Callbacks(callbacks)
  try:
    with run.signals:
      variables, start_epoch, opt_state, step, start = resume_point(run, variables)
      hooks.on_run_start(run)
      run_start = time.perf_counter()
      state = run_stages(run, hooks, variables, start_epoch, opt_state, step, start, plots)
      signum, = faults.across_processes(run.signals.received)
      if signum:   # came as the last epoch ended: all is saved
        raise run.signals.stop_at_once(signum)
      result = finish(run, state, time.perf_counter() - run_start, plots, report)
  finally:
    run.dir.close()
  hooks.on_run_end(run, result)
  return result
