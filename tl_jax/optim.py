"""Strategies -> label trees -> optax: what learns, and at which learning rate.

Freezing belongs to the optimizer: every top-level module of the model gets a stage label
(ResNet: 'stem', 'layer1'..'layer4', 'head'; VGG: 'block1'..'block5', 'classifier', 'head';
a TransferModel: its backbone's stages and each head submodule by name; see
`tl_jax.models.stage_tree`), a strategy says which stages learn, and
`optax.partition` gives the frozen ones `set_to_zero()` (no update, no momentum buffer).
Skipping the backward pass through frozen stages is the train step's job
(`trainable_mask` tells it what to differentiate).

The trainable stages get torch's SGD / Adam / AdamW (`make_optimizer`), built from optax
transforms in torch's order, with a lr from a torch scheduler stepped once per epoch
(`make_schedule`); `OPTIMIZERS` and `SCHEDULES` list their arguments and defaults.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tl_jax import models

TRAINABLE, FROZEN = 'trainable', 'frozen'

# Which stages learn under each strategy; FINETUNE_ALL stands for every stage of the model.
FINETUNE_ALL = '*'
STRATEGY_STAGES: dict[str, tuple[str, ...]] = {
    'frozen': (models.HEAD,),
    'finetune': (FINETUNE_ALL,),
}


def _all_known_stages() -> tuple[str, ...]:
  stages = [s for arch in models.ARCHS for s in models.arch_stages(arch)] + [models.FEATURES]
  return tuple(dict.fromkeys(stages))


def trainable_stages(strategy: str | Sequence[str], known: Optional[Sequence[str]] = None) -> tuple[str, ...]:
  """A strategy name, or an explicit list of stages/groups (partial unfreezing), -> names that learn.

  Args:
    strategy: 'frozen' (the head), 'finetune' (everything), or names such as ['block5', 'classifier',
      'head'] for a VGG, ['layer4', 'head'] for a ResNet, or a custom head's submodule names.
    known: the names the model has (`models.stage_groups`); default: those of every built-in arch.
  """
  if isinstance(strategy, str):
    if strategy not in STRATEGY_STAGES:
      raise ValueError(f'unknown strategy {strategy!r}; choose one of {sorted(STRATEGY_STAGES)}')
    return STRATEGY_STAGES[strategy]
  known = tuple(known) if known is not None else _all_known_stages()
  unknown = sorted(set(strategy) - set(known))
  if unknown:
    raise ValueError(f'unknown stages {unknown}; stages are {known}')
  return tuple(strategy)


def trainable_mask(params: Mapping, strategy: str | Sequence[str]) -> dict:
  """Module -> whether it learns: a bool per top-level module (ResNet, VGG), nested under
  'backbone' / 'head' for a TransferModel."""
  tree = models.stage_tree(params)
  groups = models.stage_groups(tree)
  names = trainable_stages(strategy, known=tuple(groups))
  if FINETUNE_ALL in names:
    learning = {s for selected in groups.values() for s in selected}
  else:
    learning = {s for name in names for s in groups[name]}

  def mask(node):
    return {k: mask(v) for k, v in node.items()} if isinstance(node, Mapping) else node in learning

  return mask(tree)


def param_labels(params: Mapping, strategy: str | Sequence[str]) -> dict:
  """A label tree with the structure of `params`: TRAINABLE or FROZEN on every leaf."""

  def label(tree, mask):
    if not isinstance(tree, Mapping):   # a leaf (an array, or a placeholder such as None)
      return TRAINABLE if mask else FROZEN
    return {k: label(v, mask if isinstance(mask, bool) else mask[k]) for k, v in tree.items()}

  return label(params, trainable_mask(params, strategy))


# ---------------------------------------------------------------------------------- arguments


class OptimError(ValueError):
  """An optimizer or schedule argument that torch (or the schedule's meaning) rejects."""


class _Required:
  """Marks an argument that has no default."""

  def __repr__(self):
    return 'required'


REQUIRED = _Required()

# torch.optim's keyword arguments and defaults (torch 2.x). `lr` is listed because configs give
# it here, but the rate an optimizer applies comes from its schedule (see make_optimizer).
OPTIMIZERS: dict[str, dict[str, Any]] = {
    'sgd': {'lr': 1e-3, 'momentum': 0.0, 'dampening': 0.0, 'weight_decay': 0.0, 'nesterov': False},
    'adam': {'lr': 1e-3, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 0.0, 'amsgrad': False},
    'adamw': {'lr': 1e-3, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 1e-2, 'amsgrad': False},
}

# Per-epoch schedules: torch.optim.lr_scheduler's arguments (T_max None: the epochs the schedule
# runs, i.e. the stage's epochs after warm-up) and the linear warm-up every schedule accepts
# (warmup_start_factor None: 1 / (warmup_epochs + 1), see make_schedule).
_WARMUP: dict[str, Any] = {'warmup_epochs': 0, 'warmup_start_factor': None}
SCHEDULES: dict[str, dict[str, Any]] = {
    'constant': {**_WARMUP},
    'step': {'step_size': REQUIRED, 'gamma': 0.1, **_WARMUP},
    'multistep': {'milestones': REQUIRED, 'gamma': 0.1, **_WARMUP},
    'exponential': {'gamma': REQUIRED, **_WARMUP},
    'cosine': {'T_max': None, 'eta_min': 0.0, **_WARMUP},
}


def _with_defaults(kind: str, spec: Mapping, table: Mapping[str, Mapping[str, Any]]) -> dict:
  """`spec` ({'name': ..., **kwargs}) with every default filled; unknown names and keys named."""
  if not isinstance(spec, Mapping) or 'name' not in spec:
    raise OptimError(f'{kind}: expected a mapping with a \'name\' (one of {sorted(table)}), got {spec!r}')
  name = spec['name']
  if not isinstance(name, str) or name not in table:
    raise OptimError(f'unknown {kind} {name!r}; choose one of {sorted(table)}')
  allowed = table[name]
  unknown = sorted(set(spec) - set(allowed) - {'name'})
  if unknown:
    raise OptimError(f'{kind} {name}: unknown argument(s) {unknown}; {name} takes {sorted(allowed)}')
  missing = sorted(k for k, v in allowed.items() if v is REQUIRED and k not in spec)
  if missing:
    raise OptimError(f'{kind} {name}: missing argument(s) {missing}')
  return {'name': name, **allowed, **{k: v for k, v in spec.items() if k != 'name'}}


def _number(kind: str, key: str, value, *, integer: bool = False):
  ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
  if not ok:
    raise OptimError(f'{kind}: {key} must be {"an integer" if integer else "a number"}, got {value!r}')
  return value


def _check(condition: bool, kind: str, key: str, rule: str, value) -> None:
  if not condition:
    raise OptimError(f'{kind}: {key} must be {rule}, got {value!r}')


def resolve_optimizer(optimizer: Mapping) -> dict:
  """{'name', **torch's kwargs} -> the same with torch's defaults filled, checked as torch checks them.

  Raises OptimError (a ValueError) naming the argument and value for what torch.optim rejects
  (negative lr/momentum/weight_decay/eps, betas outside [0, 1), nesterov without momentum or
  with dampening), and for an unknown name or keyword, listing the allowed ones.
  """
  spec = _with_defaults('optimizer', optimizer, OPTIMIZERS)
  kind = f'optimizer {spec["name"]}'
  for key in ('lr', 'weight_decay', 'momentum', 'dampening', 'eps'):
    if key in spec:
      _number(kind, key, spec[key])
  for key in ('nesterov', 'amsgrad'):
    if key in spec and not isinstance(spec[key], bool):
      raise OptimError(f'{kind}: {key} must be true or false, got {spec[key]!r}')
  # `not x >= 0` rather than `x < 0`: NaN is rejected too (torch's Adam does; its SGD lets it in).
  for key in ('lr', 'weight_decay', 'momentum', 'eps'):
    if key in spec:
      _check(spec[key] >= 0, kind, key, '>= 0', spec[key])
  if spec['name'] == 'sgd' and spec['nesterov']:
    _check(spec['momentum'] > 0, kind, 'momentum', '> 0 with nesterov=True', spec['momentum'])
    _check(spec['dampening'] == 0, kind, 'dampening', '0 with nesterov=True', spec['dampening'])
  if 'betas' in spec:
    betas = spec['betas']
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
      raise OptimError(f'{kind}: betas must be a pair [beta1, beta2], got {betas!r}')
    for i, beta in enumerate(betas):
      _number(kind, f'betas[{i}]', beta)
      _check(0 <= beta < 1, kind, f'betas[{i}]', 'in [0, 1)', beta)
    spec['betas'] = tuple(float(b) for b in betas)
  return spec


def resolve_schedule(schedule: Mapping | None, epochs: int) -> dict:
  """{'name', **kwargs} (None: constant) -> the same with defaults filled, for a stage of `epochs`.

  T_max defaults to the epochs after warm-up and warmup_start_factor to 1 / (warmup_epochs + 1).
  Raises OptimError naming the argument and value.
  """
  _number('schedule', 'epochs', epochs, integer=True)
  _check(epochs >= 1, 'schedule', 'epochs', '>= 1', epochs)
  spec = _with_defaults('schedule', {'name': 'constant'} if schedule is None else schedule, SCHEDULES)
  kind = f'schedule {spec["name"]}'
  warmup = _number(kind, 'warmup_epochs', spec['warmup_epochs'], integer=True)
  _check(warmup >= 0, kind, 'warmup_epochs', '>= 0', warmup)
  if spec['warmup_start_factor'] is None:
    spec['warmup_start_factor'] = 1 / (warmup + 1)
  factor = _number(kind, 'warmup_start_factor', spec['warmup_start_factor'])
  _check(0 < factor <= 1, kind, 'warmup_start_factor', 'in (0, 1] (torch\'s LinearLR start_factor)', factor)
  if 'gamma' in spec:
    _check(_number(kind, 'gamma', spec['gamma']) > 0, kind, 'gamma', '> 0', spec['gamma'])
  if 'step_size' in spec:
    _check(_number(kind, 'step_size', spec['step_size'], integer=True) >= 1, kind, 'step_size', '>= 1',
           spec['step_size'])
  if 'milestones' in spec:
    milestones = spec['milestones']
    if not isinstance(milestones, (list, tuple)) or not milestones:
      raise OptimError(f'{kind}: milestones must be a non-empty list of epochs, got {milestones!r}')
    for m in milestones:
      _number(kind, 'milestones', m, integer=True)
    _check(all(a < b for a, b in zip((0,) + tuple(milestones), milestones)), kind, 'milestones',
           'increasing epochs >= 1', milestones)
    spec['milestones'] = tuple(milestones)
  if spec['name'] == 'cosine':
    if spec['T_max'] is None:
      spec['T_max'] = max(epochs - warmup, 1)
    _check(_number(kind, 'T_max', spec['T_max'], integer=True) >= 1, kind, 'T_max', '>= 1', spec['T_max'])
    _check(_number(kind, 'eta_min', spec['eta_min']) >= 0, kind, 'eta_min', '>= 0', spec['eta_min'])
  return spec


def schedule_warnings(schedule: Mapping | None, epochs: int) -> list[str]:
  """What in a valid schedule has no effect within a stage of `epochs` (a milestone never reached, ...)."""
  spec = resolve_schedule(schedule, epochs)
  warmup, kind, notes = spec['warmup_epochs'], f'schedule {spec["name"]}', []
  if warmup >= epochs:
    notes.append(f'{kind}: warmup_epochs {warmup} covers the whole stage of {epochs} epochs')
  # The schedule's own epochs count from the end of the warm-up.
  late = [m for m in spec.get('milestones', ()) if warmup + m >= epochs]
  if late:
    notes.append(f'{kind}: milestones {late} are never reached in a stage of {epochs} epochs'
                 + (f' ({warmup} of them warm-up)' if warmup else ''))
  if 'step_size' in spec and warmup + spec['step_size'] >= epochs:
    notes.append(f'{kind}: step_size {spec["step_size"]} is never reached in a stage of {epochs} epochs'
                 + (f' ({warmup} of them warm-up)' if warmup else ''))
  return notes


# ---------------------------------------------------------------------------------- schedules


def cosine_annealing_schedule(lr: float, T_max: int, eta_min: float = 0.0) -> optax.Schedule:
  """torch's CosineAnnealingLR as a function of the epoch: eta_min + (lr - eta_min) (1 + cos(pi e / T_max)) / 2.

  torch's recursive form equals this closed form at every epoch, past T_max too, where the lr
  climbs back (period 2 T_max); optax.cosine_decay_schedule holds its end value there instead.
  """
  def schedule(epoch):
    return eta_min + (lr - eta_min) * (1 + jnp.cos(jnp.pi * epoch / T_max)) / 2

  return schedule


def _epoch_schedule(spec: Mapping, lr: float) -> optax.Schedule:
  """The lr as a function of the epoch within the stage (0 = its first epoch)."""
  name = spec['name']
  if name == 'constant':
    main = optax.constant_schedule(lr)
  elif name == 'step':
    main = optax.exponential_decay(lr, spec['step_size'], spec['gamma'], staircase=True)
  elif name == 'multistep':
    main = optax.piecewise_constant_schedule(lr, {m: spec['gamma'] for m in spec['milestones']})
  elif name == 'exponential':
    main = optax.exponential_decay(lr, 1, spec['gamma'])
  else:
    main = cosine_annealing_schedule(lr, spec['T_max'], spec['eta_min'])
  warmup = spec['warmup_epochs']
  if not warmup:
    return main
  # SequentialLR([LinearLR(start_factor=f, total_iters=N), main], milestones=[N]): epochs 0..N-1
  # ramp linearly from f * lr towards lr, and `main` starts from its own epoch 0 at epoch N.
  ramp = optax.linear_schedule(lr * spec['warmup_start_factor'], lr, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def make_schedule(schedule: Mapping | None, lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """A torch lr scheduler stepped once per epoch, as a function of the stage's optimizer step.

  The lr is constant within an epoch and changes at epoch boundaries, as torch's
  `scheduler.step()` after each epoch. Step 0 is the stage's first step (each stage builds
  a fresh optimizer and schedule).

  Args:
    schedule: {'name': 'step', 'step_size', 'gamma'=0.1} (StepLR),
      {'name': 'multistep', 'milestones', 'gamma'=0.1} (MultiStepLR),
      {'name': 'exponential', 'gamma'} (ExponentialLR),
      {'name': 'cosine', 'T_max'=epochs after warm-up, 'eta_min'=0} (CosineAnnealingLR, also past T_max),
      {'name': 'constant'} or None. Each may add 'warmup_epochs': N and 'warmup_start_factor': f
      (default 1 / (N + 1)): torch's SequentialLR([LinearLR(start_factor=f, total_iters=N), <schedule>],
      milestones=[N]), so the schedule's own epochs (step_size, milestones, T_max) count from epoch N.
    lr: the base learning rate (torch's optimizer lr).
    epochs: the stage's epochs (the default T_max; the schedule goes on past them).
    steps_per_epoch: optimizer steps per epoch.
  """
  spec = resolve_schedule(schedule, epochs)
  _check(_number('schedule', 'lr', lr) >= 0, 'schedule', 'lr', '>= 0', lr)
  _number('schedule', 'steps_per_epoch', steps_per_epoch, integer=True)
  _check(steps_per_epoch >= 1, 'schedule', 'steps_per_epoch', '>= 1', steps_per_epoch)
  per_epoch = _epoch_schedule(spec, lr)
  # The epoch as a float of the default dtype: optax divides the int32 count it is given, which
  # JAX promotes to float32 even where float64 is on.
  return lambda step: per_epoch(jnp.asarray(step // steps_per_epoch, dtype=float))


def epoch_lrs(schedule: Mapping | None, lr: float, epochs: int) -> list[float]:
  """The lr of each of the stage's epochs (for logs and history.json), as make_schedule gives it.

  Evaluated in float64, so the values are torch's to rounding, not float32's.
  """
  spec = resolve_schedule(schedule, epochs)
  _check(_number('schedule', 'lr', lr) >= 0, 'schedule', 'lr', '>= 0', lr)
  with jax.enable_x64(True):
    values = _epoch_schedule(spec, float(lr))(jnp.arange(epochs, dtype=float))
    return [float(v) for v in np.broadcast_to(np.asarray(values, np.float64), (epochs,))]


def step_lr_schedule(lr: float, step_size_epochs: int, gamma: float, steps_per_epoch: int,
                     num_epochs: int) -> optax.Schedule:
  """torch's StepLR(step_size, gamma), stepped once per epoch, as a function of the optimizer step."""
  return make_schedule({'name': 'step', 'step_size': step_size_epochs, 'gamma': gamma}, lr, num_epochs,
                       steps_per_epoch)


# ---------------------------------------------------------------------------------- optimizers


class DampenedTraceState(NamedTuple):
  count: jax.Array
  trace: optax.Params


def dampened_trace(momentum: float, dampening: float) -> optax.GradientTransformation:
  """torch SGD's momentum buffer with dampening: buf = g at the first step, then m * buf + (1 - d) * g.

  optax.trace has no dampening, and a dampened buffer started at zero would take (1 - d) * g on the
  first step where torch copies g.
  """
  def init_fn(params):
    return DampenedTraceState(count=jnp.zeros([], jnp.int32), trace=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    first = state.count == 0
    trace = jax.tree.map(lambda g, t: jnp.where(first, g, momentum * t + (1 - dampening) * g),
                         updates, state.trace)
    return trace, DampenedTraceState(count=optax.safe_increment(state.count), trace=trace)

  return optax.GradientTransformation(init_fn, update_fn)


class TorchAmsgradState(NamedTuple):
  count: jax.Array
  mu: optax.Params
  nu: optax.Params
  nu_max: optax.Params


def scale_by_torch_amsgrad(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """torch's Adam(amsgrad=True): the max of the raw second moments, bias-corrected with the current step.

  optax.scale_by_amsgrad takes the max of the bias-corrected moments instead (its default) or
  drops the correction; both differ from torch once the second moment's correction changes.
  """
  def init_fn(params):
    zeros = optax.tree.zeros_like(params)
    return TorchAmsgradState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros, nu_max=zeros)

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_max_hat = optax.tree.bias_correction(nu_max, b2, count)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_max_hat)
    return updates, TorchAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


def _decayed_weights(weight_decay: float) -> optax.GradientTransformation:
  """u + wd * p (torch skips the term when wd is 0, so do we)."""
  return optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity()


def _sgd(schedule, momentum, dampening, weight_decay, nesterov) -> optax.GradientTransformation:
  if not momentum:
    buffer = optax.identity()
  elif not dampening:
    # optax.trace is torch's buffer when undampened: buf = m * buf + g from zero (first step: g),
    # and nesterov's g + m * buf.
    buffer = optax.trace(decay=momentum, nesterov=nesterov)
  else:
    buffer = dampened_trace(momentum, dampening)
  # torch's weight_decay joins the gradient before the momentum buffer.
  return optax.chain(_decayed_weights(weight_decay), buffer, optax.scale_by_learning_rate(schedule))


def _adam(schedule, betas, eps, weight_decay, amsgrad, decoupled) -> optax.GradientTransformation:
  b1, b2 = betas
  scale = scale_by_torch_amsgrad(b1, b2, eps) if amsgrad else optax.scale_by_adam(b1, b2, eps)
  if decoupled:
    # AdamW: torch multiplies p by (1 - lr * wd) besides the Adam step; -lr * (adam + wd * p) is the
    # same change, and wd never enters the moments (optax.adamw's order).
    return optax.chain(scale, _decayed_weights(weight_decay), optax.scale_by_learning_rate(schedule))
  # Adam's weight_decay joins the gradient before the moments (L2, coupled).
  return optax.chain(_decayed_weights(weight_decay), scale, optax.scale_by_learning_rate(schedule))


def torch_optimizer(optimizer: Mapping, schedule: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """torch.optim.SGD / Adam / AdamW with the lr of `schedule`, on every leaf it is given."""
  spec = resolve_optimizer(optimizer)
  if spec['name'] == 'sgd':
    return _sgd(schedule, spec['momentum'], spec['dampening'], spec['weight_decay'], spec['nesterov'])
  return _adam(schedule, spec['betas'], spec['eps'], spec['weight_decay'], spec['amsgrad'],
               decoupled=spec['name'] == 'adamw')


def make_optimizer(params: Mapping, trainable: str | Sequence[str], optimizer: Mapping,
                   schedule: optax.ScalarOrSchedule = None) -> optax.GradientTransformation:
  """torch's optimizer on the trainable stages; frozen ones get set_to_zero (no update, no state).

  Args:
    params: the model's params (for the label tree).
    trainable: a strategy name or a list of stages, as `param_labels` takes.
    optimizer: {'name': 'sgd' | 'adam' | 'adamw', **torch's keyword arguments} (see OPTIMIZERS).
      An 'lr' in it is checked only: the rate comes from `schedule`, which make_schedule builds
      from that lr.
    schedule: the lr per step (make_schedule), or a constant lr.
  """
  if schedule is None:
    raise OptimError('make_optimizer: no schedule (lr) given')
  return optax.partition({TRAINABLE: torch_optimizer(optimizer, schedule), FROZEN: optax.set_to_zero()},
                         param_labels(params, trainable))
