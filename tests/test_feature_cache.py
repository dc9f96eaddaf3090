"""Cached backbone features (tl_jax.feature_cache): when they apply, and that a cached run
computes what the uncached run computes."""

import numpy as np
import pytest

from tl_jax import feature_cache
from tl_jax.feature_cache import plan

from test_train import SMALL_TRANSFORMS, _small_folder

DETERMINISTIC_TRAIN = [{'Resize': {'size': 36}}, {'CenterCrop': {'size': 32}}, {'ToTensor': {}},
                       {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]}}]


@pytest.mark.parametrize('arch, trainable, bn, deterministic, expected', [
    ('resnet18', ['head'], 'frozen', False, (False, True)),       # the tutorial's frozen recipe with --bn frozen
    ('resnet18', ['head'], 'frozen', True, (True, True)),
    ('resnet18', ['head'], 'train', True, (False, False)),        # the tutorial's own: BN statistics move
    ('resnet18', ['layer4', 'head'], 'frozen', True, (False, False)),
    ('vgg16', ['classifier', 'head'], 'train', True, (True, True)),   # no BatchNorm in the base
    ('vgg16_bn', ['classifier', 'head'], 'train', True, (False, False)),
    ('vgg16_bn', ['head'], 'frozen', False, (False, True)),
    ('vgg16', ['block5', 'classifier', 'head'], 'frozen', True, (False, False)),
    ('vit_b_16', ['head'], 'train', True, (True, True)),           # no BatchNorm, no stochastic depth
    ('convnext_tiny', ['head'], 'train', True, (False, True)),     # stochastic depth draws in train mode
    ('swin_t', ['head'], 'frozen', True, (False, True)),
    ('efficientnet_b0', ['head'], 'frozen', True, (False, True)),
])
def test_plan_caches_exactly_when_the_backbone_cannot_change(arch, trainable, bn, deterministic, expected):
  p = plan(arch, trainable, bn, deterministic)
  assert (p.train, p.val) == expected
  assert p.any == any(expected) and (p.reason == '') == any(expected)
  assert p.backbone_learns == any(s not in ('classifier', 'head') for s in trainable)


def test_plan_is_off_when_disabled_or_multi_process():
  assert not plan('resnet18', ['head'], 'frozen', True, enabled=False).any
  assert 'false' in plan('resnet18', ['head'], 'frozen', True, enabled=False).describe()
  assert not plan('resnet18', ['head'], 'frozen', True, process_count=2).any


def test_feature_loader_gives_the_image_loaders_rows_labels_and_padding_every_epoch(tmp_path):
  from tl_jax.data.folder import ImageFolder
  from tl_jax.data.loader import Loader
  root = _small_folder(tmp_path / 'data', per_class=5)
  samples = ImageFolder(root / 'train').samples
  loader = Loader(samples, lambda img, rng: np.zeros((2, 2, 3), np.float32), 4, shuffle=True, workers=0)
  # Feature row i holds i, so each feature batch shows which samples it carries.
  features = np.repeat(np.arange(len(samples), dtype=np.float32)[:, None], 3, axis=1)
  cached = feature_cache.FeatureLoader(loader, features)
  assert len(cached) == len(loader) == 3
  for epoch in range(3):
    for images, feats in zip(loader.epoch(epoch), cached.epoch(epoch), strict=True):
      np.testing.assert_array_equal(feats.indices, images.indices)
      np.testing.assert_array_equal(feats.labels, images.labels)
      np.testing.assert_array_equal(feats.mask, images.mask)
      np.testing.assert_array_equal(feats.features[:, 0], np.where(images.mask, images.indices, 0))
  with pytest.raises(ValueError, match='4 feature rows for 10 samples'):
    feature_cache.FeatureLoader(loader, features[:4])


def _run(tmp_path, name, arch, stages, cache, **data):
  from tl_jax.config import validate
  from tl_jax.training import train_and_evaluate
  config = validate({'model': {'arch': arch, 'weights': 'random'},
                     'data': {'path': str(tmp_path / 'data'), 'batch_size': 4, 'eval_batch_size': 8, 'workers': 0,
                              **SMALL_TRANSFORMS, 'cache_features': cache, **data},
                     'stages': stages, 'seed': 0})
  lines = []
  result = train_and_evaluate(config, tmp_path / name, progress=False, plots=False, report=False,
                              log=lines.append)
  return result, '\n'.join(lines)


def _assert_same_run(a, b, tol=1e-6):
  import jax
  assert len(a.history) == len(b.history)
  for row_a, row_b in zip(a.history, b.history):
    for key in ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'lr'):
      np.testing.assert_allclose(row_a[key], row_b[key], rtol=tol, atol=tol, err_msg=f'epoch {row_a["epoch"]} {key}')
  assert a.best_epoch == b.best_epoch
  for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a.state.params)),
                  jax.tree_util.tree_leaves(jax.device_get(b.state.params))):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize('deterministic_train', [False, True])
def test_cached_features_train_the_head_exactly_like_the_backbone_every_epoch(tmp_path, deterministic_train):
  """ResNet-18, head only, bn: frozen: val features are cached (and train ones when the train
  transforms are deterministic); every metric of every epoch and the weights equal the uncached run."""
  _small_folder(tmp_path / 'data')
  stages = [{'name': 'head', 'epochs': 3, 'trainable': ['head'], 'bn': 'frozen',
             'optimizer': {'name': 'sgd', 'lr': 0.05, 'momentum': 0.9},
             'schedule': {'name': 'step', 'step_size': 2, 'gamma': 0.1}}]
  data = {'train_transforms': DETERMINISTIC_TRAIN} if deterministic_train else {}
  uncached, log_off = _run(tmp_path, 'off', 'resnet18', stages, False, **data)
  cached, log_on = _run(tmp_path, 'on', 'resnet18', stages, True, **data)
  assert 'cached backbone features' not in log_off
  expected = 'train and val' if deterministic_train else 'for val ('
  assert f'cached backbone features {"for " if deterministic_train else ""}{expected}' in log_on
  assert cached.history[0]['feature_seconds'] > 0 and cached.history[1]['feature_seconds'] == 0
  _assert_same_run(cached, uncached)
  # Training moved the head (the comparison is not between two untrained models).
  assert cached.history[-1]['train_loss'] != cached.history[0]['train_loss']


@pytest.mark.slow
def test_cached_features_keep_vgg_dropout_masks_and_the_classifier_stage(tmp_path):
  """The material's VGG recipe (features frozen; classifier and head learn, dropout on) on a
  plain VGG, whose base has no BatchNorm: both phases cached, the same run as uncached."""
  _small_folder(tmp_path / 'data', per_class=4, val_per_class=2)
  stages = [{'name': 'classifier', 'epochs': 2, 'trainable': ['classifier', 'head'],
             'optimizer': {'name': 'adam', 'lr': 1e-4}}]
  data = {'train_transforms': DETERMINISTIC_TRAIN}
  uncached, _ = _run(tmp_path, 'off', 'vgg11', stages, False, **data)
  cached, log_on = _run(tmp_path, 'on', 'vgg11', stages, True, **data)
  assert 'cached backbone features for train and val' in log_on
  _assert_same_run(cached, uncached, tol=2e-6)


@pytest.mark.slow
def test_a_stage_with_a_learning_backbone_after_a_cached_one_sees_images_again(tmp_path):
  _small_folder(tmp_path / 'data', per_class=4, val_per_class=2)
  stages = [{'name': 'head', 'epochs': 1, 'trainable': ['head'], 'bn': 'frozen'},
            {'name': 'all', 'epochs': 1, 'trainable': 'all', 'bn': 'frozen'}]
  result, log = _run(tmp_path, 'run', 'resnet18', stages, True)
  assert 'stage head: cached backbone features for val' in log
  assert [line for line in log.splitlines() if line.startswith('stage all:') and 'compiled' not in line] == []
  uncached, _ = _run(tmp_path, 'off', 'resnet18', stages, False)
  _assert_same_run(result, uncached)


@pytest.mark.slow
def test_cached_features_of_uint8_batches_are_normalised_like_float_batches(tmp_path):
  """data.uint8_batches: the feature step normalises on the device as the train and eval steps do."""
  _small_folder(tmp_path / 'data', per_class=4, val_per_class=2)
  stages = [{'name': 'head', 'epochs': 1, 'trainable': ['head'], 'bn': 'frozen'}]
  data = {'train_transforms': DETERMINISTIC_TRAIN}
  floats, _ = _run(tmp_path, 'float', 'resnet18', stages, False, **data)
  cached, log = _run(tmp_path, 'uint8', 'resnet18', stages, True, uint8_batches=True, **data)
  assert 'uint8, normalised on the device' in log and 'cached backbone features for train and val' in log
  _assert_same_run(cached, floats)
