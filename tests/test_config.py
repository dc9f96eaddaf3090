"""tl_jax.config: YAML files and flags -> a validated TrainConfig; bad values are named."""

from pathlib import Path

import pytest

from tl_jax.config import ConfigError, TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


@pytest.mark.parametrize('strategy', ['frozen', 'finetune'])
def test_shipped_configs_hold_the_tutorial_recipe(strategy):
  config = load_config(CONFIGS / f'{strategy}.yaml')
  assert config.strategy == strategy
  assert (config.arch, config.batch_size, config.lr, config.momentum) == ('resnet18', 4, 0.001, 0.9)
  assert (config.step_size_epochs, config.gamma, config.epochs, config.bn) == (7, 0.1, 25, 'train')


def test_flags_override_the_file_and_none_leaves_it(tmp_path):
  path = tmp_path / 'c.yaml'
  path.write_text('epochs: 3\nlr: 0.01\n')
  config = load_config(path, epochs=5, lr=None)
  assert config.epochs == 5 and config.lr == 0.01


def test_exponent_without_a_dot_is_a_number(tmp_path):
  path = tmp_path / 'c.yaml'
  path.write_text('lr: 1e-3\n')  # YAML 1.1 loads this as the string '1e-3'
  assert load_config(path).lr == 0.001
  path.write_text('lr: fast\n')
  with pytest.raises(ConfigError, match="lr in .* must be a number, got 'fast'"):
    load_config(path)


def test_an_int_is_accepted_where_a_float_is_expected(tmp_path):
  path = tmp_path / 'c.yaml'
  path.write_text('lr: 1\n')
  config = load_config(path)
  assert config.lr == 1.0 and isinstance(config.lr, float)


@pytest.mark.parametrize('text, pattern', [
    ('epochs: abc\n', r"epochs in .*c\.yaml must be a whole number, got 'abc'"),
    ('epochs: true\n', r'epochs in .* must be a whole number, got True'),
    ('lr: [1, 2]\n', r'lr in .* must be a number, got \[1, 2\]'),
    ('skip_bad_images: 1\n', r'skip_bad_images in .* must be true or false, got 1'),
    ('strategy: 3\n', r'strategy in .* must be a string, got 3'),
    ('foo: 1\n', r"unknown config keys \['foo'\]"),
    ('- a\n- b\n', r'must hold a mapping'),
    ('epochs: [\n', r'is not valid YAML'),
    ('epochs: 0\n', r'epochs must be >= 1, got 0'),
    ('strategy: partial\n', r"strategy must be one of .*, got 'partial'"),
    ('batch_size: 1\n', r'batch_size must be >= 2'),
])
def test_bad_files_are_named_with_the_key_and_value(tmp_path, text, pattern):
  path = tmp_path / 'c.yaml'
  path.write_text(text)
  with pytest.raises(ConfigError, match=pattern):
    load_config(path)


def test_missing_file_and_bad_flag_value(tmp_path):
  with pytest.raises(ConfigError, match='not found'):
    load_config(tmp_path / 'nope.yaml')
  with pytest.raises(ConfigError, match='bn must be one of'):
    load_config(None, bn='sometimes')


def test_defaults_are_the_tutorial_recipe_and_valid():
  config = TrainConfig().validate()
  assert (config.batch_size, config.lr, config.momentum, config.step_size_epochs, config.gamma, config.epochs) == \
      (4, 0.001, 0.9, 7, 0.1, 25)
