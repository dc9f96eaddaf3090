"""The training recipe: a validated schema, YAML files in configs/, and command-line overrides.

A recipe is a model, a data section and a list of stages; each stage has its own epochs, trainable
stages, BatchNorm policy, optimizer (torch's names and arguments) and per-epoch schedule:

  model:  {arch: resnet101, weights: imagenet}
  data:   {path: data/weather, batch_size: 32, train_transforms: [{RandomCrop: {size: 192}}, ...]}
  stages:
    - {name: head, epochs: 10, trainable: [head], optimizer: {name: adam, lr: 0.001},
       schedule: {name: step, step_size: 7, gamma: 0.9}}
    - {name: finetune, epochs: 10, trainable: all, optimizer: {name: adam, lr: 0.0001}}
  seed: 0

Top-level `checkpoint_every` and `keep_checkpoints` and each stage's `on_nonfinite` say how a run
meets faults (mid-epoch checkpoints, run checkpoints kept, a non-finite step: tl_jax.training.faults).

pydantic validates it, so an unknown key, a wrong type or a value out of range is reported with its
key path (`stages[1].optimizer.lr`), the file, the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from tl_jax import optim


class ConfigError(ValueError):
  """A config file or flag has a bad value."""


class _Strict(BaseModel):
  # Unknown keys are errors (a typo must not silently fall back to a default); no coercion of
  # strings into numbers or of numbers into bools.
  model_config = ConfigDict(extra='forbid', strict=True, validate_assignment=True)


# A float field that also takes an int, as YAML writes `lr: 1`; strict mode would refuse it.
Float = Annotated[float, pydantic.BeforeValidator(
    lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v)]
NonNegative = Annotated[Float, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]


def _tuple_from_list(v):
  return tuple(v) if isinstance(v, list) else v


# ------------------------------------------------------------------------------------- model


class ModelConfig(_Strict):
  arch: str = 'resnet18'
  weights: str = 'imagenet'          # imagenet | random | PATH (.pth / .safetensors)
  dtype: Literal['float32', 'bfloat16'] = 'float32'   # compute dtype; params stay float32
  # ResNets and VGG on CPU: 3x3 stride-1 convolutions as Winograd where benchmarks/bench_winograd.py
  # measured it faster (tl_jax.models.winograd); false: direct convolutions everywhere. Same values up to rounding.
  winograd: bool = True

  @pydantic.field_validator('arch')
  @classmethod
  def _known_arch(cls, arch: str) -> str:
    from tl_jax.models import ARCHS
    if arch not in ARCHS:
      raise ValueError(f'unknown arch {arch!r}; choose one of {", ".join(sorted(ARCHS))}')
    return arch


# -------------------------------------------------------------------------------------- data

# One transform: {ClassName: {keyword: value}} (torchvision's names and arguments).
TransformSpec = dict[str, dict[str, Any]]


class DataConfig(_Strict):
  path: str = 'data/hymenoptera_data'   # folder with train/ and val/, a folder of classes, or tfds:NAME[/CONFIG][:VERSION]
  batch_size: Annotated[int, Field(ge=2)] = 4   # train-mode BatchNorm needs 2 samples
  # Eval-mode BN makes val outputs independent of how images are batched, so val can use a
  # larger batch than training (fewer, better-filled steps) without changing any number.
  eval_batch_size: PositiveInt = 32
  # None: the weights' own preprocessing (the tutorial's pipeline).
  train_transforms: Optional[list[TransformSpec]] = None
  val_transforms: Optional[list[TransformSpec]] = None
  train_split: Optional[str] = None     # tfds split strings, e.g. 'train[:80%]'
  val_split: Optional[str] = None
  tfds_data_dir: Optional[str] = None
  tfds_download: bool = False
  val_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.2   # single-folder data: seeded stratified split
  cache_decoded: Union[bool, Literal['auto']] = 'auto'
  # A frozen backbone with fixed BatchNorm computes its features once per stage (tl_jax.feature_cache).
  cache_features: bool = True
  # uint8 batches, normalised on the device: 4x fewer bytes to move; auto = on an accelerator.
  uint8_batches: Union[bool, Literal['auto']] = 'auto'
  workers: Annotated[int, Field(ge=0)] = 2     # decode/augment threads
  prefetch: PositiveInt = 4                    # batches prepared ahead of the step
  skip_bad_images: bool = False
  # MixUp / CutMix of each train batch (torchvision's reference-script names; tl_jax.data.mix): Beta(α, α);
  # 0 is off; both > 0: each batch takes one of the two at random, as torchvision's RandomChoice.
  mixup_alpha: NonNegative = 0.0
  cutmix_alpha: NonNegative = 0.0
  # Several labels per image: a sigmoid head with BCEWithLogitsLoss. None: from the data (a labels CSV is).
  multi_label: Optional[bool] = None

  @pydantic.field_validator('train_transforms', 'val_transforms', mode='before')
  @classmethod
  def _one_key_mappings(cls, value):
    if value is None:
      return value
    if not isinstance(value, list):
      raise ValueError('must be a list of {TransformName: {arguments}} mappings')
    out = []
    for i, item in enumerate(value):
      if isinstance(item, str):
        item = {item: {}}
      if not (isinstance(item, dict) and len(item) == 1):
        raise ValueError(f'item {i} must be one mapping {{TransformName: {{arguments}}}}, got {item!r}')
      (name, kwargs), = item.items()
      out.append({name: {} if kwargs is None else kwargs})
    return out


# ------------------------------------------------------------------------------ optimizers


# Defaults are torch's, from one table (optim.OPTIMIZERS, tested against torch's signatures); the
# rules that tie arguments together (nesterov, betas) are optim.resolve_optimizer's, which
# Config runs on every stage.
_SGD, _ADAM, _ADAMW = (optim.OPTIMIZERS[name] for name in ('sgd', 'adam', 'adamw'))


class SGDGroup(_Strict):
  """A torch param group of SGD: its stages and the arguments it overrides (None: the optimizer's)."""
  stages: Annotated[list[str], Field(min_length=1)]
  lr: Optional[NonNegative] = None
  momentum: Optional[Annotated[Float, Field(ge=0, lt=1)]] = None
  dampening: Optional[Annotated[Float, Field(ge=0, le=1)]] = None
  nesterov: Optional[bool] = None
  weight_decay: Optional[NonNegative] = None


# Param groups and weight-decay masks (tl_jax.optim.optimizer_labels): `groups` (torch's param_groups by
# stage), `layer_decay` (timm's layer-wise lr decay, over the arch's stages), and torchvision's reference
# script's norm_weight_decay / bias_weight_decay (None: the optimizer's weight_decay).
LayerDecay = Optional[Annotated[Float, Field(gt=0, le=1)]]


class SGD(_Strict):
  """torch.optim.SGD's arguments and defaults."""
  name: Literal['sgd']
  lr: NonNegative = _SGD['lr']
  momentum: Annotated[Float, Field(ge=0, lt=1)] = _SGD['momentum']
  dampening: Annotated[Float, Field(ge=0, le=1)] = _SGD['dampening']
  nesterov: bool = _SGD['nesterov']
  weight_decay: NonNegative = _SGD['weight_decay']
  groups: Optional[list[SGDGroup]] = None
  layer_decay: LayerDecay = None
  norm_weight_decay: Optional[NonNegative] = None
  bias_weight_decay: Optional[NonNegative] = None


Betas = Annotated[tuple[Annotated[Float, Field(ge=0, lt=1)], Annotated[Float, Field(ge=0, lt=1)]],
                  pydantic.BeforeValidator(_tuple_from_list)]


class AdamGroup(_Strict):
  """A torch param group of Adam / AdamW: its stages and the arguments it overrides (None: the optimizer's)."""
  stages: Annotated[list[str], Field(min_length=1)]
  lr: Optional[NonNegative] = None
  betas: Optional[Betas] = None
  eps: Optional[NonNegative] = None
  weight_decay: Optional[NonNegative] = None
  amsgrad: Optional[bool] = None


class Adam(_Strict):
  """torch.optim.Adam's arguments and defaults (weight_decay is added to the gradient)."""
  name: Literal['adam']
  lr: NonNegative = _ADAM['lr']
  betas: Betas = _ADAM['betas']
  eps: NonNegative = _ADAM['eps']
  weight_decay: NonNegative = _ADAM['weight_decay']
  amsgrad: bool = _ADAM['amsgrad']
  groups: Optional[list[AdamGroup]] = None
  layer_decay: LayerDecay = None
  norm_weight_decay: Optional[NonNegative] = None
  bias_weight_decay: Optional[NonNegative] = None


class AdamW(Adam):
  """torch.optim.AdamW: Adam's arguments, with decoupled weight decay defaulting to 0.01."""
  name: Literal['adamw']
  weight_decay: NonNegative = _ADAMW['weight_decay']


OptimizerConfig = Annotated[Union[SGD, Adam, AdamW], Field(discriminator='name')]

# A stage without `optimizer` trains with the tutorial's SGD.
TUTORIAL_SGD = {'name': 'sgd', 'lr': 0.001, 'momentum': 0.9}


# ------------------------------------------------------------------------------- schedules


class _Schedule(_Strict):
  # Linear warm-up: torch's SequentialLR([LinearLR(warmup_start_factor, total_iters=warmup_epochs),
  # schedule], milestones=[warmup_epochs]); the schedule's own epochs count from its end.
  warmup_epochs: Annotated[int, Field(ge=0)] = 0
  warmup_start_factor: Optional[Annotated[Float, Field(gt=0, le=1)]] = None   # None: 1 / (warmup_epochs + 1)


class StepSchedule(_Schedule):
  """torch's StepLR."""
  name: Literal['step']
  step_size: PositiveInt
  gamma: Annotated[Float, Field(gt=0)] = 0.1


class MultiStepSchedule(_Schedule):
  """torch's MultiStepLR."""
  name: Literal['multistep']
  milestones: list[PositiveInt]   # increasing: optim.resolve_schedule's rule
  gamma: Annotated[Float, Field(gt=0)] = 0.1


class ExponentialSchedule(_Schedule):
  """torch's ExponentialLR."""
  name: Literal['exponential']
  gamma: Annotated[Float, Field(gt=0)]


class CosineSchedule(_Schedule):
  """torch's CosineAnnealingLR; T_max defaults to the stage's epochs."""
  name: Literal['cosine']
  T_max: Optional[PositiveInt] = None
  eta_min: NonNegative = 0.0


class ConstantSchedule(_Schedule):
  name: Literal['constant']


ScheduleConfig = Annotated[Union[StepSchedule, MultiStepSchedule, ExponentialSchedule, CosineSchedule,
                                 ConstantSchedule], Field(discriminator='name')]


# ---------------------------------------------------------------------------------- stages


class EMAConfig(_Strict):
  """An exponential moving average of the weights, as torch's AveragedModel(model,
  multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True), updated after every `every`-th optimizer
  step of an epoch (torchvision's reference script's `model_ema_steps`); validation and best/ use it."""
  decay: Annotated[Float, Field(ge=0, le=1)] = 0.9998
  every: PositiveInt = 1


class EarlyStoppingConfig(_Strict):
  """Keras's EarlyStopping for one stage: the stage ends after `patience` epochs in which `monitor` did
  not improve on its best by more than `min_delta`; the run goes on with the next stage."""
  monitor: Literal['val_loss', 'val_acc'] = 'val_loss'
  patience: Annotated[int, Field(ge=0)] = 5
  min_delta: NonNegative = 0.0


class StageConfig(_Strict):
  name: str
  epochs: PositiveInt
  trainable: Union[Literal['all'], list[str]] = 'all'   # 'all' or the arch's stages, e.g. [layer4, head]
  bn: Literal['train', 'frozen'] = 'train'   # train: batch statistics while training (the tutorial's model.train())
  optimizer: OptimizerConfig = Field(default_factory=lambda: SGD(**TUTORIAL_SGD))
  schedule: ScheduleConfig = Field(default_factory=lambda: ConstantSchedule(name='constant'))
  # A step whose loss or gradient norm is not finite: stop the run (nothing non-finite is saved), or
  # drop that step's update and go on, as torch's GradScaler skips optimizer.step().
  on_nonfinite: Literal['stop', 'skip_step'] = 'stop'
  ema: Optional[EMAConfig] = None                        # tl_jax.training.ema
  # torch.nn.utils.clip_grad_norm_(trainable params, max_norm) before each optimizer step (None: off).
  clip_grad_norm: Optional[Annotated[Float, Field(gt=0)]] = None
  # Batches per optimizer step (gradients averaged as one batch `accumulate` times larger; BatchNorm sees
  # each batch); an epoch's last step takes the batches left (tl_jax.optim.accumulated).
  accumulate: PositiveInt = 1
  early_stopping: Optional[EarlyStoppingConfig] = None   # tl_jax.training.early_stopping

  @pydantic.field_validator('trainable', mode='before')
  @classmethod
  def _comma_string(cls, value):
    if isinstance(value, str) and value != 'all':
      return [s.strip() for s in value.split(',') if s.strip()]
    return value

  @pydantic.field_validator('trainable')
  @classmethod
  def _not_empty(cls, value):
    if isinstance(value, list) and not value:
      raise ValueError("must name at least one stage, or be 'all'")
    return value


class CheckpointEvery(_Strict):
  """Run checkpoints within an epoch, for long epochs: every `steps` train steps of the run, or every
  `minutes` minutes since the last save (one of the two)."""
  steps: Optional[PositiveInt] = None
  minutes: Optional[Annotated[Float, Field(gt=0)]] = None

  @pydantic.model_validator(mode='after')
  def _one_of_the_two(self):
    if (self.steps is None) == (self.minutes is None):
      raise ValueError('give steps or minutes, e.g. {steps: 1000} or {minutes: 30}')
    return self


ClassWeight = Annotated[Float, Field(ge=0)]


class LossConfig(_Strict):
  """torch's CrossEntropyLoss(weight=class_weights, label_smoothing=...) and, for multi-label data,
  BCEWithLogitsLoss(pos_weight=...) (tl_jax.losses). `balanced`: scikit-learn's
  compute_class_weight('balanced') from the train split's counts, resp. negatives / positives per class."""
  label_smoothing: Annotated[Float, Field(ge=0, le=1)] = 0.0
  class_weights: Optional[Union[Literal['balanced'], list[ClassWeight]]] = None
  pos_weight: Optional[Union[Literal['balanced'], ClassWeight, list[ClassWeight]]] = None

  @pydantic.field_validator('class_weights', 'pos_weight', mode='before')
  @classmethod
  def _balanced_or_weights(cls, value, info):
    # One clear message instead of one per member of the union.
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
    scalar_ok = info.field_name == 'pos_weight' and number(value)
    if value is None or value == 'balanced' or scalar_ok or (isinstance(value, list) and value and
                                                             all(number(v) for v in value)):
      return value
    one = ', a number >= 0' if info.field_name == 'pos_weight' else ''
    raise ValueError(f"must be balanced{one} or a list of one weight >= 0 per class, e.g. [1.0, 2.5]")


class Config(_Strict):
  """A whole training recipe (see the module docstring)."""
  model: ModelConfig = Field(default_factory=ModelConfig)
  data: DataConfig = Field(default_factory=DataConfig)
  stages: Annotated[list[StageConfig], Field(min_length=1)]
  seed: int = 0
  loss: LossConfig = Field(default_factory=LossConfig)   # tl_jax.losses.make_loss
  # Off by default: an epoch's own checkpoint comes often enough for short epochs (the tutorial's).
  checkpoint_every: Optional[CheckpointEvery] = None
  # Run checkpoints kept in WORKDIR/checkpoints/: more than one, so a damaged newest one has one to fall back on.
  keep_checkpoints: PositiveInt = 2
  # Fit a temperature on the val logits of the best checkpoint at the end of the run (tl_jax.calibration).
  calibrate: bool = False

  @pydantic.model_validator(mode='after')
  def _stages_fit_the_arch(self):
    from tl_jax.models import FEATURES, arch_stages
    known = arch_stages(self.model.arch) + (FEATURES,)
    names = [s.name for s in self.stages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f'stages: every stage needs its own name; repeated {duplicates}')
    for i, stage in enumerate(self.stages):
      # The optimizer's own checks (torch's rules), e.g. a warm-up longer than the stage.
      try:
        optim.resolve_optimizer(optim.torch_kwargs(stage.optimizer.model_dump()))
        optim.resolve_schedule(stage.schedule.model_dump(), stage.epochs)
      except ValueError as e:
        raise ValueError(f'stages[{i}]: {e}') from None
      try:
        optim.check_param_groups(stage.optimizer.model_dump(), self.model.arch, f'stages[{i}].optimizer')
      except ValueError as e:
        raise ValueError(str(e)) from None
      if stage.trainable != 'all':
        unknown = [s for s in stage.trainable if s not in known]
        if unknown:
          raise ValueError(f'stages[{i}].trainable: {self.model.arch} has no stage {", ".join(map(repr, unknown))}; '
                           f'its stages are {", ".join(known[:-1])} ({FEATURES}: all before the head'
                           f'{" and classifier" if "classifier" in known else ""}; or all)')
    return self

  # -- derived values

  @property
  def epochs(self) -> int:
    return sum(s.epochs for s in self.stages)

  def stage_at(self, epoch: int) -> tuple[int, int]:
    """(stage index, epoch within the stage) of global `epoch` (0-based)."""
    for index, stage in enumerate(self.stages):
      if epoch < stage.epochs:
        return index, epoch
      epoch -= stage.epochs
    raise ValueError(f'epoch beyond the recipe\'s {self.epochs} epochs')

  def trainable_stages(self, index: int) -> tuple[str, ...]:
    from tl_jax.models import arch_stages
    trainable = self.stages[index].trainable
    return tuple(arch_stages(self.model.arch)) if trainable == 'all' else tuple(trainable)

  def to_dict(self) -> dict[str, Any]:
    return self.model_dump(mode='json')


# The keys of a run that may change on --resume: how the data is fed, not what is computed.
RUNTIME_KEYS = ('model.winograd', 'data.workers', 'data.prefetch', 'data.tfds_download', 'data.cache_decoded', 'data.tfds_data_dir',
                'data.uint8_batches', 'data.eval_batch_size', 'data.cache_features', 'checkpoint_every',
                'checkpoint_every.steps', 'checkpoint_every.minutes', 'keep_checkpoints',
                'calibrate')

# Keys that may change on --resume after a run stopped on a non-finite loss: what to try then (the
# optimizer's hyperparameters, the schedule, the stage's policy). `[*]` stands for any stage, `.*` for
# any key below. Not the optimizer's name: its state would not fit the saved one.
NONFINITE_RETRY_KEYS = ('stages[*].optimizer.lr', 'stages[*].optimizer.momentum', 'stages[*].optimizer.dampening',
                        'stages[*].optimizer.nesterov', 'stages[*].optimizer.weight_decay',
                        'stages[*].optimizer.betas', 'stages[*].optimizer.eps', 'stages[*].optimizer.amsgrad',
                        'stages[*].schedule.*', 'stages[*].on_nonfinite',
                        # Param groups' own hyperparameters and clipping keep the optimizer state's
                        # structure (tl_jax.optim); which params form a group does not.
                        'stages[*].optimizer.groups[*].lr', 'stages[*].optimizer.groups[*].momentum',
                        'stages[*].optimizer.groups[*].dampening', 'stages[*].optimizer.groups[*].nesterov',
                        'stages[*].optimizer.groups[*].weight_decay', 'stages[*].optimizer.groups[*].betas',
                        'stages[*].optimizer.groups[*].eps', 'stages[*].optimizer.groups[*].amsgrad',
                        'stages[*].clip_grad_norm')


# ------------------------------------------------------------------------------- loading


def _error_line(error: Mapping[str, Any], source: str) -> str:
  """One pydantic error as `key.path in FILE: message (got VALUE)`."""
  path = ''
  for part in error['loc']:
    if isinstance(part, int):
      path += f'[{part}]'
    elif part in ('sgd', 'adam', 'adamw', 'step', 'multistep', 'exponential', 'cosine', 'constant') \
        and path.endswith(('optimizer', 'schedule')):
      continue   # the discriminated union's branch name: the key path is enough
    else:
      path += ('.' if path else '') + str(part)
  message = error['msg'].removeprefix('Value error, ')
  if error['type'] == 'extra_forbidden':
    message = 'unknown key'
  elif error['type'] == 'union_tag_invalid':
    message = f"unknown name {error['input'].get('name')!r}; {message[message.find('expected'):]}" \
        if isinstance(error['input'], dict) else message
  elif error['type'] == 'union_tag_not_found':
    message = "needs a 'name'"
  got = '' if error['type'] in ('missing', 'union_tag_not_found') or path == '' else f' (got {error["input"]!r})'
  if not path and ': ' in message:
    # A check across keys (model validator) names its own key path first.
    path, message = message.split(': ', 1)
    got = ''
  if repr(error['input']) in message:
    got = ''
  where = f'{path}{source}' if path else source.removeprefix(' in ') or 'config'
  return f'{where}: {message}{got}'


def validate(values: Mapping[str, Any], source: str = '') -> Config:
  """A Config from plain values; ConfigError names the key path, `source` and the value."""
  try:
    config = Config.model_validate(values)
  except pydantic.ValidationError as e:
    errors = e.errors()
    first = _error_line(errors[0], source)
    if errors[0]['type'] == 'extra_forbidden':
      first += _known_keys_hint(errors[0]['loc'])
    more = f' (and {len(errors) - 1} more error{"s" if len(errors) > 2 else ""})' if len(errors) > 1 else ''
    raise ConfigError(first + more) from None
  check_transforms(config, source)
  return config


def _known_keys_hint(loc: Sequence) -> str:
  """'; known keys: ...' for an unknown key at `loc`."""
  cls: Any = Config
  for part in loc[:-1]:
    if isinstance(part, int):
      continue
    field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
    if field is None:
      # a union member named by its discriminator value
      members = {'sgd': SGD, 'adam': Adam, 'adamw': AdamW, 'step': StepSchedule, 'multistep': MultiStepSchedule,
                 'exponential': ExponentialSchedule, 'cosine': CosineSchedule, 'constant': ConstantSchedule}
      cls = members.get(part)
      if cls is None:
        return ''
      continue
    annotation = field.annotation
    args = getattr(annotation, '__args__', ())
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
      cls = annotation
    elif args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
      cls = args[0]   # list[StageConfig], Optional[...]
    elif args and getattr(args[0], '__args__', None) and isinstance(args[0].__args__[0], type) \
        and issubclass(args[0].__args__[0], BaseModel):
      cls = args[0].__args__[0]   # Optional[list[SGDGroup]]
  if isinstance(cls, type) and issubclass(cls, BaseModel):
    return f'; known keys: {", ".join(cls.model_fields)}'
  return ''


def check_transforms(config: Config, source: str = '') -> None:
  """Builds the configured transform lists once so a bad one is reported before any work."""
  from tl_jax.data.augment import build_pipeline as build
  for key in ('train_transforms', 'val_transforms'):
    spec = getattr(config.data, key)
    if spec is not None:
      try:
        build(spec, where=f'data.{key}')
      except ValueError as e:
        raise ConfigError(f'{e}{source}') from None


# Flat keys of the first config format; named in the error so an old file is easy to move.
_OLD_KEYS = {'strategy', 'arch', 'weights', 'epochs', 'lr', 'momentum', 'step_size_epochs', 'gamma', 'batch_size'}


def read_yaml(path: str | Path) -> dict[str, Any]:
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f'config file {path} not found')
  try:
    loaded = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f'{path} is not valid YAML: {e}') from e
  if not isinstance(loaded, dict):
    raise ConfigError(f'{path} must hold a mapping with the keys model, data, stages, seed')
  old = sorted(_OLD_KEYS & set(loaded))
  if old:
    raise ConfigError(f'{path} uses the flat keys {old} of the first config format; write them as model: / data: / '
                      'stages: (see tl_jax/presets/finetune.yaml)')
  return _numbers(loaded)


def _numbers(tree):
  """YAML 1.1 reads `1e-3` (no dot) as a string; a string that parses as a float was meant as one."""
  if isinstance(tree, dict):
    return {k: _numbers(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_numbers(v) for v in tree]
  if isinstance(tree, str) and any(c.isdigit() for c in tree) and 'e' in tree.lower():
    try:
      return float(tree)
    except ValueError:
      return tree
  return tree


# The --strategy presets, shipped in the package (tl_jax/presets/<file>).
PRESETS = {'frozen': 'frozen.yaml', 'finetune': 'finetune.yaml', 'two-stage': 'two_stage.yaml'}


def preset_path(name: str) -> Path:
  """The YAML file of a shipped preset ('frozen', 'finetune', 'two-stage')."""
  if name not in PRESETS:
    raise ConfigError(f'unknown preset {name!r}; choose one of {", ".join(sorted(PRESETS))} or pass a config file')
  return Path(__file__).resolve().parent / 'presets' / PRESETS[name]


def load_recipe(preset_or_path: str | Path, **overrides: Any) -> Config:
  """A validated Config from a preset name (`PRESETS`) or a YAML file, with flag overrides
  (`apply_overrides`' names; None values are ignored)."""
  name = str(preset_or_path)
  path = preset_path(name) if name in PRESETS else Path(preset_or_path)
  return load_config(path, overrides)


def load_config(path: Optional[str | Path] = None, overrides: Optional[Mapping[str, Any]] = None) -> Config:
  """A validated Config from a YAML file (or the tutorial's finetune recipe) and flag overrides.

  Args:
    path: YAML file in the schema above; None: `default_values()`.
    overrides: the command line's values (None values ignored), see `apply_overrides`.
  """
  values = read_yaml(path) if path is not None else default_values()
  source = f' in {path}' if path is not None else ''
  validate(values, source)   # the file's own errors are named with the file
  values = apply_overrides(values, overrides or {})
  return validate(values, source + ' (after the command-line flags)' if overrides else source)


def default_values() -> dict[str, Any]:
  """The tutorial's finetune recipe: SGD 0.001/0.9, StepLR(7, 0.1), 25 epochs, everything learns."""
  return {'model': {'arch': 'resnet18', 'weights': 'imagenet'},
          'data': {'batch_size': 4},
          'stages': [{'name': 'finetune', 'epochs': 25, 'trainable': 'all', 'bn': 'train',
                      'optimizer': dict(TUTORIAL_SGD), 'schedule': {'name': 'step', 'step_size': 7, 'gamma': 0.1}}],
          'seed': 0}


# Flags that apply to every stage.
STAGE_FLAGS = ('epochs', 'lr', 'bn')
# Flags that set one key of a section.
SECTION_FLAGS = {'arch': 'model', 'weights': 'model', 'dtype': 'model', 'winograd': 'model',
                 'data': 'data', 'batch_size': 'data', 'eval_batch_size': 'data', 'workers': 'data',
                 'skip_bad_images': 'data', 'tfds_data_dir': 'data', 'tfds_download': 'data',
                 'cache_decoded': 'data', 'cache_features': 'data', 'uint8_batches': 'data', 'seed': None}


def apply_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
  """Flag values on top of a config's plain values (None: not given).

  `epochs`, `lr` and `bn` apply to every stage; `trainable` (a list or 'all') to the only stage
  (refused for a multi-stage recipe); `data` sets data.path; the others set their key.
  """
  values = copy.deepcopy(dict(values))
  given = {k: v for k, v in overrides.items() if v is not None}
  unknown = sorted(set(given) - set(STAGE_FLAGS) - set(SECTION_FLAGS) - {'trainable'})
  if unknown:
    raise ConfigError(f'unknown overrides {unknown}')
  stages = values.setdefault('stages', [])
  for key in STAGE_FLAGS:
    if key in given:
      for stage in stages:
        if key == 'lr':
          stage.setdefault('optimizer', dict(TUTORIAL_SGD))['lr'] = given[key]
        else:
          stage[key] = given[key]
  if 'trainable' in given:
    if len(stages) != 1:
      raise ConfigError(f'--trainable sets the trainable stages of a single-stage recipe; this one has '
                        f'{len(stages)} stages ({", ".join(str(s.get("name")) for s in stages)}): '
                        'set trainable per stage in the config file')
    stages[0]['trainable'] = given['trainable']
  for key, section in SECTION_FLAGS.items():
    if key not in given:
      continue
    if section is None:
      values[key] = given[key]
    else:
      values.setdefault(section, {})['path' if key == 'data' else key] = given[key]
  return values


def two_stage_values(values: Mapping[str, Any], head_epochs: int, epochs: Optional[int],
                     lr: Optional[float]) -> dict[str, Any]:
  """The two-stage shortcut: `head` for `head_epochs`, then all layers at lr/10 for the rest of `epochs`.

  `values` is a two-stage config (tl_jax/presets/two_stage.yaml); epochs and lr given as flags reshape it
  (here `epochs` is the total over both stages, not per stage).
  """
  values = copy.deepcopy(dict(values))
  head, rest = values['stages']
  total = epochs if epochs is not None else head['epochs'] + rest['epochs']
  if head_epochs < 1 or total <= head_epochs:
    raise ConfigError(f'--strategy two-stage needs 1 <= --head-epochs < --epochs; got --head-epochs {head_epochs}, '
                      f'--epochs {total}')
  head['epochs'], rest['epochs'] = head_epochs, total - head_epochs
  if lr is not None:
    head.setdefault('optimizer', dict(TUTORIAL_SGD))['lr'] = lr
    rest.setdefault('optimizer', dict(TUTORIAL_SGD))['lr'] = lr / 10
  return values


def recipe_warnings(config: Config) -> list[str]:
  """Legal but probably unintended settings, e.g. a milestone the stage never reaches."""
  out = []
  for i, stage in enumerate(config.stages):
    schedule = stage.schedule
    late = []
    if isinstance(schedule, MultiStepSchedule):
      late = [m for m in schedule.milestones if m >= stage.epochs]
    if late:
      out.append(f'stages[{i}].schedule ({stage.name}): the lr would change at epoch(s) {late} but the stage has '
                 f'{stage.epochs} epochs, so it never does')
  return out


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b[0].c': leaf}: key paths of a plain config dict, for naming what changed."""
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(flatten(v, f'{prefix}.{k}' if prefix else str(k)))
    return out
  if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
    out = {}
    for i, v in enumerate(tree):
      out.update(flatten(v, f'{prefix}[{i}]'))
    return out
  return {prefix: tree}


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = RUNTIME_KEYS) -> list[str]:
  """`key: run has A, now B` for every recipe key that differs (the keys in `ignore` left out; there
  `[*]` stands for any list index and a final `.*` for any key below)."""
  a, b = flatten(dict(old)), flatten(dict(new))

  def ignored(key: str) -> bool:
    wild = re.sub(r'\[\d+\]', '[*]', key)
    return any(key == k or wild == k or (k.endswith('.*') and wild.startswith(k[:-1])) for k in ignore)

  return [f'{k}: run has {a.get(k)!r}, now {b.get(k)!r}' for k in sorted(set(a) | set(b))
          if not ignored(k) and a.get(k) != b.get(k)]


@dataclasses.dataclass
class TutorialRecipe:
  """The tutorial's one-stage recipe as flat values: what the plain PyTorch reference and the benchmark take."""
  strategy: str = 'finetune'        # frozen: only fc learns; finetune: everything learns
  arch: str = 'resnet18'
  weights: str = 'imagenet'
  data: str = 'data/hymenoptera_data'
  epochs: int = 25
  batch_size: int = 4
  eval_batch_size: int = 32
  lr: float = 0.001
  momentum: float = 0.9
  step_size_epochs: int = 7
  gamma: float = 0.1
  bn: str = 'train'
  seed: int = 0
  workers: int = 2
  cache_features: bool = True       # tl_jax.feature_cache, where valid (bn: frozen)

  def to_config(self) -> Config:
    """The same recipe as a (validated) Config."""
    if self.strategy not in ('frozen', 'finetune'):
      raise ConfigError(f"strategy must be 'frozen' or 'finetune', got {self.strategy!r}")
    return validate({
        'model': {'arch': self.arch, 'weights': self.weights},
        'data': {'path': self.data, 'batch_size': self.batch_size, 'eval_batch_size': self.eval_batch_size,
                 'workers': self.workers, 'cache_features': self.cache_features},
        'stages': [{'name': 'head' if self.strategy == 'frozen' else 'finetune', 'epochs': self.epochs,
                    'trainable': ['head'] if self.strategy == 'frozen' else 'all', 'bn': self.bn,
                    'optimizer': {'name': 'sgd', 'lr': self.lr, 'momentum': self.momentum},
                    'schedule': {'name': 'step', 'step_size': self.step_size_epochs, 'gamma': self.gamma}}],
        'seed': self.seed})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
