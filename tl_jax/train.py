"""The tutorial's training: state, pure steps, and the epoch loop with checkpoints.

`train_step` and `eval_step` are pure functions of (state, batch); `train_and_evaluate`
jits them once per phase (fixed batch shapes, padding masked) and runs per epoch a train
phase and a val phase, keeping the weights of the best val accuracy (strict >).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh

from tl_jax import checkpoint, feature_cache, losses, models, optim, parallel
from tl_jax.config import Config, recipe_warnings
from tl_jax.convert import replace_head, torch_to_flax
from tl_jax.data import on_device, sources
from tl_jax.data.loader import Loader
from tl_jax.data.sources import Data
from tl_jax.models import create_model, init_variables
from tl_jax.rundir import RunDir, RunError
from tl_jax.weights import Preprocessing, resolve_weights


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # Base key for dropout; the step's key is fold_in(rng, step), so a resumed run draws the same masks.
  rng: Any = None


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
      reads ('labels' (B,) for cross-entropy, 'targets' for regression). With 'features' (B, F)
      in place of 'images' (tl_jax.feature_cache), only the model's `from_features` runs.
    model: a ResNet, VGG or TransferModel.
    trainable: module -> learns (`optim.trainable_mask`: a bool per top-level module, or a
      nested dict of them). Only those are differentiated, so no backward pass runs through a
      frozen backbone (the optimizer's `set_to_zero` keeps them unchanged).
    bn_train: BatchNorm uses (masked) batch statistics and updates its running stats, as under
      torch's model.train(); False: running stats everywhere (eval-mode BN). Dropout is on
      either way, as torch's model.train() with only the BN modules put in eval().
    loss: (outputs, batch) -> masked sums with 'loss_sum' and 'count' (see tl_jax.losses).
  """
  learned, fixed = _split(state.params, trainable)
  batch_stats = state.batch_stats if state.batch_stats is not None else {}

  def loss_fn(learned_params):
    variables = {'params': _merge(fixed, learned_params), 'batch_stats': batch_stats}
    if 'features' in batch:   # cached backbone features (tl_jax.feature_cache): the backbone is fixed
      outputs, updates = model.apply(variables, batch['features'], train=True, method='from_features',
                                     mutable=[], rngs={'dropout': dropout_key(state)})
    else:
      outputs, updates = model.apply(variables, batch['images'], train=True, bn_train=bn_train,
                                     mask_b=batch['mask'], mutable=['batch_stats'] if bn_train else [],
                                     rngs={'dropout': dropout_key(state)})
    sums = loss(outputs, batch)
    return sums['loss_sum'] / sums['count'], (sums, updates.get('batch_stats', batch_stats))

  (_, (sums, new_batch_stats)), learned_grads = jax.value_and_grad(loss_fn, has_aux=True)(learned or {})
  # Frozen modules get zero gradients; optax.partition routes them to set_to_zero, which
  # never reads them, so XLA folds these zeros away.
  grads = _merge(learned_grads, jax.tree_util.tree_map(jnp.zeros_like, fixed) if fixed else None)
  state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)
  return state, sums


def _eval_variables(state: TrainState) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats if state.batch_stats is not None else {}}


def features_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module) -> dict:
  """Eval-mode backbone features (B, F) of an image batch, for tl_jax.feature_cache."""
  return {'features': model.apply(_eval_variables(state), batch['images'], train=False, method='features')}


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
              loss: losses.Loss = losses.cross_entropy) -> dict:
  """Eval-mode forward (of 'images', or of cached 'features'); masked sums of the loss (and correct
  predictions) and count.

  Classification adds 'predictions' (argmax); other heads' outputs are returned as 'outputs'.
  """
  variables = _eval_variables(state)
  if 'features' in batch:   # cached backbone features (tl_jax.feature_cache)
    outputs = model.apply(variables, batch['features'], train=False, method='from_features')
  else:
    outputs = model.apply(variables, batch['images'], train=False)
  sums = loss(outputs, batch)
  if 'correct' in sums:
    return {**sums, 'predictions': jnp.argmax(outputs, axis=-1)}
  return {**sums, 'outputs': outputs}


# ---------------------------------------------------------------------------------- setup


def initial_variables(arch: str, num_classes: int, seed: int, state_dict: Optional[Mapping] = None) -> dict:
  """Pretrained backbone (if `state_dict`) with a fresh `num_classes`-way head, as the tutorial does."""
  model = create_model(arch, num_classes)
  fresh = init_variables(model, jax.random.PRNGKey(seed), image_size=32)
  if state_dict is None:
    return fresh
  backbone = torch_to_flax(state_dict, arch, reference=fresh, include_head=False)
  return replace_head(backbone, fresh)


def make_tx(config: Config, index: int, params: Mapping, steps_per_epoch: int) -> optax.GradientTransformation:
  """Stage `index`'s optimizer, with its schedule counted from the stage's first step."""
  stage = config.stages[index]
  schedule = optim.make_schedule(stage.schedule.model_dump(), stage.optimizer.lr, stage.epochs, steps_per_epoch)
  return optim.make_optimizer(params, config.trainable_stages(index), stage.optimizer.model_dump(), schedule)


def stage_lrs(config: Config, index: int) -> list[float]:
  """The learning rate of every epoch of stage `index`, for logging."""
  stage = config.stages[index]
  return optim.epoch_lrs(stage.schedule.model_dump(), stage.optimizer.lr, stage.epochs)


def load_data(config: Config, workdir: Optional[Path] = None, log: Callable[[str], None] = print) -> Data:
  """The recipe's train and val samples (tl_jax.data.sources): a folder, a split folder, or a TFDS set."""
  d = config.data
  return sources.load_data(d.path, workdir=workdir, seed=config.seed, skip_bad_images=d.skip_bad_images,
                           workers=max(d.workers, 1), train_split=d.train_split, val_split=d.val_split,
                           tfds_data_dir=d.tfds_data_dir, tfds_download=d.tfds_download,
                           val_fraction=d.val_fraction, log=log)


@dataclasses.dataclass(frozen=True)
class Transforms:
  """A run's train and val pipelines (tl_jax.data.transforms.Pipeline): (image, rng) -> float32 HWC."""
  train: Any
  val: Any


def make_transforms(config: Config, preprocessing: Preprocessing) -> Transforms:
  """The configured transform lists; a list left out is the weights' own preprocessing (the tutorial's)."""
  from tl_jax.data import transforms as T
  train_spec = config.data.train_transforms or T.tutorial_train_spec(preprocessing)
  val_spec = config.data.val_transforms or T.tutorial_val_spec(preprocessing)
  return Transforms(T.build_pipeline(train_spec, where='data.train_transforms'),
                    T.build_pipeline(val_spec, where='data.val_transforms'))


def decoded_cache(config: Config, data: Data, samples: Sequence, budget_bytes: Optional[int] = None) -> Callable:
  """`data.load`, or a cache of the decoded images of `samples` (data.cache_decoded, tl_jax.data.cache);
  other samples are loaded as they are.

  'auto' sizes the set from the files' headers, so it applies to folders; a TFDS set is cached
  only when asked (true).
  """
  from tl_jax.data import cache
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
  from tl_jax.data import cache
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


def _compile(fn, *args) -> tuple[Callable, float]:
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


@dataclasses.dataclass
class Stage:
  """One stage of a recipe, ready to run: its compiled steps and learning rates."""
  index: int
  name: str
  first_epoch: int            # global index of the stage's first epoch
  epochs: int
  lrs: list[float]            # per epoch of the stage
  train_fn: Callable          # (state, batch) -> (state, sums), compiled for the loader's batch shape
  eval_fn: Callable           # (state, batch) -> sums
  compile_seconds: dict[str, float]
  mesh: Mesh                  # batches are split over its devices


def _stage_key(config: Config, index: int) -> tuple:
  """What a compiled train step depends on besides shapes: the trainable set, BN policy and optimizer."""
  stage = config.stages[index]
  return (config.trainable_stages(index), stage.bn, stage.optimizer.model_dump_json(),
          stage.schedule.model_dump_json(), stage.epochs)


def setup_stage(config: Config, index: int, model, variables: Mapping, steps_per_epoch: int,
                example_train: Mapping, example_val: Mapping, compiled: Optional[dict] = None,
                opt_state: Any = None, step: int = 0, mesh: Optional[Mesh] = None,
                normalization: Optional[tuple] = None, compile_steps: bool = True) -> tuple[TrainState, Stage]:
  """A fresh optimizer for stage `index` over `variables` (as constructing a new torch optimizer does).

  Args:
    variables: {'params', 'batch_stats'} carried over from the previous stage.
    example_train, example_val: a batch of each phase, for compiling ahead of time (of images,
      or of cached features: tl_jax.feature_cache.example_batch).
    compiled: cache of compiled steps shared between stages; a stage equal to an earlier one in
      trainable set, BN policy, optimizer and schedule reuses its steps instead of compiling again.
    opt_state, step: a restored optimizer state and step within the stage (resume).
    mesh: the devices (tl_jax.parallel): the state is replicated on each, batches split over
      them; default: the first device.
    normalization: (mean, std) when batches come as uint8 and are normalised on the device.
    compile_steps: False builds the state alone (the stage's steps are None), e.g. as the
      structure to restore a checkpoint into.
  """
  mesh = parallel.make_mesh(1) if mesh is None else mesh
  stage_config = config.stages[index]
  tx = make_tx(config, index, variables['params'], steps_per_epoch)
  # Dropout's key: one per stage; each step folds in its step number (train.dropout_key), so a
  # resumed stage draws the masks the uninterrupted one would have.
  state = TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                            batch_stats=variables['batch_stats'],
                            rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), index))
  if opt_state is not None:
    state = state.replace(opt_state=opt_state, step=step)
  # Committed to the mesh before the first call: a state with another sharding would compile again.
  state = parallel.replicate(state, mesh)
  compiled = {} if compiled is None else compiled
  # Feature batches (tl_jax.feature_cache) and image batches need steps of their own.
  key = _stage_key(config, index) + (tuple(sorted(example_train)), tuple(sorted(example_val)))
  seconds = {'train_step': 0.0, 'eval_step': 0.0}
  if compile_steps and key not in compiled:
    trainable = optim.trainable_mask(state.params, config.trainable_stages(index))
    train, evaluate = train_step, eval_step
    if normalization is not None:
      train, evaluate = (on_device.normalizing_step(f, *normalization) for f in (train_step, eval_step))
    train_fn = parallel.jit_train_step(train, mesh, model=model, trainable=trainable,
                                       bn_train=stage_config.bn == 'train')
    eval_fn = parallel.jit_eval_step(evaluate, mesh, model=model)
    train_fn, seconds['train_step'] = _compile(train_fn, state, parallel.shard_batch(example_train, mesh))
    eval_fn, seconds['eval_step'] = _compile(eval_fn, state, parallel.shard_batch(example_val, mesh))
    compiled[key] = (train_fn, eval_fn)
  train_fn, eval_fn = compiled[key] if compile_steps else (None, None)
  first_epoch = sum(s.epochs for s in config.stages[:index])
  return state, Stage(index, stage_config.name, first_epoch, stage_config.epochs, stage_lrs(config, index),
                      train_fn, eval_fn, seconds, mesh)


def feature_plan(config: Config, index: int, train_deterministic: bool) -> feature_cache.Plan:
  """Which phases of stage `index` read cached backbone features (tl_jax.feature_cache)."""
  return feature_cache.plan(config.model.arch, config.trainable_stages(index), config.stages[index].bn,
                            train_deterministic, config.data.cache_features, jax.process_count())


def cached_loaders(plan: feature_cache.Plan, model, state: TrainState, stage: Stage, train_loader: Loader,
                   val_loader: Loader, compiled: dict, normalization: Optional[tuple] = None) -> tuple:
  """The stage's (train, val) loaders: a phase `plan` caches reads features computed now, from `state`."""
  if not plan.any:
    return train_loader, val_loader
  if ('features', stage.mesh) not in compiled:
    fn = features_step
    if normalization is not None:
      fn = on_device.normalizing_step(fn, *normalization)
    # Compiled with the train step's XLA options, not the faster forward-only ones: the cached
    # features then round as the backbone inside the uncached train step does.
    compiled[('features', stage.mesh)] = parallel.jit_eval_step(fn, stage.mesh, compiler_options={}, model=model)
  fn = compiled[('features', stage.mesh)]
  put = functools.partial(parallel.shard_batch, mesh=stage.mesh)
  if plan.train:
    train_loader = feature_cache.FeatureLoader(train_loader, feature_cache.extract(fn, state, train_loader, put))
  if plan.val:
    val_loader = feature_cache.FeatureLoader(val_loader, feature_cache.extract(fn, state, val_loader, put))
  return train_loader, val_loader


# ---------------------------------------------------------------------------------- loop


def run_phase(step_fn, state, loader: Loader, epoch: int, train: bool, progress: bool,
              desc: str, put: Callable[[dict], Any] = lambda batch: batch) -> tuple[Any, dict, float]:
  """Runs one phase; returns (state, host-summed metrics, seconds the device starved for data).

  Steps are dispatched asynchronously, so the host fetches batch n+1 while step n runs and the
  device never idles between well-fed steps. Starvation is the part of a wait for data during
  which no step was running: a wait counts when the step in flight had finished by the time
  the batch arrived (an upper bound: it may have finished partway through), and not at all
  when that step was still running. `put` places a host batch on the devices (split over the mesh).
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
      if train:
        state, sums = step_fn(state, put(batch.as_dict()))
      else:
        sums = step_fn(state, put(batch.as_dict()))
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
              progress: bool = False, feature_seconds: float = 0.0) -> tuple[TrainState, dict]:
  """A train phase and a val phase of global `epoch`; returns the new state and the history row.

  The loaders may give cached features instead of images (tl_jax.feature_cache.FeatureLoader);
  `feature_seconds`, the time spent computing them before this epoch, goes into the row.
  """
  put = functools.partial(parallel.shard_batch, mesh=stage.mesh)
  t0 = time.perf_counter()
  state, train_sums, train_wait = run_phase(stage.train_fn, state, train_loader, epoch, True, progress, 'train',
                                            put)
  t1 = time.perf_counter()
  _, val_sums, _ = run_phase(stage.eval_fn, state, val_loader, epoch, False, progress, 'val', put)
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


@dataclasses.dataclass
class TrainResult:
  history: list[dict]
  best_val_acc: float
  best_epoch: int
  compile_seconds: dict[str, float]
  state: TrainState
  class_names: list[str]
  workdir: Path


def _state_tree(state: TrainState) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats, 'opt_state': state.opt_state,
          'step': state.step}


def _val_label(source: Mapping[str, Any]) -> str:
  """Where the val samples come from, in a few words: a folder, a TFDS split, or a split folder's share."""
  if source['kind'] == 'tfds':
    return f"tfds:{source.get('name')} {source['splits']['val']}"
  if source['kind'] == 'folder':
    return str(Path(source['path']) / 'val')
  return f"{source['path']} (val split)"


def _add_seconds(total: dict[str, float], more: Mapping[str, float]) -> None:
  for k, v in more.items():
    total[k] = total.get(k, 0.0) + v


def train_and_evaluate(config: Config, workdir: str | Path, *, resume: bool = False,
                       progress: bool = True, plots: bool = True, report: bool = True,
                       devices: Optional[int] = None, log: Callable[[str], None] = print) -> TrainResult:
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
  """
  main = parallel.is_main_process()
  if not main:
    log, progress = (lambda _: None), False
  run = RunDir(workdir, resume, log)
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.data.batch_size, mesh.size, '--batch-size')
  parallel.check_batch_size(config.data.eval_batch_size, mesh.size, '--eval-batch-size')
  for warning in recipe_warnings(config):
    log(f'warning: {warning}')
  data = load_data(config, run.path, log)
  class_names = data.classes
  weights = resolve_weights(config.model.weights, config.model.arch, progress=progress)
  transforms = make_transforms(config, weights.preprocessing)
  uint8 = config.data.uint8_batches is True or (config.data.uint8_batches == 'auto' and
                                                jax.default_backend() != 'cpu')
  train_loader, val_loader = make_loaders(config, data, transforms, uint8)
  normalization = None
  if uint8:
    if (transforms.train.mean, transforms.train.std) != (transforms.val.mean, transforms.val.std):
      raise RunError('data.uint8_batches needs the same Normalize mean/std in train and val transforms; '
                     'set data.uint8_batches: false')
    normalization = (transforms.train.mean, transforms.train.std)
  model = create_model(config.model.arch, len(class_names), dtype=_DTYPES[config.model.dtype])
  variables = initial_variables(config.model.arch, len(class_names), config.seed, weights.state_dict)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  example_train = next(iter(train_loader.epoch(0))).as_dict()
  example_val = next(iter(val_loader.epoch(0))).as_dict()
  log(f'devices: {parallel.describe(mesh)}; batches of {config.data.batch_size} '
      f'({"uint8, normalised on the device" if uint8 else "float32"}); compute {config.model.dtype}')

  history: list[dict] = []
  best_val_acc, best_epoch, start_epoch = -1.0, -1, 0
  opt_state, step = None, 0
  if run.resuming:
    meta = run.restore_meta()
    run.check_recipe(meta['config'], config.to_dict())
    last = run.latest_epoch()
    saved_index, _ = config.stage_at(last)
    # The saved optimizer state has the structure of its own stage's optimizer.
    template, _ = setup_stage(config, saved_index, model, variables, len(train_loader), example_train,
                              example_val, mesh=mesh, compile_steps=False)
    restored = run.restore_state(_state_tree(template))
    variables = {'params': restored['params'], 'batch_stats': restored['batch_stats']}
    history = meta['history']
    best_val_acc, best_epoch = meta['best_val_acc'], meta['best_epoch']
    start_epoch = last + 1
    if start_epoch < config.epochs and config.stage_at(start_epoch)[0] == saved_index:
      opt_state, step = restored['opt_state'], restored['step']
    log(f'resuming {run.path} after epoch {last}')

  metadata = checkpoint.make_metadata(
      config.model.arch, len(class_names), weights.preprocessing.to_dict(), class_names,
      source=weights.source, data=data.describe(), stages=[s.name for s in config.stages],
      val_transforms=transforms.val.to_spec(), config=config.to_dict())
  compiled: dict = {}
  compile_seconds: dict[str, float] = {}
  state = None
  run_start = time.perf_counter()
  for index in range(config.stage_at(start_epoch)[0] if start_epoch < config.epochs else len(config.stages),
                     len(config.stages)):
    plan = feature_plan(config, index, transforms.train.deterministic)
    # Feature width of the arch (VGG's adaptive pool makes it independent of the image size).
    num_features = models.num_features(config.model.arch)
    state, stage = setup_stage(
        config, index, model, variables, len(train_loader),
        feature_cache.example_batch(example_train, num_features) if plan.train else example_train,
        feature_cache.example_batch(example_val, num_features) if plan.val else example_val,
        compiled, opt_state, step, mesh, normalization)
    opt_state, step = None, 0
    _add_seconds(compile_seconds, stage.compile_seconds)
    if any(stage.compile_seconds.values()):
      log(f'stage {stage.name}: compiled train_step in {stage.compile_seconds["train_step"]:.1f}s, '
          f'eval_step in {stage.compile_seconds["eval_step"]:.1f}s ({jax.devices()[0].platform})')
    start = time.perf_counter()
    stage_train, stage_val = cached_loaders(plan, model, state, stage, train_loader, val_loader, compiled,
                                            normalization)
    feature_seconds = time.perf_counter() - start if plan.any else 0.0
    if not plan.backbone_learns:
      log(f'stage {stage.name}: {plan.describe()}' + (f' ({feature_seconds:.1f}s)' if plan.any else ''))
    if plots and main and start_epoch == 0 and index == 0:
      from tl_jax import plots as plot_lib
      images = example_train['images']
      images = transforms.train.finish_uint8(images) if uint8 else images
      plot_lib.save_train_batch(images, example_train['labels'], class_names,
                                transforms.train.mean, transforms.train.std, run.path / 'train_batch.png')
    for epoch in range(max(start_epoch, stage.first_epoch), stage.first_epoch + stage.epochs):
      log(f'Epoch {epoch}/{config.epochs - 1}' + (f' (stage {stage.name})' if len(config.stages) > 1 else '') +
          '\n' + '-' * 10)
      state, row = run_epoch(stage, state, stage_train, stage_val, epoch, progress, feature_seconds)
      feature_seconds = 0.0
      history.append(row)
      log(f"train Loss: {row['train_loss']:.4f} Acc: {row['train_acc']:.4f}")
      log(f"val Loss: {row['val_loss']:.4f} Acc: {row['val_acc']:.4f}")
      if row['val_acc'] > best_val_acc:
        best_val_acc, best_epoch = row['val_acc'], epoch
        run.save_best(epoch, {'params': state.params, 'batch_stats': state.batch_stats},
                      {**metadata, 'epoch': epoch, 'stage': stage.name, 'val_acc': row['val_acc']})
      run.save_epoch(epoch, _state_tree(state), {'config': config.to_dict(), 'history': history,
                                                  'best_val_acc': best_val_acc, 'best_epoch': best_epoch})
      if main:
        run.write_history({'config': config.to_dict(), 'class_names': class_names, 'data': data.describe(),
                           'devices': parallel.describe(mesh), 'compile_seconds': compile_seconds,
                           'skipped_images': data.skipped, 'best_val_acc': best_val_acc,
                           'best_epoch': best_epoch, 'epochs': history})
      log('')
    variables = {'params': state.params, 'batch_stats': state.batch_stats}

  elapsed = time.perf_counter() - run_start
  log(f'Training complete in {elapsed // 60:.0f}m {elapsed % 60:.0f}s')
  log(f'Best val Acc: {best_val_acc:4f}')

  # Load the best weights, as the tutorial's model.load_state_dict(best_model_wts).
  best = run.load_best()
  best_variables = {'params': best.variables['params'], 'batch_stats': best.variables.get('batch_stats', {})}
  if state is not None:
    state = state.replace(**parallel.replicate(best_variables, mesh))
  if main and (plots or report):
    _final_outputs(model, best_variables, data, transforms, config, run, history, best_epoch, plots, report, log)
  # The others wait for process 0's figures and evaluation, so that no process reaches JAX's
  # shutdown barrier long before the rest.
  parallel.wait_for_all('tl_jax: run finished')
  run.close()
  return TrainResult(history, best_val_acc, best_epoch, compile_seconds, state, class_names, run.path)


_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}   # None: the inputs' dtype (float32)


def _final_outputs(model, variables: Mapping, data: Data, transforms: Transforms, config: Config, run: RunDir,
                   history: list[dict], best_epoch: int, plots: bool, report: bool,
                   log: Callable[[str], None]) -> None:
  """predictions.png, curves.png and the evaluation of the best checkpoint, by process 0 alone."""
  from tl_jax import evaluate
  # Every val sample, in float32 on this process's first device: no collective, so the other
  # processes need not take part.
  val_loader = Loader(data.val.samples, transforms.val, config.data.eval_batch_size, shuffle=False,
                      workers=config.data.workers, prefetch=config.data.prefetch, load=data.load)
  variables = jax.device_get(variables)
  if plots:
    from tl_jax import plots as plot_lib
    sample = spread_sample_loader(val_loader, 6)
    batch = next(iter(sample.epoch(0)))
    predictions = np.argmax(np.asarray(evaluate.make_forward(model)(variables, batch.images)), axis=-1)
    shown = int(min(6, batch.mask.sum()))
    plot_lib.save_predictions(batch.images[:shown], predictions[:shown], batch.labels[:shown], data.classes,
                              transforms.val.mean, transforms.val.std, run.path / 'predictions.png',
                              num_images=shown)
    plot_lib.save_curves(history, run.path / 'curves.png')
  if report:
    evaluation = evaluate.evaluate_model(
        model, variables, val_loader, data.classes, out_dir=run.path,
        info={'checkpoint': str(checkpoint.resolve_model_dir(run.path)), 'arch': config.model.arch,
              'checkpoint_epoch': best_epoch, 'data': _val_label(data.describe()), 'source': data.describe()})
    log(f'best checkpoint (epoch {best_epoch}) on the val data: accuracy {evaluation.accuracy:.4f}; '
        f'wrote evaluation.json and confusion.png')
