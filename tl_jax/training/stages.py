"""Stages of a recipe made ready to run: initial weights, each stage's optimizer and schedule, and
its compiled steps (shared between stages that would compile the same ones)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional

import jax
import optax
from jax.sharding import Mesh

from tl_jax import losses, optim, parallel
from tl_jax.config import Config
from tl_jax.convert import replace_head, torch_to_flax
from tl_jax.data import mix, on_device
from tl_jax.models import aux_loss_weights, create_model, init_variables
from tl_jax.training import ema as ema_lib
from tl_jax.training.state import TrainState, create_train_state
from tl_jax.training.steps import eval_step, train_step


def initial_variables(arch: str, num_classes: int, seed: int, state_dict: Optional[Mapping] = None,
                      image_size: Optional[int] = None) -> dict:
  """Pretrained backbone (if `state_dict`) with a fresh `num_classes`-way head, as the tutorial does.
  `image_size`: the weights' crop size, for the models whose parameters depend on it (ViT)."""
  model = create_model(arch, num_classes, image_size=image_size)
  fresh = init_variables(model, jax.random.PRNGKey(seed))
  if state_dict is None:
    return fresh
  backbone = torch_to_flax(state_dict, arch, reference=fresh, include_head=False)
  return replace_head(backbone, fresh, arch)


def make_tx(config: Config, index: int, params: Mapping, steps_per_epoch: int,
            schedule_of: Optional[Callable[[float], optax.ScalarOrSchedule]] = None) -> optax.GradientTransformation:
  """Stage `index`'s optimizer (param groups, clipping, accumulation: optim.make_stage_optimizer), with
  its schedule counted from the stage's first optimizer step.

  Args:
    steps_per_epoch: train batches per epoch. With `accumulate: N` an epoch has ceil(batches / N)
      optimizer steps (the last takes the batches left), so the lr still changes on epoch boundaries.
    schedule_of: a param group's lr -> its lr per optimizer step; default: the stage's schedule
      (make_schedule) from that lr. The LR finder passes its sweep.
  """
  stage = config.stages[index]
  if schedule_of is None:
    steps = optim.optimizer_steps_per_epoch(steps_per_epoch, stage.accumulate)
    spec = stage.schedule.model_dump()

    def schedule_of(lr):
      return optim.make_schedule(spec, lr, stage.epochs, steps)

  return optim.make_stage_optimizer(params, config.trainable_stages(index), stage.optimizer.model_dump(),
                                    schedule_of, arch=config.model.arch, clip_grad_norm_to=stage.clip_grad_norm,
                                    accumulate=stage.accumulate, batches_per_epoch=steps_per_epoch)


def is_multi_label(config: Config, data) -> bool:
  """Whether the run is multi-label: `data.multi_label`, or by default what the data is (a labels CSV is);
  a setting the data cannot give is an error."""
  asked = config.data.multi_label
  if asked is None or asked == data.multi_label:
    return data.multi_label
  if asked:
    raise ValueError(f'data.multi_label is true but {config.data.path} has one label per image; pass a labels CSV '
                     '(--data labels.csv with a header path,labels) or leave data.multi_label out')
  raise ValueError(f'data.multi_label is false but {config.data.path} is a labels CSV (several labels per image); '
                   'leave data.multi_label out')


def recipe_loss(config: Config, train_labels, num_classes: int,
                multi_label: bool = False) -> tuple[losses.Loss, Optional[dict]]:
  """The recipe's loss (`loss:`, tl_jax.losses.make_loss; `balanced` weights count `train_labels`) and
  the train step's MixUp/CutMix settings (tl_jax.data.mix.mixing_step's arguments; None: no mixing)."""
  d = config.data
  mixing = None
  if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
    mixing = {'num_classes': num_classes, 'mixup_alpha': d.mixup_alpha, 'cutmix_alpha': d.cutmix_alpha,
              'multi_label': multi_label}
  loss = losses.make_loss(config.loss.model_dump(), train_labels, num_classes, multi_label, mixing is not None)
  return loss, mixing


def stage_lrs(config: Config, index: int) -> list[float]:
  """The learning rate of every epoch of stage `index`, for logging."""
  stage = config.stages[index]
  return optim.epoch_lrs(stage.schedule.model_dump(), stage.optimizer.lr, stage.epochs)


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
  """What a compiled train step depends on besides shapes: the trainable set, BN policy, optimizer and
  the policy for non-finite steps."""
  stage = config.stages[index]
  return (config.trainable_stages(index), stage.bn, stage.optimizer.model_dump_json(),
          stage.schedule.model_dump_json(), stage.epochs, stage.on_nonfinite, stage.clip_grad_norm,
          stage.accumulate,
          stage.ema.model_dump_json() if stage.ema else None)


def setup_stage(config: Config, index: int, model, variables: Mapping, steps_per_epoch: int,
                example_train: Mapping, example_val: Mapping, compiled: Optional[dict] = None,
                opt_state: Any = None, step: int = 0, mesh: Optional[Mesh] = None,
                normalization: Optional[tuple] = None, compile_steps: bool = True,
                ema: Any = None, loss: losses.Loss = losses.cross_entropy,
                mixing: Optional[dict] = None,
                schedule_of: Optional[Callable[[float], optax.ScalarOrSchedule]] = None) -> tuple[TrainState, Stage]:
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
    ema: a restored moving average of the weights (resume); a stage with `ema` otherwise starts
      its own over `variables` (tl_jax.training.ema).
    loss, mixing: the recipe's loss and MixUp/CutMix settings (`recipe_loss`); the same for
      every stage, so not part of the compiled steps' cache key.
    schedule_of: a param group's lr -> its lr per step, in place of the stage's schedule (`make_tx`;
      the LR finder's sweep, with a `compiled` of its own).
  """
  mesh = parallel.make_mesh(1) if mesh is None else mesh
  stage_config = config.stages[index]
  tx = make_tx(config, index, variables['params'], steps_per_epoch, schedule_of)
  # Dropout's key: one per stage; each step folds in its step number (train.dropout_key), so a
  # resumed stage draws the masks the uninterrupted one would have.
  if stage_config.ema is not None and ema is None:
    ema = ema_lib.init(variables)
  state = create_train_state(model, variables, tx, jax.random.fold_in(jax.random.PRNGKey(config.seed), index),
                             ema=ema if stage_config.ema is not None else None)
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
    if mixing is not None:   # only the train step mixes; inside the normalisation, on normalised floats
      train = mix.mixing_step(train, **mixing)
    if normalization is not None:
      train, evaluate = (on_device.normalizing_step(f, *normalization) for f in (train, evaluate))
    train_fn = parallel.jit_train_step(train, mesh, model=model, trainable=trainable,
                                       bn_train=stage_config.bn == 'train', aux_weights=aux_loss_weights(model),
                                       on_nonfinite=stage_config.on_nonfinite,
                                       ema=ema_lib.settings(stage_config.ema, steps_per_epoch, stage_config.accumulate), loss=loss)
    eval_fn = parallel.jit_eval_step(evaluate, mesh, model=model, loss=loss)
    train_fn, seconds['train_step'] = _compile(train_fn, state, parallel.shard_batch(example_train, mesh))
    eval_fn, seconds['eval_step'] = _compile(eval_fn, state, parallel.shard_batch(example_val, mesh))
    compiled[key] = (train_fn, eval_fn)
  train_fn, eval_fn = compiled[key] if compile_steps else (None, None)
  first_epoch = sum(s.epochs for s in config.stages[:index])
  return state, Stage(index, stage_config.name, first_epoch, stage_config.epochs, stage_lrs(config, index),
                      train_fn, eval_fn, seconds, mesh)
