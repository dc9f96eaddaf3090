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
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

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
    optimizer: {'name': 'sgd' | 'adam' | 'adamw', **torch's keyword arguments} (see OPTIMIZERS),
      and optionally norm_weight_decay / bias_weight_decay / groups (`optimizer_labels`). An 'lr' in
      it is checked only: the rate comes from `schedule`, which make_schedule builds from that lr; a
      group with its own lr gets `schedule` times its lr / that lr.
    schedule: the lr per step (make_schedule), or a constant lr.
  """
  if schedule is None:
    raise OptimError('make_optimizer: no schedule (lr) given')
  top = resolve_optimizer(torch_kwargs(optimizer))['lr']

  def schedule_of(lr):
    if lr == top:
      return schedule
    if not top:
      raise OptimError('optimizer: a group\'s lr is relative to the optimizer\'s lr, which is 0')
    return (lambda step: schedule(step) * (lr / top)) if callable(schedule) else schedule * lr / top

  return make_stage_optimizer(params, trainable, optimizer, schedule_of)


# ------------------------------------------------------------------------- parameter groups

# Per-stage optimizer arguments, as torch's param_groups: `groups` (each overrides any argument of
# the optimizer for the stages it names), `layer_decay` (timm's param_groups_layer_decay: the lr of a
# stage `depth` stages before the head is lr * layer_decay ** depth) and the weight-decay masks
# (torchvision's reference-script flags norm_weight_decay / bias_weight_decay).
GROUP_KEYS = ('groups', 'layer_decay', 'norm_weight_decay', 'bias_weight_decay')
NORM, BIAS = 'norm', 'bias'
BASE = 'base'   # the label of the stages no group names


def torch_kwargs(optimizer: Mapping) -> dict:
  """`optimizer` without the keys torch.optim's constructor does not take (GROUP_KEYS)."""
  return {k: v for k, v in optimizer.items() if k not in GROUP_KEYS}


def norm_mask(params: Mapping) -> dict:
  """Leaf -> whether it belongs to a normalisation layer (BatchNorm, LayerNorm, GroupNorm).

  The rule: Flax's norm modules hold a 1-D `scale` (torch's weight) and a `bias`, and no other
  module of ours has a `scale`; so a 1-D `scale` and the `bias` beside it are norm parameters. This
  equals torchvision's `isinstance(module, norm_classes)` on every family (tests/test_optim_toolkit.py).
  """
  def walk(node):
    names = {k for k, v in node.items() if not isinstance(v, Mapping)}
    has_scale = 'scale' in names and np.ndim(node['scale']) == 1
    return {k: walk(v) if isinstance(v, Mapping) else has_scale and k in ('scale', 'bias')
            for k, v in node.items()}

  return walk(params)


def bias_mask(params: Mapping) -> dict:
  """Leaf -> whether it is named `bias`, as torchvision's `custom_keys_weight_decay=[('bias', wd)]`
  matches a parameter's own name (so MultiheadAttention's `in_proj_bias` is not one)."""
  def walk(node):
    return {k: walk(v) if isinstance(v, Mapping) else k == 'bias' for k, v in node.items()}

  return walk(params)


def stage_depths(stages: Sequence[str], head: Sequence[str]) -> dict[str, int]:
  """Stage -> its depth for layer decay: 0 for the head stages, 1 for the last stage before them, ...

  Args:
    stages: the model's stages, input to output (`models.arch_stages(arch)`).
    head: the stages that get the stage's own lr (`models.HEAD`; a TransferModel's head submodules).
  """
  backbone = [s for s in stages if s not in head]
  depths = {s: len(backbone) - i for i, s in enumerate(backbone)}
  depths.update({s: 0 for s in head})
  return depths


def resolve_groups(optimizer: Mapping, known: Mapping[str, Sequence[str]], where: str = 'optimizer') -> dict:
  """{stage: group index} for `optimizer['groups']`, checked: every name known, no stage twice.

  Args:
    optimizer: the optimizer's spec (its 'groups': [{'stages': [...], **arguments}, ...]).
    known: names a group may use -> the stages they stand for (`models.stage_groups`: each stage,
      'features' and 'head').
    where: the key path for the messages.
  """
  groups = optimizer.get('groups') or []
  if groups and optimizer.get('layer_decay') is not None:
    raise OptimError(f'{where}: give groups or layer_decay, not both (layer_decay sets each stage\'s lr itself)')
  owner: dict[str, int] = {}
  for i, group in enumerate(groups):
    names = group.get('stages') if isinstance(group, Mapping) else None
    if not isinstance(names, (list, tuple)) or not names:
      raise OptimError(f'{where}.groups[{i}].stages: name at least one stage, got {names!r}')
    for name in names:
      if name not in known:
        raise OptimError(f'{where}.groups[{i}].stages: no stage {name!r}; stages are '
                         f'{", ".join(s for s in known)}')
      for stage in known[name]:
        if stage in owner:
          raise OptimError(f'{where}.groups[{i}].stages: stage {stage!r} is already in groups[{owner[stage]}]; '
                           'name each stage in one group')
        owner[stage] = i
  return owner


def check_param_groups(optimizer: Mapping, arch: str, where: str = 'optimizer') -> None:
  """OptimError (naming `where`'s key path) for groups / layer_decay that `arch` cannot take: a stage
  it does not have, a stage in two groups, both keys together, a group's arguments torch rejects."""
  stages = models.arch_stages(arch)
  resolve_groups(optimizer, models.stage_groups({s: s for s in stages}), where)
  for i, group in enumerate(optimizer.get('groups') or []):
    overrides = {k: v for k, v in group.items() if k != 'stages' and v is not None}
    try:
      resolve_optimizer({**torch_kwargs(optimizer), **overrides})
    except OptimError as e:
      raise OptimError(f'{where}.groups[{i}]: {e}') from None


def _label_specs(optimizer: Mapping, stages: Sequence[str], owner: Mapping[str, int],
                 depths: Optional[Mapping[str, int]]) -> tuple[dict[str, str], dict[str, dict]]:
  """(stage -> its group's label, label -> torch's arguments with lr) for every one of `stages`."""
  base = torch_kwargs(optimizer)
  stage_label, specs = {}, {}
  for stage in stages:
    if depths is not None:
      depth = depths[stage]
      label, spec = f'depth{depth}', {**base, 'lr': base['lr'] * optimizer['layer_decay'] ** depth}
    elif stage in owner:
      index = owner[stage]
      label = f'group{index}'
      spec = {**base, **{k: v for k, v in optimizer['groups'][index].items() if k != 'stages' and v is not None}}
    else:
      label, spec = BASE, base
    stage_label[stage] = label
    specs[label] = spec
  return stage_label, specs


def optimizer_labels(params: Mapping, trainable: str | Sequence[str], optimizer: Mapping,
                     arch: Optional[str] = None) -> tuple[dict, dict[str, dict]]:
  """The label tree of a stage's optimizer and each label's torch arguments.

  A leaf's label is FROZEN, or its param group: `BASE`, `group<i>` (optimizer.groups[i]) or
  `depth<d>` (layer_decay), followed by '.norm' / '.bias' where norm_weight_decay /
  bias_weight_decay give it its own weight decay. A parameter named `bias` takes bias_weight_decay
  even inside a norm layer, as torchvision's reference script checks its custom keys first.

  Args:
    params: the model's params.
    trainable: a strategy name or a list of stages (`param_labels`).
    optimizer: {'name', **torch's arguments, 'groups', 'layer_decay', 'norm_weight_decay',
      'bias_weight_decay'}.
    arch: the model's arch: its stages' order gives layer_decay's depths (needed for layer_decay).
  """
  spec = resolve_optimizer(torch_kwargs(optimizer))
  spec.update({k: optimizer.get(k) for k in GROUP_KEYS})
  tree = models.stage_tree(params)
  known = models.stage_groups(tree)
  owner = resolve_groups(spec, known)
  depths = None
  if spec['layer_decay'] is not None:
    decay = _number('optimizer', 'layer_decay', spec['layer_decay'])
    _check(0 < decay <= 1, 'optimizer', 'layer_decay', 'in (0, 1]', decay)
    if arch is None:
      raise OptimError('optimizer: layer_decay needs the arch (the order of its stages)')
    order = [s for s in models.arch_stages(arch) if s != models.HEAD] + list(known[models.HEAD])
    depths = stage_depths(order, known[models.HEAD])
  for key in ('norm_weight_decay', 'bias_weight_decay'):
    if spec[key] is not None:
      _check(_number('optimizer', key, spec[key]) >= 0, 'optimizer', key, '>= 0', spec[key])
  stages = [s for selected in known.values() for s in selected]
  stage_label, base_specs = _label_specs(spec, list(dict.fromkeys(stages)), owner, depths)
  for label in base_specs:
    base_specs[label] = resolve_optimizer(base_specs[label])
  coarse = param_labels(params, trainable)
  norms, biases = norm_mask(params), bias_mask(params)
  specs: dict[str, dict] = {}

  def label(node, stage, kind, is_norm, is_bias):
    if isinstance(node, Mapping):
      return {k: label(v, stage[k] if isinstance(stage, Mapping) else stage,
                       kind[k] if isinstance(kind, Mapping) else kind, is_norm[k], is_bias[k]) for k, v in node.items()}
    if kind == FROZEN:
      return FROZEN
    name, group_spec = stage_label[stage], base_specs[stage_label[stage]]
    if is_bias and spec['bias_weight_decay'] is not None:
      name, group_spec = f'{name}.{BIAS}', {**group_spec, 'weight_decay': spec['bias_weight_decay']}
    elif is_norm and spec['norm_weight_decay'] is not None:
      name, group_spec = f'{name}.{NORM}', {**group_spec, 'weight_decay': spec['norm_weight_decay']}
    specs[name] = group_spec
    return name

  return label(params, tree, coarse, norms, biases), specs


# ------------------------------------------------------------------------ clipping, accumulation


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_(params, max_norm): every gradient times
  min(max_norm / (total_norm + 1e-6), 1), total_norm the 2-norm of all of them together.

  optax.clip_by_global_norm scales by max_norm / total_norm, only above max_norm, and without the 1e-6.
  """
  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    total_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves)) if leaves else jnp.zeros([])
    coef = jnp.minimum(max_norm / (total_norm + 1e-6), 1.0)
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _before(first: optax.GradientTransformation, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`first` (stateless) then `inner`, with `inner`'s state alone: adding or removing `first` (e.g.
  clipping, on --resume after a stop on a non-finite loss) keeps the optimizer state's structure."""
  def update_fn(updates, state, params=None, **extra):
    updates, _ = first.update(updates, optax.EmptyState(), params)
    return inner.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def optimizer_steps_per_epoch(batches_per_epoch: int, accumulate: int = 1) -> int:
  """Optimizer steps in an epoch of `batches_per_epoch` with `accumulate` batches per step: the last
  step of an epoch takes the batches left (fewer than `accumulate`), so no step spans two epochs."""
  return -(-batches_per_epoch // accumulate)


def accumulation_sizes(accumulate: int, batches_per_epoch: Optional[int] = None) -> Callable:
  """Optimizer step -> how many batches it accumulates: `accumulate`, and at an epoch's end the
  batches left (`batches_per_epoch` not divisible by it); None: always `accumulate`."""
  if batches_per_epoch is None:
    return lambda step: accumulate
  steps = optimizer_steps_per_epoch(batches_per_epoch, accumulate)
  last = batches_per_epoch - accumulate * (steps - 1)
  return lambda step: jnp.where(step % steps == steps - 1, last, accumulate)


class GroupMeanState(NamedTuple):
  count: jax.Array


def _mean_of_group(sizes: Callable) -> optax.GradientTransformation:
  """Summed gradients of a step's batches -> their mean: divided by sizes(step), the step counted
  here (inside optax.MultiSteps it moves on only when a step is taken)."""
  def init_fn(params):
    return GroupMeanState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    size = sizes(state.count)
    return (jax.tree.map(lambda g: g / jnp.asarray(size, g.dtype), updates),
            GroupMeanState(optax.safe_increment(state.count)))

  return optax.GradientTransformation(init_fn, update_fn)


def accumulated(inner: optax.GradientTransformation, accumulate: int,
                batches_per_epoch: Optional[int] = None) -> optax.GradientTransformation:
  """One step of `inner` per `accumulate` batches on the mean of their gradients (optax.MultiSteps),
  as torch's loop with `loss / accumulate` and `optimizer.step()` every `accumulate` batches.

  The gradients are summed and divided at the step (not averaged as they come, optax's default), so
  a batch whose update on_nonfinite: skip_step drops adds nothing and the others keep their weight
  1 / accumulate, as a skipped `backward()` would. With `batches_per_epoch`, an epoch's last step
  takes the batches left, divided by their count (timm's loop), so every step lies in one epoch.
  """
  sizes = accumulation_sizes(accumulate, batches_per_epoch)
  return optax.MultiSteps(optax.chain(_mean_of_group(sizes), inner), every_k_schedule=sizes,
                          use_grad_mean=False, accumulator_dtype=jnp.result_type(float)).gradient_transformation()


def _labels_by_path(labels: Mapping) -> Callable:
  """A label function for optax.partition that looks each leaf's label up by its path, so it also
  labels a tree with optax's masked-out leaves (the trainable part of the params)."""
  def fn(tree):
    def lookup(path, _):
      node = labels
      for key in path:
        node = node[key.key]
      return node
    return jax.tree_util.tree_map_with_path(lookup, tree)

  return fn


def make_stage_optimizer(params: Mapping, trainable: str | Sequence[str], optimizer: Mapping,
                         schedule_of: Callable[[float], optax.ScalarOrSchedule], *, arch: Optional[str] = None,
                         clip_grad_norm_to: Optional[float] = None, accumulate: int = 1,
                         batches_per_epoch: Optional[int] = None) -> optax.GradientTransformation:
  """A stage's whole optimizer: param groups, clipping and accumulation on the trainable params,
  set_to_zero on the frozen ones.

  Per trainable step: gradients summed over `accumulate` batches and divided by their count
  (`accumulated`), clipped as torch's clip_grad_norm_ (`clip_grad_norm`), then each param group's
  torch optimizer with its own lr schedule.

  Args:
    params, trainable, optimizer, arch: as `optimizer_labels` takes them.
    schedule_of: a group's base lr -> its lr per optimizer step (make_schedule with that lr: torch's
      schedulers scale every group's lr, each from its own initial lr).
    clip_grad_norm_to: max_norm, or None.
    accumulate: batches per optimizer step.
    batches_per_epoch: for `accumulated`'s last step of an epoch; None: every step takes `accumulate`.
  """
  labels, specs = optimizer_labels(params, trainable, optimizer, arch)
  transforms = {label: torch_optimizer(spec, schedule_of(spec['lr'])) for label, spec in specs.items()}
  if not transforms:
    learn = optax.set_to_zero()
  elif len(transforms) == 1:
    learn, = transforms.values()   # one group: the plain optimizer (and its state)
  else:
    learn = optax.partition(transforms, _labels_by_path(labels))
  if clip_grad_norm_to is not None:
    _check(_number('clip_grad_norm', 'max_norm', clip_grad_norm_to) > 0, 'clip_grad_norm', 'max_norm', '> 0',
           clip_grad_norm_to)
    learn = _before(clip_grad_norm(clip_grad_norm_to), learn)
  _number('accumulate', 'accumulate', accumulate, integer=True)
  _check(accumulate >= 1, 'accumulate', 'accumulate', '>= 1', accumulate)
  if accumulate > 1:
    learn = accumulated(learn, accumulate, batches_per_epoch)
  coarse = jax.tree.map(lambda label: FROZEN if label == FROZEN else TRAINABLE, labels)
  return optax.partition({TRAINABLE: learn, FROZEN: optax.set_to_zero()}, coarse)
