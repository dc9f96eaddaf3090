"""Cached backbone features for a stage whose backbone cannot change (tl_jax.feature_cache)."""

from __future__ import annotations

import functools
from typing import Optional

import jax

from tl_jax import feature_cache, parallel
from tl_jax.config import Config
from tl_jax.data import on_device
from tl_jax.data.loader import Loader
from tl_jax.training.stages import Stage
from tl_jax.training.state import TrainState
from tl_jax.training.steps import features_step


def feature_plan(config: Config, index: int, train_deterministic: bool) -> feature_cache.Plan:
  """Which phases of stage `index` read cached backbone features (tl_jax.feature_cache)."""
  # MixUp/CutMix mix the images, so the train phase cannot read features computed once.
  mixing = config.data.mixup_alpha > 0 or config.data.cutmix_alpha > 0
  return feature_cache.plan(config.model.arch, config.trainable_stages(index), config.stages[index].bn,
                            train_deterministic and not mixing, config.data.cache_features, jax.process_count())


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
