"""torchvision's v1 transforms on PIL images, in PIL and NumPy, split into sampling and applying.

Each op copies the arithmetic of torchvision.transforms.functional (and `_functional_pil`) for PIL
input, so that given the same parameters the outputs are equal: PIL images pixel for pixel, float
arrays to float32 rounding. Random transforms draw their parameters from a `numpy.random.Generator`
in a separate step (`sample_*`), so a test can feed the same parameters to torchvision.

Arrays come out HWC (channels last) because the model is NHWC; torchvision's tensors are CHW.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# An int or (height, width); see each function for what an int means there.
Size = Union[int, Sequence[int]]

# torchvision's ToTensor keeps these as integer tensors (no division by 255), which Normalize refuses.
_INTEGER_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


def _pair(size: Size) -> tuple[int, int]:
  """(height, width) from an int (square) or a 1- or 2-sequence, as torchvision's `_setup_size`."""
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  if len(size) == 1:
    return int(size[0]), int(size[0])
  if len(size) != 2:
    raise ValueError(f'size must be an int or (height, width), got {size!r}')
  return int(size[0]), int(size[1])


def resized_size(height: int, width: int, size: Size) -> tuple[int, int]:
  """Output (height, width) of `resize`, as torchvision's `_compute_resized_output_size`.

  An int (or 1-sequence) sets the shorter side; the longer one is truncated with int(), not rounded.
  """
  if isinstance(size, (int, np.integer)) or len(size) == 1:
    requested = int(size) if isinstance(size, (int, np.integer)) else int(size[0])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = requested, int(requested * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w
  return _pair(size)


def resize(img: Image.Image, size: Size, interpolation: int = Image.BILINEAR) -> Image.Image:
  """F.resize on a PIL image: an int sets the shorter side, (height, width) sets both.

  Like torchvision, returns `img` itself when the size does not change (PIL would copy it) and
  otherwise calls PIL's resize, which always antialiases bilinear/bicubic.
  """
  out_h, out_w = resized_size(img.height, img.width, size)
  if (out_h, out_w) == (img.height, img.width):
    return img
  return img.resize((out_w, out_h), interpolation)


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
  """F.crop on a PIL image; parts of the box outside the image come out as zeros (PIL's crop)."""
  return img.crop((left, top, left + width, top + height))


def _pad_with_zeros(img: Image.Image, padding_ltrb: Sequence[int]) -> Image.Image:
  """F.pad(img, padding, fill=0) on a PIL image, keeping the palette of a 'P' image."""
  num_channels = len(img.getbands())
  fill = tuple([0] * num_channels) if num_channels > 1 else 0
  border = tuple(padding_ltrb)
  if img.mode == 'P':
    palette = img.getpalette()
    padded = ImageOps.expand(img, border=border, fill=fill)
    padded.putpalette(palette)
    return padded
  return ImageOps.expand(img, border=border, fill=fill)


def center_crop(img: Image.Image, size: Size) -> Image.Image:
  """F.center_crop: pads with zeros where the crop is larger than the image, then crops.

  The offset is int(round((H - h) / 2)) with Python's round-half-to-even, so an odd margin of
  1 gives offset 0 but a margin of 3 gives 2.
  """
  crop_h, crop_w = _pair(size)
  width, height = img.size
  if crop_w > width or crop_h > height:
    padding_ltrb = [
        (crop_w - width) // 2 if crop_w > width else 0,
        (crop_h - height) // 2 if crop_h > height else 0,
        (crop_w - width + 1) // 2 if crop_w > width else 0,
        (crop_h - height + 1) // 2 if crop_h > height else 0,
    ]
    img = _pad_with_zeros(img, padding_ltrb)
    width, height = img.size
    if crop_w == width and crop_h == height:
      return img
  top = int(round((height - crop_h) / 2.0))
  left = int(round((width - crop_w) / 2.0))
  return crop(img, top, left, crop_h, crop_w)


@dataclasses.dataclass(frozen=True)
class CropParams:
  """A crop box in pixels: torchvision's (i, j, h, w)."""
  top: int
  left: int
  height: int
  width: int


def sample_resized_crop(rng: np.random.Generator, height: int, width: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)) -> CropParams:
  """RandomResizedCrop.get_params for an image of `height` x `width`.

  Ten tries of an area fraction ~ U(scale) and an aspect ratio (w/h) log-uniform in `ratio`;
  the first box that fits gets a uniform position. If none fits, the centred crop of the whole
  image clamped to `ratio`. torch draws the fractions and log-ratios in float32; so do we.
  """
  area = height * width
  log_ratio = np.log(np.asarray(ratio, np.float32))
  for _ in range(10):
    target_area = area * float(np.float32(rng.uniform(scale[0], scale[1])))
    log_aspect = np.float32(rng.uniform(float(log_ratio[0]), float(log_ratio[1])))
    aspect_ratio = float(np.exp(log_aspect))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return CropParams(top, left, h, w)
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w = width
    h = height
  return CropParams((height - h) // 2, (width - w) // 2, h, w)


def resized_crop(img: Image.Image, params: CropParams, size: Size,
                 interpolation: int = Image.BILINEAR) -> Image.Image:
  """Crop `params` then resize to `size`: an int means a square, as in RandomResizedCrop(size).

  Equals F.resized_crop(img, top, left, height, width, [h, w]). (F.resized_crop given a bare int
  would instead set the shorter side.)
  """
  cropped = crop(img, params.top, params.left, params.height, params.width)
  return resize(cropped, _pair(size), interpolation)


def sample_hflip(rng: np.random.Generator, p: float = 0.5) -> bool:
  """RandomHorizontalFlip's coin: flip when U[0, 1) < p."""
  return bool(rng.random() < p)


def hflip(img: Image.Image) -> Image.Image:
  return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_array(img: Image.Image) -> np.ndarray:
  """F.to_tensor as float32 HWC: 8-bit modes divided by 255, mode 'F' as is.

  Channels are the image's bands ('P' gives palette indices, 'CMYK' four channels), as torchvision.
  """
  if img.mode in _INTEGER_MODES:
    raise TypeError(f'image mode {img.mode!r} holds integers that ToTensor does not scale and '
                    f'Normalize refuses; convert the image (e.g. .convert("RGB")) first')
  if img.mode == 'F':
    array = np.array(img, np.float32)
  else:
    array = np.array(img, np.uint8)
    if img.mode == '1':
      array = array * np.uint8(255)
    # float32 division by 255, as torch's .to(float32).div(255).
    array = array.astype(np.float32) / np.float32(255)
  return array.reshape(img.height, img.width, len(img.getbands()))


def normalize(array_hwc: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """F.normalize on an HWC float32 array: (x - mean) / std in float32, one value or one per channel."""
  mean32 = np.asarray(mean, np.float32).reshape(-1)
  std32 = np.asarray(std, np.float32).reshape(-1)
  num_channels = array_hwc.shape[-1]
  for name, values in (('mean', mean32), ('std', std32)):
    if values.size not in (1, num_channels):
      raise ValueError(f'{name} has {values.size} values but the image has {num_channels} channels')
  if np.any(std32 == 0):
    raise ValueError(f'std evaluated to zero in float32: {tuple(std)}')
  return (array_hwc - mean32) / std32


def to_normalized_array(img: Image.Image, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """ToTensor then Normalize, as float32 HWC; equals torchvision's CHW tensor transposed."""
  return normalize(to_array(img), mean, std)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Resize(resize_size) -> CenterCrop(crop_size) -> ToTensor -> Normalize, as float32 HWC."""
  resize_size: int = 256
  crop_size: int = 224
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  interpolation: int = Image.BILINEAR

  def __call__(self, img: Image.Image) -> np.ndarray:
    img = center_crop(resize(img, self.resize_size, self.interpolation), self.crop_size)
    return to_normalized_array(img, self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class TrainParams:
  crop: CropParams
  flip: bool


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """RandomResizedCrop(crop_size) -> RandomHorizontalFlip(hflip_p) -> ToTensor -> Normalize.

  `sample` draws in torchvision's order (the crop, then the flip coin); `apply` is deterministic.
  """
  crop_size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  hflip_p: float = 0.5
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  interpolation: int = Image.BILINEAR

  def sample(self, rng: np.random.Generator, width: int, height: int) -> TrainParams:
    """Parameters for an image of PIL size (`width`, `height`)."""
    crop_params = sample_resized_crop(rng, height, width, self.scale, self.ratio)
    return TrainParams(crop_params, sample_hflip(rng, self.hflip_p))

  def apply(self, img: Image.Image, params: TrainParams) -> np.ndarray:
    img = resized_crop(img, params.crop, self.crop_size, self.interpolation)
    if params.flip:
      img = hflip(img)
    return to_normalized_array(img, self.mean, self.std)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    return self.apply(img, self.sample(rng, img.width, img.height))
