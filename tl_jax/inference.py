"""A model checkpoint made ready to run: its Flax module, variables on the device, its val
preprocessing, one jitted eval-mode forward shared by evaluation, prediction and training's
end-of-run outputs, its fitted temperature, and the views of test-time augmentation.

TTA (`--tta`) follows torchvision's FiveCrop recipe: `five-crop` runs the val transforms with
their CenterCrop replaced by FiveCrop of the same size (each crop then goes through the rest of
the list: ToTensor, Normalize), `flip` takes the val crop and its horizontal mirror; the
probabilities are the mean of the views' softmax (tl_jax.calibration.probabilities).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from PIL import Image

from tl_jax import xla_defaults
from tl_jax.data import transforms as F
from tl_jax.checkpoint import ModelCheckpoint, load_model
from tl_jax.data.augment import CenterCrop, Pipeline, build_pipeline, tutorial_val_spec
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

  @property
  def temperature(self) -> Optional[float]:
    """The temperature fitted for this checkpoint (evaluate.py --fit-temperature), or None."""
    value = self.checkpoint.metadata.get('temperature')
    return None if value is None else float(value)

  def view_logits(self, images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) -> (B, classes) logits, or (B, V, H, W, C) views -> (B, V, classes), float32."""
    return view_logits(self.forward, self.variables, images)


def load_inference(model_dir: str | Path) -> Inference:
  """A model checkpoint directory -> its module, device variables, val preprocessing and forward."""
  checkpoint = load_model(model_dir)
  crop_size = (checkpoint.metadata.get('preprocessing') or {}).get('crop_size')
  model = create_model(checkpoint.arch, checkpoint.num_classes, image_size=crop_size)
  return Inference(checkpoint, model, jax.device_put(checkpoint.variables), eval_transform_for(checkpoint),
                   make_forward(model))


# ---------------------------------------------------------------------------------- TTA

TTA_MODES = ('flip', 'five-crop')


class TTAError(ValueError):
  """A test-time augmentation that the val transforms or an image cannot give."""


def five_crop(img: Image.Image, size) -> list[Image.Image]:
  """F.five_crop on a PIL image: top-left, top-right, bottom-left, bottom-right and centre crops."""
  crop_h, crop_w = F._pair(size)
  if crop_w > img.width or crop_h > img.height:
    raise TTAError(f'--tta five-crop: the crop {crop_h}x{crop_w} is bigger than the resized image '
                   f'{img.height}x{img.width} (torchvision\'s FiveCrop refuses it too); use --tta flip')
  bottom, right = img.height - crop_h, img.width - crop_w
  return [F.crop(img, 0, 0, crop_h, crop_w), F.crop(img, 0, right, crop_h, crop_w),
          F.crop(img, bottom, 0, crop_h, crop_w), F.crop(img, bottom, right, crop_h, crop_w),
          F.center_crop(img, (crop_h, crop_w))]


def _pil_ops(pipeline: Pipeline) -> list:
  return [op for op in pipeline.ops if op.stage == 'pil']


def check_tta(pipeline: Pipeline, mode: Optional[str]) -> None:
  """Raises TTAError (one line) unless `pipeline` (a checkpoint's val transforms) can give `mode`'s views."""
  if mode is None:
    return
  if mode not in TTA_MODES:
    raise TTAError(f'--tta {mode!r} is not known; choose one of {", ".join(TTA_MODES)}')
  if not pipeline.deterministic:
    raise TTAError('--tta needs deterministic val transforms; the checkpoint\'s val_transforms draw at random')
  if mode == 'five-crop' and not any(isinstance(op, CenterCrop) for op in _pil_ops(pipeline)):
    names = [type(op).__name__ for op in pipeline.ops]
    raise TTAError(f'--tta five-crop replaces the val transforms\' CenterCrop by FiveCrop, but the checkpoint\'s '
                   f'val transforms {names} have none; use --tta flip')


def tta_views(pipeline: Pipeline, mode: str, img: Image.Image) -> np.ndarray:
  """(V, H, W, C) float32: the views of `img` under `mode` (V = 2 for flip, 5 for five-crop)."""
  if mode == 'flip':
    view = pipeline(img)
    return np.stack([view, view[:, ::-1]])   # the mirror of the array is the array of the mirror
  ops = _pil_ops(pipeline)
  at = next(i for i, op in enumerate(ops) if isinstance(op, CenterCrop))
  for op in ops[:at]:
    img = op.apply(img, op.sample(None, img.width, img.height))
  views = []
  for crop in five_crop(img, ops[at].size):
    for op in ops[at + 1:]:
      crop = op.apply(crop, op.sample(None, crop.width, crop.height))
    views.append(F.normalize(F.to_array(crop), pipeline.mean, pipeline.std))
  return np.stack(views)


def tta_transform(pipeline: Pipeline, mode: Optional[str]):
  """image -> float32 (H, W, C) (mode None: `pipeline` itself) or (V, H, W, C) views."""
  check_tta(pipeline, mode)
  if mode is None:
    return pipeline
  return functools.partial(tta_views, pipeline, mode)


def view_logits(forward: Callable, variables: Mapping, images: np.ndarray) -> np.ndarray:
  """`forward` on (B, H, W, C) images, or on (B, V, H, W, C) views as one (B*V, ...) batch -> (B, V, classes)."""
  images = np.asarray(images)
  if images.ndim == 4:
    return np.asarray(forward(variables, images))
  b, v = images.shape[:2]
  return np.asarray(forward(variables, images.reshape((b * v,) + images.shape[2:]))).reshape(b, v, -1)
