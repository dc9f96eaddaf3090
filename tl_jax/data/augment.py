"""torchvision's transforms by class name: a spec list becomes a `Pipeline` that samples, then applies.

A spec is what a config holds: torchvision class names with their keyword arguments, applied in
order (`[{'Resize': {'size': [244, 244]}}, {'RandomCrop': {'size': 192}}, ..., {'ToTensor': {}},
{'Normalize': {...}}]`). Each op checks its arguments by torchvision's rules, draws its random
parameters from a numpy Generator in torchvision's order (`sample`), and applies them with the
functions of `tl_jax.data.transforms`, which copy torchvision's arithmetic for PIL images.

Geometric parameters depend on the image size after the previous ops (RandomCrop after Resize),
so `Pipeline.sample` carries the (width, height) through the ops without touching pixels.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import numpy as np
import pydantic
from PIL import Image
from pydantic import Field, StrictBool, StrictInt

from tl_jax.data import policies
from tl_jax.data import transforms as F
from tl_jax.data.op_base import (_PROB, _RANGE, _SIZE, FillArg, Number, Op, SizeArg, _BadArg, _check_fill,
                                 _check_interpolation, _check_size, _Coin, _uniform32)
from tl_jax.data.transforms import CropParams


class TransformSpecError(ValueError):
  """A transform spec that cannot be built; the message names the key path and the value."""


class Resize(Op):
  size: SizeArg = Field(description=_SIZE)
  interpolation: str = 'bilinear'
  max_size: Optional[StrictInt] = None
  antialias: Optional[StrictBool] = True  # PIL always antialiases bilinear/bicubic, as in torchvision

  def check(self):
    _check_size('size', self.size)
    _check_interpolation(self.interpolation)
    two = isinstance(self.size, list) and len(self.size) == 2
    if self.max_size is not None and two:
      raise _BadArg('max_size', self.max_size, 'max_size needs size to be an int (the smaller edge)')
    requested = self.size if isinstance(self.size, int) else self.size[0]
    if self.max_size is not None and self.max_size <= requested:
      raise _BadArg('max_size', self.max_size, f'must be greater than size {self.size}')

  def _size_hw(self, width, height):
    return F.resized_size(height, width, self.size, self.max_size)

  def size_after(self, width, height, params):
    out_h, out_w = self._size_hw(width, height)
    return out_w, out_h

  def fixed_size(self, size_hw):
    if isinstance(self.size, list) and len(self.size) == 2:
      return tuple(self.size)
    return None if size_hw is None else self._size_hw(size_hw[1], size_hw[0])

  def apply(self, img, params):
    return F.resize(img, self.size, F.INTERPOLATIONS[self.interpolation], self.max_size)


class CenterCrop(Op):
  size: SizeArg = Field(description=_SIZE)

  def check(self):
    _check_size('size', self.size)

  def size_after(self, width, height, params):
    crop_h, crop_w = F._pair(self.size)
    return crop_w, crop_h

  def fixed_size(self, size_hw):
    return F._pair(self.size)

  def apply(self, img, params):
    return F.center_crop(img, self.size)


class RandomCrop(Op):
  random: ClassVar[bool] = True
  size: SizeArg = Field(description=_SIZE)
  padding: Optional[SizeArg] = Field(None, description='an int, [left/right, top/bottom] or [left, top, right, '
                                                       'bottom]')
  pad_if_needed: StrictBool = False
  fill: FillArg = Field(0, description='a number or one per channel')
  padding_mode: str = 'constant'

  def check(self):
    _check_size('size', self.size)
    if isinstance(self.padding, list) and len(self.padding) not in (1, 2, 4):
      raise _BadArg('padding', self.padding, 'needs 1, 2 or 4 values')
    if self.padding_mode not in F.PADDING_MODES:
      raise _BadArg('padding_mode', self.padding_mode, f'allowed: {", ".join(F.PADDING_MODES)}')
    _check_fill(self.fill)

  def _padded_size(self, width, height):
    """torchvision's forward: `padding` first, then each short side padded on both ends."""
    if self.padding is not None:
      width, height = F.padded_size(width, height, self.padding)
    crop_h, crop_w = F._pair(self.size)
    if self.pad_if_needed and width < crop_w:
      width += 2 * (crop_w - width)
    if self.pad_if_needed and height < crop_h:
      height += 2 * (crop_h - height)
    return width, height

  def sample(self, rng, width, height):
    """RandomCrop.get_params on the padded image: the row offset, then the column offset."""
    width, height = self._padded_size(width, height)
    crop_h, crop_w = F._pair(self.size)
    if height < crop_h or width < crop_w:
      raise ValueError(f'RandomCrop: crop size {(crop_h, crop_w)} is larger than the image {(height, width)} '
                       f'(height, width); set pad_if_needed: true or resize first')
    if (height, width) == (crop_h, crop_w):
      return CropParams(0, 0, height, width)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return CropParams(top, left, crop_h, crop_w)

  def size_after(self, width, height, params):
    return params.width, params.height

  def fixed_size(self, size_hw):
    return F._pair(self.size)

  def apply(self, img, params):
    if self.padding is not None:
      img = F.pad(img, self.padding, self.fill, self.padding_mode)
    crop_h, crop_w = F._pair(self.size)
    width, height = img.size
    if self.pad_if_needed and width < crop_w:
      img = F.pad(img, [crop_w - width, 0], self.fill, self.padding_mode)
    if self.pad_if_needed and height < crop_h:
      img = F.pad(img, [0, crop_h - height], self.fill, self.padding_mode)
    return F.crop(img, params.top, params.left, params.height, params.width)


class RandomResizedCrop(Op):
  random: ClassVar[bool] = True
  size: SizeArg = Field(description=_SIZE)
  scale: list[Number] = Field([0.08, 1.0], description='[min, max]')
  ratio: list[Number] = Field([3.0 / 4.0, 4.0 / 3.0], description='[min, max]')
  interpolation: str = 'bilinear'
  antialias: Optional[StrictBool] = True

  def check(self):
    _check_size('size', self.size)
    _check_interpolation(self.interpolation)
    for key in ('scale', 'ratio'):
      value = getattr(self, key)
      if len(value) != 2 or value[0] > value[1]:
        raise _BadArg(key, value, 'needs [min, max] with min <= max')
    if self.ratio[0] <= 0:
      raise _BadArg('ratio', self.ratio, 'aspect ratios must be positive')

  def sample(self, rng, width, height):
    return F.sample_resized_crop(rng, height, width, tuple(self.scale), tuple(self.ratio))

  def size_after(self, width, height, params):
    crop_h, crop_w = F._pair(self.size)
    return crop_w, crop_h

  def fixed_size(self, size_hw):
    return F._pair(self.size)

  def apply(self, img, params):
    return F.resized_crop(img, params, self.size, F.INTERPOLATIONS[self.interpolation])


class RandomHorizontalFlip(_Coin):

  def apply(self, img, params):
    return F.hflip(img) if params else img


class RandomVerticalFlip(RandomHorizontalFlip):

  def apply(self, img, params):
    return F.vflip(img) if params else img


class RandomRotation(Op):
  random: ClassVar[bool] = True
  degrees: Union[Number, list[Number]] = Field(description=_RANGE + ' in degrees')
  interpolation: str = 'nearest'
  expand: StrictBool = False
  center: Optional[list[Number]] = Field(None, description='[x, y] in pixels')
  fill: FillArg = Field(0, description='a number or one per channel')

  def check(self):
    if isinstance(self.degrees, list):
      if len(self.degrees) != 2 or self.degrees[0] > self.degrees[1]:
        raise _BadArg('degrees', self.degrees, 'needs [min, max] with min <= max')
    elif self.degrees < 0:
      raise _BadArg('degrees', self.degrees, 'a single number must be non-negative (the range is [-d, d])')
    if self.center is not None and len(self.center) != 2:
      raise _BadArg('center', self.center, 'needs [x, y]')
    _check_interpolation(self.interpolation)
    _check_fill(self.fill)

  @property
  def range(self) -> tuple[float, float]:
    if isinstance(self.degrees, list):
      return float(self.degrees[0]), float(self.degrees[1])
    return -float(self.degrees), float(self.degrees)

  def sample(self, rng, width, height):
    return _uniform32(rng, *self.range)

  def size_after(self, width, height, params):
    return F.rotated_size(width, height, params, self.expand, self.center)

  def fixed_size(self, size_hw):
    return None if self.expand else size_hw

  def apply(self, img, params):
    return F.rotate(img, params, F.INTERPOLATIONS[self.interpolation], self.expand, self.center, self.fill)


@dataclasses.dataclass(frozen=True)
class JitterParams:
  """ColorJitter.get_params: the order of the four adjustments (0 brightness, 1 contrast,
  2 saturation, 3 hue) and each factor, None where that adjustment is off."""
  order: tuple[int, ...]
  brightness: Optional[float]
  contrast: Optional[float]
  saturation: Optional[float]
  hue: Optional[float]


class ColorJitter(Op):
  random: ClassVar[bool] = True
  brightness: Union[Number, list[Number]] = Field(0, description=_RANGE)
  contrast: Union[Number, list[Number]] = Field(0, description=_RANGE)
  saturation: Union[Number, list[Number]] = Field(0, description=_RANGE)
  hue: Union[Number, list[Number]] = Field(0, description=_RANGE + ' within [-0.5, 0.5]')

  _ADJUST: ClassVar[tuple] = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
  _NAMES: ClassVar[tuple] = ('brightness', 'contrast', 'saturation', 'hue')

  @staticmethod
  def _range(name, value, center=1.0, bound=(0.0, float('inf')), clip_first_on_zero=True):
    """ColorJitter._check_input: the factor range, None when it is the identity."""
    if isinstance(value, numbers.Number):
      if value < 0:
        raise _BadArg(name, value, 'a single number must be non-negative')
      low, high = center - float(value), center + float(value)
      if clip_first_on_zero:
        low = max(low, 0.0)
    elif len(value) == 2:
      low, high = float(value[0]), float(value[1])
    else:
      raise _BadArg(name, value, 'needs a number or [min, max]')
    if not bound[0] <= low <= high <= bound[1]:
      raise _BadArg(name, value, f'the range [{low}, {high}] must be ordered and lie within {list(bound)}')
    return None if low == high == center else (low, high)

  def ranges(self) -> tuple[Optional[tuple[float, float]], ...]:
    return (self._range('brightness', self.brightness), self._range('contrast', self.contrast),
            self._range('saturation', self.saturation),
            self._range('hue', self.hue, center=0.0, bound=(-0.5, 0.5), clip_first_on_zero=False))

  def check(self):
    self.ranges()

  def sample(self, rng, width, height):
    """torch.randperm(4), then a factor for each adjustment that is on, in the fixed order b, c, s, h."""
    order = tuple(int(i) for i in rng.permutation(4))
    factors = [None if r is None else _uniform32(rng, *r) for r in self.ranges()]
    return JitterParams(order, *factors)

  def apply(self, img, params):
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for index in params.order:
      if factors[index] is not None:
        img = self._ADJUST[index](img, factors[index])
    return img


class RandomGrayscale(_Coin):
  p: Number = Field(0.1, description=_PROB)

  def apply(self, img, params):
    # As many output channels as the input has (3 for RGB).
    return F.to_grayscale(img, len(img.getbands())) if params else img


class Grayscale(Op):
  num_output_channels: StrictInt = 1

  def check(self):
    if self.num_output_channels not in (1, 3):
      raise _BadArg('num_output_channels', self.num_output_channels, 'allowed: 1, 3')

  def bands_after(self, bands):
    return self.num_output_channels

  def apply(self, img, params):
    return F.to_grayscale(img, self.num_output_channels)


class GaussianBlur(Op):
  random: ClassVar[bool] = True
  kernel_size: SizeArg = Field(description='an odd int or [width, height] of odd ints')
  sigma: Union[Number, list[Number]] = Field([0.1, 2.0], description='a positive number or [min, max]')

  def check(self):
    sizes = [self.kernel_size] if isinstance(self.kernel_size, int) else self.kernel_size
    if len(sizes) not in (1, 2) or any(k <= 0 or k % 2 == 0 for k in sizes):
      raise _BadArg('kernel_size', self.kernel_size, 'needs one or two odd positive ints')
    if isinstance(self.sigma, list):
      if len(self.sigma) != 2 or not 0.0 < self.sigma[0] <= self.sigma[1]:
        raise _BadArg('sigma', self.sigma, 'needs [min, max] with 0 < min <= max')
    elif self.sigma <= 0:
      raise _BadArg('sigma', self.sigma, 'a single number must be positive')

  def sample(self, rng, width, height):
    low, high = (self.sigma, self.sigma) if not isinstance(self.sigma, list) else self.sigma
    return _uniform32(rng, float(low), float(high))  # drawn even when low == high, as torch does

  def apply(self, img, params):
    return F.gaussian_blur(img, F._pair(self.kernel_size), (params, params))


class ToTensor(Op):
  stage: ClassVar[str] = 'to_tensor'


class Normalize(Op):
  stage: ClassVar[str] = 'tensor'
  mean: Union[Number, list[Number]] = Field(description='one number or one per channel')
  std: Union[Number, list[Number]] = Field(description='one number or one per channel')
  inplace: StrictBool = False  # no effect: arrays are never shared

  def check(self):
    lengths = {np.size(self.mean), np.size(self.std)} - {1}
    if len(lengths) > 1:
      raise _BadArg('std', self.std, f'needs as many values as mean {self.mean} (or one)')
    if np.any(np.asarray(self.std, np.float32) == 0):
      raise _BadArg('std', self.std, 'a zero std divides by zero')

  @property
  def mean_tuple(self) -> tuple[float, ...]:
    return tuple(float(m) for m in np.atleast_1d(self.mean))

  @property
  def std_tuple(self) -> tuple[float, ...]:
    return tuple(float(s) for s in np.atleast_1d(self.std))


TRANSFORMS: dict[str, type[Op]] = {cls.__name__: cls for cls in (
    Resize, CenterCrop, RandomCrop, RandomResizedCrop, RandomHorizontalFlip, RandomVerticalFlip, RandomRotation,
    ColorJitter, RandomGrayscale, Grayscale, GaussianBlur, ToTensor, Normalize)}
TRANSFORMS.update(policies.TRANSFORMS)   # issue 24's: the policies, RandomErasing, RandomAffine, ...


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """Transforms applied in order to a PIL image, ending in ToTensor and Normalize: float32 HWC out.

  `sample` draws every random parameter (in torchvision's order) for an image of PIL size
  (width, height); `apply` is deterministic given them.
  """
  ops: tuple[Op, ...]

  @property
  def _pil_ops(self) -> tuple[Op, ...]:
    return tuple(op for op in self.ops if op.stage == 'pil')

  @property
  def _sampled_ops(self) -> tuple[Op, ...]:
    """The ops with an entry in `sample`'s tuple: every PIL op, then the random ops on the array."""
    return self._pil_ops + tuple(op for op in self.ops if op.stage == 'tensor' and op.random)

  @property
  def supports_uint8(self) -> bool:
    """Whether `apply_uint8` + `finish_uint8` give `apply`'s arrays: nothing but Normalize after ToTensor."""
    return not any(op.stage == 'tensor' and op.random for op in self.ops)

  @property
  def _normalize(self) -> Normalize:
    return next(op for op in self.ops if isinstance(op, Normalize))

  @property
  def deterministic(self) -> bool:
    return not any(op.random for op in self.ops)

  @property
  def mean(self) -> tuple[float, ...]:
    return self._normalize.mean_tuple

  @property
  def std(self) -> tuple[float, ...]:
    return self._normalize.std_tuple

  @property
  def output_size(self) -> Optional[tuple[int, int]]:
    """(height, width) of every output when the ops fix it (a crop, or Resize to [h, w]), else None."""
    size_hw = None
    for op in self._pil_ops:
      size_hw = op.fixed_size(size_hw)
    return size_hw

  def sample(self, rng: Optional[np.random.Generator], width: int, height: int, bands: int = 3) -> tuple:
    """Each PIL op's parameters, then each random array op's, drawn in order while tracking the image
    size (and channel count, `bands` for the input) through the ops."""
    if rng is None and not self.deterministic:
      raise ValueError('a pipeline with random transforms needs a numpy Generator, got None')
    params = []
    for op in self._pil_ops:
      op_params = op.sample(rng, width, height)
      width, height = op.size_after(width, height, op_params)
      bands = op.bands_after(bands)
      params.append(op_params)
    for op in self._sampled_ops[len(params):]:
      params.append(op.sample(rng, width, height, bands))
    return tuple(params)

  def _apply_pil(self, img: Image.Image, params: tuple) -> Image.Image:
    for op, op_params in zip(self._pil_ops, params[:len(self._pil_ops)], strict=True):
      img = op.apply(img, op_params)
    return img

  def apply(self, img: Image.Image, params: tuple) -> np.ndarray:
    """float32 HWC: ToTensor's scaling then the array ops in order (Normalize, RandomErasing), equal to
    torchvision's CHW tensor transposed."""
    array = F.to_array(self._apply_pil(img, params))
    array_params = iter(params[len(self._pil_ops):])
    for op in self.ops:
      if isinstance(op, Normalize):
        array = F.normalize(array, op.mean_tuple, op.std_tuple)
      elif op.stage == 'tensor' and op.random:
        array = op.apply_array(array, next(array_params))
    return array

  def apply_uint8(self, img: Image.Image, params: tuple) -> np.ndarray:
    """uint8 HWC: every op before ToTensor; `finish_uint8` (or the same on the device) does the rest.

    Only for 8-bit images ('RGB' or 'L' after the ops), where ToTensor is a division by 255, and
    pipelines with nothing but Normalize after ToTensor (`supports_uint8`).
    """
    if not self.supports_uint8:
      names = [type(op).__name__ for op in self.ops if op.stage == 'tensor' and op.random]
      raise ValueError(f'apply_uint8: {", ".join(names)} works on the float array after ToTensor, which uint8 '
                       f'batches do not carry; use apply (data.uint8_batches: false)')
    out = self._apply_pil(img, params)
    if out.mode not in ('RGB', 'L'):
      raise ValueError(f'apply_uint8 needs an 8-bit RGB or L image after the transforms, got mode {out.mode!r}; '
                       f'convert the image to RGB first or use apply')
    return np.asarray(out, np.uint8).reshape(out.height, out.width, -1)

  def finish_uint8(self, images_hwc: np.ndarray) -> np.ndarray:
    """ToTensor and Normalize on uint8 arrays (any leading axes): equals `apply` on the same image."""
    scaled = images_hwc.astype(np.float32) / np.float32(255)
    return (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

  def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    return self.apply(img, self.sample(rng, img.width, img.height))

  def to_spec(self) -> list[dict[str, dict[str, Any]]]:
    """JSON-able spec with every argument spelled out; `build_pipeline` rebuilds an equal pipeline."""
    return [{type(op).__name__: op.model_dump(mode='json')} for op in self.ops]


def _fail(path: str, value: Any, message: str):
  raise TransformSpecError(f'{path}: {message} (got {value!r})')


def _build_op(entry: Any, path: str) -> Op:
  if not isinstance(entry, Mapping) or len(entry) != 1:
    _fail(path, entry, 'each transform is a one-key mapping {ClassName: {keyword: value}}')
  (name, kwargs), = entry.items()
  if name not in TRANSFORMS:
    _fail(path, name, f'unknown transform; allowed: {", ".join(TRANSFORMS)}')
  cls = TRANSFORMS[name]
  path = f'{path}.{name}'
  if kwargs is None:
    kwargs = {}
  if not isinstance(kwargs, Mapping):
    _fail(path, kwargs, 'the arguments are a mapping {keyword: value} ({} for none)')
  allowed = list(cls.model_fields)
  for key in kwargs:
    if key not in cls.model_fields:
      _fail(f'{path}.{key}', kwargs[key], f'unknown argument; allowed: {", ".join(allowed) or "none"}')
  try:
    op = cls(**kwargs)
  except pydantic.ValidationError as e:
    error = e.errors()[0]
    key = str(error['loc'][0])
    field = cls.model_fields[key]
    expected = field.description or getattr(field.annotation, '__name__', str(field.annotation))
    if error['type'] == 'missing':
      raise TransformSpecError(f'{path}.{key}: missing, expected {expected}') from None
    _fail(f'{path}.{key}', kwargs[key], f'expected {expected}')
  try:
    op.check()
  except _BadArg as e:
    _fail(f'{path}.{e.key}', e.value, e.message)
  return op


def build_pipeline(spec: Sequence[Mapping[str, Optional[Mapping[str, Any]]]],
                   where: str = 'data.train_transforms') -> Pipeline:
  """A `Pipeline` from torchvision class names and keyword arguments, applied in order.

  Args:
    spec: a list of one-key mappings `{ClassName: {keyword: value}}` (lists for tuples); `TRANSFORMS`
      holds the names. It must convert to an array with ToTensor and end with Normalize.
    where: the key path of `spec` in its config, for the error messages.

  Raises:
    TransformSpecError: one line naming the key path, the value and what is allowed.
  """
  if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
    _fail(where, spec, 'expected a list of transforms')
  ops: list[Op] = []
  to_tensor_at = None
  for index, entry in enumerate(spec):
    path = f'{where}[{index}]'
    op = _build_op(entry, path)
    name = type(op).__name__
    if op.stage == 'pil' and to_tensor_at is not None:
      _fail(path, name, f'works on PIL images but comes after ToTensor ({where}[{to_tensor_at}]); move it before')
    if op.stage == 'to_tensor' and to_tensor_at is not None:
      _fail(path, name, f'a second ToTensor ({where}[{to_tensor_at}] is the first)')
    if op.stage == 'tensor' and to_tensor_at is None:
      _fail(path, name, f'{name} works on the tensor from ToTensor; put ToTensor before it')
    if isinstance(op, Normalize) and any(isinstance(o, Normalize) for o in ops):
      _fail(path, name, 'a second Normalize; combine them into one')
    if op.stage == 'to_tensor':
      to_tensor_at = index
    ops.append(op)
  if to_tensor_at is None:
    _fail(where, [next(iter(e)) for e in spec], 'no ToTensor: the model needs a normalised float tensor; '
          'end the list with ToTensor: {} and Normalize: {mean: [...], std: [...]}')
  if not any(isinstance(op, Normalize) for op in ops):
    _fail(where, [next(iter(e)) for e in spec], 'no Normalize: the model needs a normalised float tensor; '
          'add Normalize: {mean: [...], std: [...]} after ToTensor')
  return Pipeline(tuple(ops))


def tutorial_train_spec(preprocessing) -> list[dict[str, dict[str, Any]]]:
  """RandomResizedCrop(crop) + RandomHorizontalFlip + ToTensor + Normalize: the tutorial's training
  transforms with the weights' `Preprocessing` (tl_jax.weights), as TrainTransform."""
  return [
      {'RandomResizedCrop': {'size': preprocessing.crop_size, 'interpolation': preprocessing.interpolation}},
      {'RandomHorizontalFlip': {}},
      {'ToTensor': {}},
      {'Normalize': {'mean': list(preprocessing.mean), 'std': list(preprocessing.std)}},
  ]


def tutorial_val_spec(preprocessing) -> list[dict[str, dict[str, Any]]]:
  """Resize(resize) + CenterCrop(crop) + ToTensor + Normalize, as EvalTransform."""
  return [
      {'Resize': {'size': preprocessing.resize_size, 'interpolation': preprocessing.interpolation}},
      {'CenterCrop': {'size': preprocessing.crop_size}},
      {'ToTensor': {}},
      {'Normalize': {'mean': list(preprocessing.mean), 'std': list(preprocessing.std)}},
  ]
