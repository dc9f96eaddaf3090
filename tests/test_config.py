"""tl_jax.config: YAML recipes and flags -> a validated Config; bad values are named by key path."""

from pathlib import Path

import pytest

from tl_jax import config as config_lib
from tl_jax.config import ConfigError, TutorialRecipe, apply_overrides, load_config, read_yaml, validate

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'   # the example recipes of the checkout
SHIPPED = sorted(CONFIGS.glob('*.yaml')) + [config_lib.preset_path(name) for name in config_lib.PRESETS]


def _write(tmp_path, text):
  path = tmp_path / 'c.yaml'
  path.write_text(text)
  return path


def _one_stage(**stage):
  return {'stages': [{'name': 's', 'epochs': 2, **stage}]}


@pytest.mark.parametrize('path', SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
  config = load_config(path)
  assert config.epochs >= 1 and config.stages


@pytest.mark.parametrize('strategy, trainable', [('frozen', ['head']), ('finetune', 'all')])
def test_shipped_tutorial_configs_hold_the_tutorial_recipe(strategy, trainable):
  config = config_lib.load_recipe(strategy)
  (stage,) = config.stages
  assert (config.model.arch, config.data.batch_size, config.epochs, stage.bn) == ('resnet18', 4, 25, 'train')
  assert stage.trainable == trainable
  assert (stage.optimizer.name, stage.optimizer.lr, stage.optimizer.momentum) == ('sgd', 0.001, 0.9)
  assert (stage.schedule.name, stage.schedule.step_size, stage.schedule.gamma) == ('step', 7, 0.1)
  assert config.data.train_transforms is None   # the weights' own preprocessing
  # The flat recipe the PyTorch reference runs is the same recipe.
  assert TutorialRecipe(strategy=strategy).to_config().to_dict() == config.to_dict()


def test_the_materials_recipes_are_shipped():
  two = load_config(CONFIGS / 'resnet101_two_stage.yaml')
  head, finetune = two.stages
  assert two.model.arch == 'resnet101'
  assert (head.trainable, head.optimizer.name, head.optimizer.lr) == (['head'], 'adam', 0.001)
  assert (head.schedule.name, head.schedule.step_size, head.schedule.gamma) == ('step', 7, 0.9)
  assert (finetune.trainable, finetune.optimizer.name, finetune.optimizer.lr) == ('all', 'adam', 0.0001)
  assert finetune.schedule.name == 'constant'
  vgg = load_config(CONFIGS / 'vgg16_classifier.yaml')
  assert vgg.model.arch == 'vgg16' and vgg.stages[0].trainable == ['classifier', 'head']
  assert [next(iter(t)) for t in vgg.data.train_transforms] == [
      'Resize', 'RandomCrop', 'RandomHorizontalFlip', 'RandomRotation', 'ColorJitter', 'ColorJitter',
      'ColorJitter', 'ColorJitter', 'RandomGrayscale', 'ToTensor', 'Normalize']


def test_stage_arithmetic():
  config = validate({'stages': [{'name': 'a', 'epochs': 3, 'trainable': ['head']}, {'name': 'b', 'epochs': 2}]})
  assert config.epochs == 5
  assert [config.stage_at(e) for e in range(5)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
  assert config.trainable_stages(0) == ('head',)
  assert config.trainable_stages(1) == ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head')
  with pytest.raises(ValueError):
    config.stage_at(5)


def test_defaults_are_torchs():
  config = validate(_one_stage(optimizer={'name': 'adamw'}))
  opt = config.stages[0].optimizer
  assert (opt.lr, opt.betas, opt.eps, opt.weight_decay, opt.amsgrad) == (0.001, (0.9, 0.999), 1e-8, 0.01, False)
  sgd = validate(_one_stage(optimizer={'name': 'sgd'})).stages[0].optimizer
  assert (sgd.momentum, sgd.dampening, sgd.nesterov, sgd.weight_decay) == (0.0, 0.0, False, 0.0)
  # No optimizer: the tutorial's SGD; no schedule: constant.
  stage = validate(_one_stage()).stages[0]
  assert (stage.optimizer.name, stage.optimizer.momentum, stage.schedule.name) == ('sgd', 0.9, 'constant')


def test_flags_apply_to_every_stage_and_none_leaves_the_file():
  values = {'stages': [{'name': 'a', 'epochs': 3, 'optimizer': {'name': 'adam', 'lr': 0.01}},
                       {'name': 'b', 'epochs': 4}]}
  config = validate(apply_overrides(values, {'epochs': 5, 'lr': 0.5, 'bn': 'frozen', 'batch_size': None,
                                             'data': 'somewhere', 'arch': 'resnet34'}))
  assert [s.epochs for s in config.stages] == [5, 5]
  assert [s.optimizer.lr for s in config.stages] == [0.5, 0.5]
  assert [s.optimizer.name for s in config.stages] == ['adam', 'sgd']
  assert [s.bn for s in config.stages] == ['frozen', 'frozen']
  assert (config.data.path, config.data.batch_size, config.model.arch) == ('somewhere', 4, 'resnet34')
  assert values['stages'][0]['epochs'] == 3   # the input is not changed


def test_trainable_flag_sets_the_single_stage_and_is_refused_for_several():
  config = validate(apply_overrides(_one_stage(), {'trainable': 'layer4,head'}))
  assert config.stages[0].trainable == ['layer4', 'head']
  two = {'stages': [{'name': 'a', 'epochs': 1}, {'name': 'b', 'epochs': 1}]}
  with pytest.raises(ConfigError, match=r'single-stage .* 2 stages \(a, b\)'):
    apply_overrides(two, {'trainable': 'head'})
  with pytest.raises(ConfigError, match=r"stages\[0\]\.trainable: resnet18 has no stage 'layer5'; its stages are "
                                        r'stem, layer1, layer2, layer3, layer4, head'):
    validate(apply_overrides(_one_stage(), {'trainable': 'layer5,head'}))


def test_two_stage_shortcut_reshapes_the_shipped_file():
  values = read_yaml(config_lib.preset_path('two-stage'))
  config = validate(config_lib.two_stage_values(values, head_epochs=3, epochs=8, lr=0.01))
  head, rest = config.stages
  assert (head.epochs, rest.epochs) == (3, 5)
  assert (head.trainable, rest.trainable) == (['head'], 'all')
  assert (head.optimizer.lr, rest.optimizer.lr) == (0.01, pytest.approx(0.001))
  default = validate(config_lib.two_stage_values(values, head_epochs=10, epochs=None, lr=None))
  assert [s.epochs for s in default.stages] == [10, 15]
  assert [s.optimizer.lr for s in default.stages] == [0.001, 0.0001]
  with pytest.raises(ConfigError, match='--head-epochs 10, --epochs 10'):
    config_lib.two_stage_values(values, head_epochs=10, epochs=10, lr=None)


def test_exponent_without_a_dot_is_a_number(tmp_path):
  path = _write(tmp_path, 'stages: [{name: s, epochs: 1, optimizer: {name: adam, lr: 1e-3}}]\n')
  assert load_config(path).stages[0].optimizer.lr == 0.001   # YAML 1.1 loads 1e-3 as a string


@pytest.mark.parametrize('text, pattern', [
    ('stages: []\n', r'stages in .*c\.yaml: List should have at least 1 item'),
    ('stages: [{name: s, epochs: 0}]\n', r'stages\[0\]\.epochs in .*c\.yaml: .*greater than or equal to 1 \(got 0\)'),
    ('stages: [{name: s, epochs: abc}]\n', r"stages\[0\]\.epochs in .*: .*valid integer \(got 'abc'\)"),
    ('stages: [{name: s, epochs: true}]\n', r'stages\[0\]\.epochs in .*valid integer \(got True\)'),
    ('stages: [{name: s, epochs: 1, optimizer: {name: adom}}]\n',
     r"stages\[0\]\.optimizer in .*: unknown name 'adom'; expected tags: 'sgd', 'adam', 'adamw'"),
    ('stages: [{name: s, epochs: 1, optimizer: {name: adam, momentum: 0.9}}]\n',
     r'stages\[0\]\.optimizer\.momentum in .*: unknown key \(got 0\.9\); known keys: name, lr, betas, eps'),
    ('stages: [{name: s, epochs: 1, optimizer: {lr: 0.1}}]\n', r"stages\[0\]\.optimizer in .*: needs a 'name'"),
    ('stages: [{name: s, epochs: 1, optimizer: {name: sgd, lr: -1}}]\n', r'stages\[0\]\.optimizer\.lr .*\(got -1'),
    ('stages: [{name: s, epochs: 1, optimizer: {name: adam, betas: [0.9, 1.5]}}]\n',
     r'stages\[0\]\.optimizer\.betas\[1\] in .*less than 1 \(got 1\.5\)'),
    ('stages: [{name: s, epochs: 1, optimizer: {name: sgd, nesterov: true}}]\n',
     r'stages\[0\] in .*c\.yaml: optimizer sgd: momentum must be > 0 with nesterov=True, got 0\.0'),
    ('stages: [{name: s, epochs: 1, schedule: {name: multistep, milestones: [5, 3]}}]\n',
     r'stages\[0\] in .*c\.yaml: schedule multistep: milestones must be increasing epochs >= 1, got \[5, 3\]'),
    ('stages: [{name: s, epochs: 1, schedule: {name: cyclic}}]\n',
     r"stages\[0\]\.schedule in .*unknown name 'cyclic'; expected tags: 'step', 'multistep', 'exponential', "
     r"'cosine', 'constant'"),
    ('stages: [{name: s, epochs: 1, schedule: {name: step}}]\n', r'stages\[0\]\.schedule\.step_size in .*: Field required'),
    ('stages: [{name: s, epochs: 1, bn: sometimes}]\n', r"stages\[0\]\.bn in .*'train' or 'frozen' \(got 'sometimes'\)"),
    ('stages: [{name: s, epochs: 1}, {name: s, epochs: 1}]\n', r"stages in .*own name; repeated \['s'\]"),
    ('model: {arch: resnet7}\nstages: [{name: s, epochs: 1}]\n', r"model\.arch in .*unknown arch 'resnet7'; choose one of"),
    ('data: {batch_size: 1}\nstages: [{name: s, epochs: 1}]\n', r'data\.batch_size in .*greater than or equal to 2'),
    ('data: {bogus: 1}\nstages: [{name: s, epochs: 1}]\n', r'data\.bogus in .*unknown key \(got 1\); known keys: path,'),
    ('data: {skip_bad_images: 1}\nstages: [{name: s, epochs: 1}]\n', r'data\.skip_bad_images in .*valid boolean'),
    ('foo: 1\nstages: [{name: s, epochs: 1}]\n', r'foo in .*unknown key .*known keys: model, data, stages, seed'),
    ('strategy: frozen\nlr: 0.01\n', r"flat keys \['lr', 'strategy'\] of the first config format"),
    ('- a\n- b\n', r'must hold a mapping'),
    ('stages: [\n', r'is not valid YAML'),
])
def test_bad_files_are_named_with_the_key_path_and_value(tmp_path, text, pattern):
  with pytest.raises(ConfigError, match=pattern):
    load_config(_write(tmp_path, text))


def test_missing_file_and_a_bad_flag_value(tmp_path):
  with pytest.raises(ConfigError, match='not found'):
    load_config(tmp_path / 'nope.yaml')
  with pytest.raises(ConfigError, match=r"stages\[0\]\.bn .*after the command-line flags.*'sometimes'"):
    load_config(config_lib.preset_path('frozen'), {'bn': 'sometimes'})


def test_changed_keys_name_the_key_path_and_ignore_runtime_keys():
  a = validate({'stages': [{'name': 'a', 'epochs': 2}, {'name': 'b', 'epochs': 3}]}).to_dict()
  b = validate({'data': {'workers': 7}, 'stages': [{'name': 'a', 'epochs': 2},
                                                   {'name': 'b', 'epochs': 3, 'optimizer': {'name': 'adam'}}]})
  changed = config_lib.changed_keys(a, b.to_dict())
  assert "stages[1].optimizer.name: run has 'sgd', now 'adam'" in changed
  assert not any(k.startswith('data.workers') for k in changed)
  assert config_lib.changed_keys(a, a) == []


def test_fault_keys_have_safe_defaults_and_a_non_finite_stop_lets_the_optimizer_change():
  config = validate({'stages': [{'name': 'a', 'epochs': 2}]})
  assert (config.keep_checkpoints, config.checkpoint_every, config.stages[0].on_nonfinite) == (2, None, 'stop')
  a = config.to_dict()
  b = validate({'keep_checkpoints': 3, 'checkpoint_every': {'minutes': 30},
                'stages': [{'name': 'a', 'epochs': 2, 'on_nonfinite': 'skip_step',
                            'optimizer': {'name': 'sgd', 'lr': 1e-4},
                            'schedule': {'name': 'cosine', 'warmup_epochs': 1}}]}).to_dict()
  # How the run is saved may change on any --resume; what it computes only after a non-finite stop.
  assert not any(k.startswith(('keep_checkpoints', 'checkpoint_every')) for k in config_lib.changed_keys(a, b))
  assert config_lib.changed_keys(a, b, config_lib.RUNTIME_KEYS + config_lib.NONFINITE_RETRY_KEYS) == []
  adam = validate({'stages': [{'name': 'a', 'epochs': 2, 'optimizer': {'name': 'adam'}}]}).to_dict()
  assert config_lib.changed_keys(a, adam, config_lib.RUNTIME_KEYS + config_lib.NONFINITE_RETRY_KEYS) == [
      "stages[0].optimizer.name: run has 'sgd', now 'adam'"]   # the saved optimizer state would not fit


def test_a_milestone_past_the_stage_end_is_warned():
  config = validate(_one_stage(schedule={'name': 'multistep', 'milestones': [1, 5], 'gamma': 0.5}))
  (warning,) = config_lib.recipe_warnings(config)
  assert 'stages[0].schedule' in warning and '[5]' in warning and '2 epochs' in warning
  assert config_lib.recipe_warnings(validate(_one_stage())) == []


def test_load_recipe_takes_a_preset_or_a_file_with_overrides(tmp_path):
  frozen = config_lib.load_recipe('frozen', epochs=3, lr=0.01, arch=None)
  assert frozen.epochs == 3 and frozen.stages[0].optimizer.lr == 0.01 and frozen.model.arch == 'resnet18'
  assert config_lib.load_recipe('two-stage').stages[1].trainable == 'all'
  path = _write(tmp_path, 'stages: [{name: s, epochs: 2}]\n')
  assert config_lib.load_recipe(path, seed=3).seed == 3
  with pytest.raises(ConfigError, match='config file .*nothing.yaml not found'):
    config_lib.load_recipe(tmp_path / 'nothing.yaml')
  # The presets are package data: they live inside tl_jax, not beside a checkout.
  assert config_lib.preset_path('finetune').parent.parent == Path(config_lib.__file__).resolve().parent


def test_the_schema_takes_torchs_defaults_and_rules_from_the_optimizer_table():
  from tl_jax import optim
  for cls, name in ((config_lib.SGD, 'sgd'), (config_lib.Adam, 'adam'), (config_lib.AdamW, 'adamw')):
    dumped = cls(name=name).model_dump()
    assert optim.torch_kwargs(dumped) == {'name': name, **optim.OPTIMIZERS[name]}, name
    assert all(dumped[key] is None for key in optim.GROUP_KEYS), name   # param groups and masks: off
  # One rule for the learning rate: torch's (>= 0), in the schema and in optim.resolve_optimizer alike.
  assert validate(_one_stage(optimizer={'name': 'sgd', 'lr': 0.0})).stages[0].optimizer.lr == 0.0
  assert optim.resolve_optimizer({'name': 'sgd', 'lr': 0.0})['lr'] == 0.0
