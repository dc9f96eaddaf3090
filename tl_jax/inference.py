"""A model checkpoint made ready to run: its Flax module, variables on the device, its val
preprocessing, and one jitted eval-mode forward shared by evaluation, prediction and training's
end-of-run outputs."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax

from tl_jax import xla_defaults
from tl_jax.checkpoint import ModelCheckpoint, load_model
from tl_jax.data.augment import build_pipeline, tutorial_val_spec
from tl_jax.models import create_model
from tl_jax.weights import Preprocessing


def eval_transform_for(model: ModelCheckpoint):
  """The preprocessing a checkpoint's model was validated with: image -> float32 HWC array.

  A training run saves its val transform list (`val_transforms`); other checkpoints (converted
  weights) carry the weights' preprocessing: Resize, CenterCrop, ToTensor, Normalize.
  """
  spec = model.metadata.get('val_transforms')
  if spec:
    return build_pipeline(spec, where='the checkpoint\'s val_transforms')
  preprocessing = Preprocessing.from_dict(model.metadata.get('preprocessing') or {})
  return build_pipeline(tutorial_val_spec(preprocessing), where='the checkpoint\'s preprocessing')


def _logits(variables: Mapping, images_bhwc: jax.Array, *, model) -> jax.Array:
  return model.apply(variables, images_bhwc, train=False)


@functools.lru_cache(maxsize=None)
def _jitted_logits() -> Callable:
  # Made on first use, not at import: the options ask which backend JAX runs on.
  return jax.jit(_logits, static_argnames='model', compiler_options=xla_defaults.forward_compiler_options())


def eval_logits(variables: Mapping, images_bhwc: jax.Array, *, model) -> jax.Array:
  """Eval-mode logits. Jitted with the (hashable) model static, so every evaluation of the same
  architecture and batch shape in a process shares one compile."""
  return _jitted_logits()(variables, images_bhwc, model=model)


def make_forward(model) -> Callable:
  """The jitted eval-mode forward `(variables, images_bhwc) -> logits`."""
  return functools.partial(eval_logits, model=model)


@dataclasses.dataclass
class Inference:
  """What running a checkpoint needs; `forward(variables, images_bhwc)` gives eval-mode logits."""
  checkpoint: ModelCheckpoint
  model: Any
  variables: Mapping
  transform: Callable
  forward: Callable

  @property
  def class_names(self) -> Optional[list[str]]:
    return self.checkpoint.class_names


def load_inference(model_dir: str | Path) -> Inference:
  """A model checkpoint directory -> its module, device variables, val preprocessing and forward."""
  checkpoint = load_model(model_dir)
  crop_size = (checkpoint.metadata.get('preprocessing') or {}).get('crop_size')
  model = create_model(checkpoint.arch, checkpoint.num_classes, image_size=crop_size)
  return Inference(checkpoint, model, jax.device_put(checkpoint.variables), eval_transform_for(checkpoint),
                   make_forward(model))
