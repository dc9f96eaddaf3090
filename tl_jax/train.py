"""The tutorial's training: state, pure steps, and the epoch loop with checkpoints.

`train_step` and `eval_step` are pure functions of (state, batch); `train_and_evaluate`
jits them once per phase (fixed batch shapes, padding masked) and runs per epoch a train
phase and a val phase, keeping the weights of the best val accuracy (strict >).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from tl_jax import checkpoint, losses, optim
from tl_jax.config import TrainConfig
from tl_jax.convert import replace_head, torch_to_flax
from tl_jax.data.folder import ImageFolder, check_same_classes, drop_bad_images
from tl_jax.data.loader import Batch, Loader
from tl_jax.data.transforms import EvalTransform, TrainTransform
from tl_jax.models import ResNet, create_model, init_variables
from tl_jax.weights import Preprocessing, resolve_weights


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # Base key for dropout; the step's key is fold_in(rng, step), so a resumed run draws the same masks.
  rng: Any = None


class RunError(ValueError):
  """A training run cannot start or resume as asked."""


# ---------------------------------------------------------------------------------- steps


def _masked_sums(logits, labels, mask):
  """Sums over valid rows; the host divides (a padded row adds nothing)."""
  return losses.cross_entropy(logits, {'labels': labels, 'mask': mask})


def _split(tree: Mapping, trainable) -> tuple[Optional[dict], Optional[dict]]:
  """(learned, fixed) parts of `tree` by `trainable`, a bool or a prefix tree of bools."""
  if isinstance(trainable, bool):
    return (dict(tree), None) if trainable else (None, dict(tree))
  learned, fixed = {}, {}
  for key, sub in tree.items():
    mask = trainable[key]
    if isinstance(mask, bool) or not isinstance(sub, Mapping):
      (learned if mask else fixed)[key] = sub
      continue
    sub_learned, sub_fixed = _split(sub, mask)
    if sub_learned:
      learned[key] = sub_learned
    if sub_fixed:
      fixed[key] = sub_fixed
  return learned, fixed


def _merge(a: Optional[Mapping], b: Optional[Mapping]) -> dict:
  if not a or not b:
    return dict(a or b or {})
  out = dict(a)
  for key, value in b.items():
    out[key] = _merge(out[key], value) if key in out and isinstance(value, Mapping) else value
  return out


def dropout_key(state: TrainState) -> jax.Array:
  """This step's dropout key. A state without `rng` uses PRNGKey(0), so ResNet states built
  before the field existed still run (ResNets draw nothing)."""
  base = state.rng if state.rng is not None else jax.random.PRNGKey(0)
  return jax.random.fold_in(base, state.step)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               trainable: Mapping[str, Any], bn_train: bool,
               loss: losses.Loss = losses.cross_entropy) -> tuple[TrainState, dict]:
  """One optimizer step on the mean loss of the valid rows of `batch`.

  Args:
    state: params, batch_stats ({} for models without BatchNorm), optimizer state, dropout rng.
    batch: 'images' (B, H, W, 3), 'mask' (B,) with False on padding rows, and what `loss`
      reads ('labels' (B,) for cross-entropy, 'targets' for regression).
    model: a ResNet, VGG or TransferModel.
    trainable: module -> learns (`optim.trainable_mask`: a bool per top-level module, or a
      nested dict of them). Only those are differentiated, so no backward pass runs through a
      frozen backbone (the optimizer's `set_to_zero` keeps them unchanged).
    bn_train: BatchNorm uses (masked) batch statistics and updates its running stats, as under
      torch's model.train(); False: running stats everywhere (eval-mode BN). Dropout is on
      either way, as torch's model.train() with only the BN modules put in eval().
    loss: (outputs, batch) -> masked sums with 'loss_sum' and 'count' (see tl_jax.losses).
  """
  images, mask = batch['images'], batch['mask']
  learned, fixed = _split(state.params, trainable)
  batch_stats = state.batch_stats if state.batch_stats is not None else {}

  def loss_fn(learned_params):
    variables = {'params': _merge(fixed, learned_params), 'batch_stats': batch_stats}
    outputs, updates = model.apply(variables, images, train=True, bn_train=bn_train, mask_b=mask,
                                   mutable=['batch_stats'] if bn_train else [],
                                   rngs={'dropout': dropout_key(state)})
    sums = loss(outputs, batch)
    return sums['loss_sum'] / sums['count'], (sums, updates.get('batch_stats', batch_stats))

  (_, (sums, new_batch_stats)), learned_grads = jax.value_and_grad(loss_fn, has_aux=True)(learned or {})
  # Frozen modules get zero gradients; optax.partition routes them to set_to_zero, which
  # never reads them, so XLA folds these zeros away.
  grads = _merge(learned_grads, jax.tree_util.tree_map(jnp.zeros_like, fixed) if fixed else None)
  state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)
  return state, sums


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
              loss: losses.Loss = losses.cross_entropy) -> dict:
  """Eval-mode forward; masked sums of the loss (and correct predictions) and count.

  Classification adds 'predictions' (argmax); other heads' outputs are returned as 'outputs'.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats if state.batch_stats is not None else {}}
  outputs = model.apply(variables, batch['images'], train=False)
  sums = loss(outputs, batch)
  if 'correct' in sums:
    return {**sums, 'predictions': jnp.argmax(outputs, axis=-1)}
  return {**sums, 'outputs': outputs}


# ---------------------------------------------------------------------------------- setup


def initial_variables(config: TrainConfig, num_classes: int, state_dict: Optional[Mapping] = None) -> dict:
  """Pretrained backbone (if `state_dict`) with a fresh `num_classes`-way fc, as the tutorial does."""
  model = create_model(config.arch, num_classes)
  fresh = init_variables(model, jax.random.PRNGKey(config.seed), image_size=32)
  if state_dict is None:
    return fresh
  backbone = torch_to_flax(state_dict, config.arch, reference=fresh, include_head=False)
  return replace_head(backbone, fresh)


def create_train_state(config: TrainConfig, model: ResNet, variables: Mapping,
                       steps_per_epoch: int) -> TrainState:
  schedule = optim.step_lr_schedule(config.lr, config.step_size_epochs, config.gamma,
                                    steps_per_epoch, config.epochs)
  tx = optim.make_optimizer(variables['params'], config.strategy, schedule, config.momentum)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables['batch_stats'])


def epoch_lr(config: TrainConfig, epoch: int) -> float:
  """The StepLR learning rate of `epoch` (0-based), for logging."""
  return config.lr * config.gamma ** (epoch // config.step_size_epochs)


@dataclasses.dataclass
class Data:
  train: ImageFolder
  val: ImageFolder
  skipped: int


def load_data(config: TrainConfig, log: Callable[[str], None] = print) -> Data:
  """The train/ and val/ folders, checked; bad images raise or (skip_bad_images) are dropped."""
  from tl_jax.data.download import ensure_hymenoptera
  root = Path(config.data)
  if not root.exists() and config.data == TrainConfig.data:
    root = ensure_hymenoptera(root)
  for split in ('train', 'val'):
    if not (root / split).is_dir():
      raise RunError(f'--data {root}: no {split}/ folder there; pass a folder with train/ and val/ '
                     'class sub-folders (as the tutorial\'s hymenoptera_data)')
  train, val = ImageFolder(root / 'train'), ImageFolder(root / 'val')
  check_same_classes(train, val)
  skipped = 0
  for split, folder in (('train', train), ('val', val)):
    checked, dropped = drop_bad_images(folder, config.skip_bad_images, warn=lambda m: log(f'warning: {m}'),
                                       num_threads=max(config.workers, 1))
    skipped += dropped
    if split == 'train':
      train = checked
    else:
      val = checked
  if skipped:
    log(f'skipped {skipped} unreadable image(s)')
  return Data(train, val, skipped)


def make_loaders(config: TrainConfig, data: Data, preprocessing: Preprocessing) -> tuple[Loader, Loader]:
  mean, std = tuple(preprocessing.mean), tuple(preprocessing.std)
  train_tf = TrainTransform(crop_size=preprocessing.crop_size, mean=mean, std=std)
  eval_tf = EvalTransform(resize_size=preprocessing.resize_size, crop_size=preprocessing.crop_size,
                          mean=mean, std=std)
  train = Loader(data.train.samples, train_tf, config.batch_size, shuffle=True, seed=config.seed,
                 workers=config.workers, prefetch=config.prefetch)
  val = Loader(data.val.samples, lambda img, _rng: eval_tf(img), config.eval_batch_size, shuffle=False,
               seed=config.seed, workers=config.workers, prefetch=config.prefetch)
  return train, val


def spread_sample_loader(loader: Loader, count: int) -> Loader:
  """`count` samples evenly spaced through `loader`'s (class-sorted) samples, in its batch shape.

  The val folder lists classes one after the other, so its first batch may hold one class only;
  the tutorial's figure draws from a shuffled loader and shows a mix.
  """
  picks = np.unique(np.linspace(0, len(loader.samples) - 1, min(count, len(loader.samples))).astype(int))
  return Loader([loader.samples[i] for i in picks], loader.transform, loader.batch_size, shuffle=False,
                workers=0, load=loader.load)


# ---------------------------------------------------------------------------------- loop


@dataclasses.dataclass
class TrainResult:
  history: list[dict]
  best_val_acc: float
  best_epoch: int
  compile_seconds: dict[str, float]
  state: TrainState
  class_names: list[str]
  workdir: Path


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2))
  os.replace(tmp, path)


def _run_manager(workdir: Path):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(workdir / checkpoint.RUN_DIR, options=ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True), item_names=('state', 'meta'))


def _state_tree(state: TrainState) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats, 'opt_state': state.opt_state,
          'step': state.step}


def _compile(fn, *args) -> tuple[Callable, float]:
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def run_phase(step_fn, state, loader: Loader, epoch: int, train: bool, progress: bool,
              desc: str) -> tuple[Any, dict, float]:
  """Runs one phase; returns (state, host-summed metrics, seconds the device starved for data).

  Steps are dispatched asynchronously, so the host fetches batch n+1 while step n runs and the
  device never idles between well-fed steps. Starvation is the part of a wait for data during
  which no step was running: a wait counts when the step in flight had finished by the time
  the batch arrived (an upper bound: it may have finished partway through), and not at all
  when that step was still running.
  """
  from tqdm.auto import tqdm
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  device_sums = []
  starved = 0.0
  in_flight = None
  batches = iter(loader.epoch(epoch))
  with tqdm(total=len(loader), desc=desc, leave=False, disable=not progress) as bar:
    while True:
      start = time.perf_counter()
      batch = next(batches, None)
      if in_flight is None or in_flight.is_ready():
        starved += time.perf_counter() - start
      if batch is None:
        break
      if train:
        state, sums = step_fn(state, batch.as_dict())
      else:
        sums = step_fn(state, batch.as_dict())
      in_flight = sums['count']
      device_sums.append({k: sums[k] for k in totals})
      bar.update()
  # One transfer at the end: per-step float() calls would block the host on every step.
  for sums in jax.device_get(device_sums):
    for k in totals:
      totals[k] += float(sums[k])
  return state, totals, starved


def train_and_evaluate(config: TrainConfig, workdir: str | Path, *, resume: bool = False,
                       progress: bool = True, plots: bool = True,
                       log: Callable[[str], None] = print) -> TrainResult:
  """Trains as the tutorial does and writes checkpoints, history.json and plots to `workdir`.

  Args:
    config: the recipe (see configs/*.yaml).
    workdir: run directory; `best/` holds the best-val model checkpoint, `checkpoints/` the
      latest finished epoch for --resume.
    resume: continue from the latest finished epoch in `workdir`.
    progress: show progress bars.
    plots: write train_batch.png, predictions.png and curves.png.
    log: receives the printed lines.
  """
  config.validate()
  workdir = Path(workdir).absolute()
  # Before any slow step: a workdir that cannot be written would otherwise fail after the first epoch.
  if workdir.exists() and not workdir.is_dir():
    raise RunError(f'--workdir {workdir} is a file, not a directory; choose another --workdir')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise RunError(f'--workdir {workdir} cannot be used as a run directory ({e.strerror or e}); '
                   'choose another --workdir') from e
  run_manager_path = workdir / checkpoint.RUN_DIR
  has_run = run_manager_path.is_dir() and any(p.name.isdigit() for p in run_manager_path.iterdir())
  if has_run and not resume:
    raise RunError(f'{workdir} already holds a run; pass --resume to continue it or choose another --workdir')
  if resume and not has_run:
    log(f'no finished epoch in {workdir} to resume from; starting a new run')

  data = load_data(config, log)
  class_names = data.train.classes
  weights = resolve_weights(config.weights, config.arch, progress=progress)
  train_loader, val_loader = make_loaders(config, data, weights.preprocessing)
  model = create_model(config.arch, len(class_names))
  variables = initial_variables(config, len(class_names), weights.state_dict)
  state = create_train_state(config, model, variables, steps_per_epoch=len(train_loader))

  history: list[dict] = []
  best_val_acc, best_epoch, start_epoch = -1.0, -1, 0
  run_manager = _run_manager(workdir)
  best_manager = checkpoint.best_manager(workdir)
  if resume and has_run:
    import orbax.checkpoint as ocp
    step = run_manager.latest_step()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
    restored = run_manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    saved_config = restored['meta']['config']
    changed = {k: (saved_config.get(k), v) for k, v in config.to_dict().items()
               if k not in ('epochs', 'workers', 'prefetch') and saved_config.get(k) != v}
    if changed:
      raise RunError(f'--resume with a different recipe than the run in {workdir}: ' +
                     ', '.join(f'{k}: run has {a!r}, now {b!r}' for k, (a, b) in changed.items()))
    s = restored['state']
    state = state.replace(params=s['params'], batch_stats=s['batch_stats'], opt_state=s['opt_state'],
                          step=s['step'])
    history = restored['meta']['history']
    best_val_acc, best_epoch = restored['meta']['best_val_acc'], restored['meta']['best_epoch']
    start_epoch = step + 1
    log(f'resuming {workdir} after epoch {step}')

  trainable = optim.trainable_mask(state.params, config.strategy)
  train_fn = jax.jit(functools.partial(train_step, model=model, trainable=trainable, bn_train=config.bn == 'train'),
                     donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model))
  example_train = next(iter(train_loader.epoch(0))).as_dict()
  example_val = next(iter(val_loader.epoch(0))).as_dict()
  train_fn, train_compile = _compile(train_fn, state, example_train)
  eval_fn, eval_compile = _compile(eval_fn, state, example_val)
  compile_seconds = {'train_step': train_compile, 'eval_step': eval_compile}
  log(f'compiled train_step in {train_compile:.1f}s, eval_step in {eval_compile:.1f}s '
      f'({jax.devices()[0].platform})')

  if plots and start_epoch == 0:
    from tl_jax import plots as plot_lib
    plot_lib.save_train_batch(example_train['images'], example_train['labels'], class_names,
                              weights.preprocessing.mean, weights.preprocessing.std, workdir / 'train_batch.png')

  metadata = checkpoint.make_metadata(config.arch, len(class_names), weights.preprocessing.to_dict(),
                                      class_names, source=weights.source, strategy=config.strategy)
  run_start = time.perf_counter()
  for epoch in range(start_epoch, config.epochs):
    log(f'Epoch {epoch}/{config.epochs - 1}\n' + '-' * 10)
    t0 = time.perf_counter()
    state, train_sums, train_wait = run_phase(train_fn, state, train_loader, epoch, True, progress, 'train')
    t1 = time.perf_counter()
    _, val_sums, _ = run_phase(eval_fn, state, val_loader, epoch, False, progress, 'val')
    t2 = time.perf_counter()
    row = {
        'epoch': epoch, 'lr': epoch_lr(config, epoch),
        'train_loss': train_sums['loss_sum'] / train_sums['count'],
        'train_acc': train_sums['correct'] / train_sums['count'],
        'val_loss': val_sums['loss_sum'] / val_sums['count'],
        'val_acc': val_sums['correct'] / val_sums['count'],
        'train_seconds': t1 - t0, 'val_seconds': t2 - t1, 'seconds': t2 - t0,
        'data_wait_seconds': train_wait, 'train_steps': len(train_loader),
    }
    history.append(row)
    log(f"train Loss: {row['train_loss']:.4f} Acc: {row['train_acc']:.4f}")
    log(f"val Loss: {row['val_loss']:.4f} Acc: {row['val_acc']:.4f}")
    if row['val_acc'] > best_val_acc:
      best_val_acc, best_epoch = row['val_acc'], epoch
      checkpoint.save_best(best_manager, epoch, {'params': state.params, 'batch_stats': state.batch_stats},
                           {**metadata, 'epoch': epoch, 'val_acc': row['val_acc']})
    import orbax.checkpoint as ocp
    run_manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)),
        meta=ocp.args.JsonSave({'config': config.to_dict(), 'history': history, 'best_val_acc': best_val_acc,
                                'best_epoch': best_epoch})), force=True)
    run_manager.wait_until_finished()
    _write_json(workdir / 'history.json', {'config': config.to_dict(), 'class_names': class_names,
                                           'compile_seconds': compile_seconds, 'skipped_images': data.skipped,
                                           'best_val_acc': best_val_acc, 'best_epoch': best_epoch,
                                           'epochs': history})
    log('')

  elapsed = time.perf_counter() - run_start
  log(f'Training complete in {elapsed // 60:.0f}m {elapsed % 60:.0f}s')
  log(f'Best val Acc: {best_val_acc:4f}')

  # Load the best weights, as the tutorial's model.load_state_dict(best_model_wts).
  best = checkpoint.load_model(workdir)
  state = state.replace(params=jax.device_put(best.variables['params']),
                        batch_stats=jax.device_put(best.variables['batch_stats']))
  if plots:
    from tl_jax import plots as plot_lib
    batch = next(iter(spread_sample_loader(val_loader, 6).epoch(0)))
    predictions = np.asarray(eval_fn(state, batch.as_dict())['predictions'])
    shown = int(min(6, batch.mask.sum()))
    plot_lib.save_predictions(batch.images[:shown], predictions[:shown], batch.labels[:shown], class_names,
                              weights.preprocessing.mean, weights.preprocessing.std, workdir / 'predictions.png',
                              num_images=shown)
    plot_lib.save_curves(history, workdir / 'curves.png')
  run_manager.close()
  best_manager.close()
  return TrainResult(history, best_val_acc, best_epoch, compile_seconds, state, class_names, workdir)
