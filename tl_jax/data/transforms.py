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
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

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


def resized_size(height: int, width: int, size: Size, max_size: Optional[int] = None) -> tuple[int, int]:
  """Output (height, width) of `resize`, as torchvision's `_compute_resized_output_size`.

  An int (or 1-sequence) sets the shorter side; the longer one is truncated with int(), not rounded.
  `max_size` caps the longer side (then the shorter one shrinks, truncated too); only with an int.
  """
  if isinstance(size, (int, np.integer)) or len(size) == 1:
    requested = int(size) if isinstance(size, (int, np.integer)) else int(size[0])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = requested, int(requested * long / short)
    if max_size is not None:
      if max_size <= requested:
        raise ValueError(f'max_size = {max_size} must be strictly greater than the requested size '
                         f'for the smaller edge size = {size}')
      if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w
  if max_size is not None:
    raise ValueError('max_size needs size to be an int (the smaller edge), not (height, width)')
  return _pair(size)


def resize(img: Image.Image, size: Size, interpolation: int = Image.BILINEAR,
           max_size: Optional[int] = None) -> Image.Image:
  """F.resize on a PIL image: an int sets the shorter side, (height, width) sets both.

  Like torchvision, returns `img` itself when the size does not change (PIL would copy it) and
  otherwise calls PIL's resize, which always antialiases bilinear/bicubic.
  """
  out_h, out_w = resized_size(img.height, img.width, size, max_size)
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


def vflip(img: Image.Image) -> Image.Image:
  return img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


# torchvision's InterpolationMode values -> PIL filters (`pil_modes_mapping`); nearest-exact is
# PIL's nearest, as torchvision maps it for PIL input.
INTERPOLATIONS = {
    'nearest': Image.NEAREST,
    'nearest-exact': Image.NEAREST,
    'bilinear': Image.BILINEAR,
    'bicubic': Image.BICUBIC,
    'box': Image.BOX,
    'hamming': Image.HAMMING,
    'lanczos': Image.LANCZOS,
}

PADDING_MODES = ('constant', 'edge', 'reflect', 'symmetric')

Fill = Union[float, Sequence[float], None]


def _parse_fill(fill: Fill, img: Image.Image) -> Union[float, tuple]:
  """torchvision's `_parse_fill`: one value per band, ints unless the image is mode 'F'."""
  num_channels = len(img.getbands())
  if fill is None:
    fill = 0
  if isinstance(fill, (int, float)) and num_channels > 1:
    fill = tuple([fill] * num_channels)
  if isinstance(fill, (list, tuple)):
    if len(fill) == 1:
      fill = tuple(fill) * num_channels
    elif len(fill) != num_channels:
      raise ValueError(f'fill has {len(fill)} values but the image has {num_channels} channels')
    fill = tuple(fill)
  if img.mode != 'F':
    fill = tuple(int(x) for x in fill) if isinstance(fill, tuple) else int(fill)
  return fill


def padding_ltrb(padding: Union[int, Sequence[int]]) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) from torchvision's int, [lr, tb] or [l, t, r, b] padding."""
  if isinstance(padding, (int, np.integer)):
    return (int(padding),) * 4
  if len(padding) == 1:
    return (int(padding[0]),) * 4
  if len(padding) == 2:
    return int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])
  if len(padding) == 4:
    return tuple(int(p) for p in padding)
  raise ValueError(f'padding must be an int or a 1, 2 or 4 element sequence, got {padding!r}')


def pad(img: Image.Image, padding: Union[int, Sequence[int]], fill: Fill = 0,
        padding_mode: str = 'constant') -> Image.Image:
  """F.pad on a PIL image (`_functional_pil.pad`): PIL's expand for 'constant', np.pad otherwise.

  Negative padding crops, as in torchvision's non-constant modes.
  """
  left, top, right, bottom = padding_ltrb(padding)
  if padding_mode not in PADDING_MODES:
    raise ValueError(f'padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}')
  if padding_mode == 'constant':
    border = (left, top, right, bottom)
    padded = ImageOps.expand(img, border=border, fill=_parse_fill(fill, img))
    if img.mode == 'P':
      padded.putpalette(img.getpalette())
    return padded
  sides = np.array([left, top, right, bottom])
  crop_l, crop_t, crop_r, crop_b = -np.minimum(sides, 0)
  if (crop_l, crop_t, crop_r, crop_b) != (0, 0, 0, 0):
    img = img.crop((crop_l, crop_t, img.width - crop_r, img.height - crop_b))
  left, top, right, bottom = (int(v) for v in np.maximum(sides, 0))
  array = np.asarray(img)
  widths = ((top, bottom), (left, right)) + (((0, 0),) if array.ndim == 3 else ())
  out = Image.fromarray(np.pad(array, widths, padding_mode))
  if img.mode == 'P':
    out.putpalette(img.getpalette())
  return out


def padded_size(width: int, height: int, padding: Union[int, Sequence[int]]) -> tuple[int, int]:
  """PIL size (width, height) after `pad`."""
  left, top, right, bottom = padding_ltrb(padding)
  return width + left + right, height + top + bottom


def rotate(img: Image.Image, angle: float, interpolation: int = Image.NEAREST, expand: bool = False,
           center: Optional[Sequence[float]] = None, fill: Fill = 0) -> Image.Image:
  """F.rotate on a PIL image: PIL's rotate, counter-clockwise in degrees."""
  center = None if center is None else tuple(center)
  return img.rotate(angle, interpolation, expand, center, fillcolor=_parse_fill(fill, img))


def rotated_size(width: int, height: int, angle: float, expand: bool,
                 center: Optional[Sequence[float]] = None) -> tuple[int, int]:
  """PIL size (width, height) after `rotate`: PIL's own arithmetic in `Image.rotate`."""
  if not expand:
    return width, height
  angle = angle % 360.0
  if not center and angle in (0, 90, 180, 270):
    return (height, width) if angle in (90, 270) else (width, height)
  cx, cy = (width / 2, height / 2) if center is None else center
  a = -math.radians(angle)
  m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
  m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
  m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
  corners = [(0, 0), (width, 0), (width, height), (0, height)]
  xx = [m[0] * x + m[1] * y + m[2] for x, y in corners]
  yy = [m[3] * x + m[4] * y + m[5] for x, y in corners]
  return math.ceil(max(xx)) - math.floor(min(xx)), math.ceil(max(yy)) - math.floor(min(yy))


def to_grayscale(img: Image.Image, num_output_channels: int) -> Image.Image:
  """F.rgb_to_grayscale on a PIL image: PIL's 'L' (ITU-R 601-2 luma, integer), copied to 3 bands if asked."""
  if num_output_channels not in (1, 3):
    raise ValueError(f'num_output_channels should be either 1 or 3, got {num_output_channels} '
                     f'(image mode {img.mode!r})')
  gray = img.convert('L')
  if num_output_channels == 1:
    return gray
  return Image.merge('RGB', (gray, gray, gray))


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Brightness(img).enhance(factor)


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Contrast(img).enhance(factor)


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Color(img).enhance(factor)


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
  """F.adjust_hue on a PIL image: the 8-bit hue band of PIL's HSV shifted by int(factor * 255), wrapping.

  torchvision shifts the band with NumPy; a 256-entry lookup table (`Image.point`) gives the same
  bytes without the array round trip.
  """
  if not -0.5 <= factor <= 0.5:
    raise ValueError(f'hue_factor ({factor}) is not in [-0.5, 0.5].')
  if img.mode in ('L', '1', 'I', 'F'):
    return img
  # np.int32 truncates towards zero, then uint8 wraps a negative shift: as torchvision.
  shift = int(np.int32(factor * 255).astype(np.uint8))
  h, s, v = img.convert('HSV').split()
  h = h.point([(i + shift) % 256 for i in range(256)])
  return Image.merge('HSV', (h, s, v)).convert(img.mode)


def gaussian_kernel1d(kernel_size: int, sigma: float) -> np.ndarray:
  """torchvision's `_get_gaussian_kernel1d` in float32."""
  half = (kernel_size - 1) * 0.5
  x = np.linspace(-half, half, kernel_size, dtype=np.float32)
  pdf = np.exp(np.float32(-0.5) * (x / np.float32(sigma)) ** 2)
  return (pdf / pdf.sum()).astype(np.float32)


def gaussian_blur(img: Image.Image, kernel_size: Sequence[int], sigma: Sequence[float]) -> Image.Image:
  """F.gaussian_blur on a PIL image: reflect padding, float32 Gaussian, rounded back to 8 bits.

  torchvision converts the image to a tensor and convolves with the 2-D kernel (outer product of
  the two 1-D kernels); we apply the 1-D kernels one after the other, also in float32. The sums
  differ in the last bits, so a pixel whose blurred value lies within ~1e-4 of a half level can
  round the other way: outputs agree to 1 level, almost all pixels exactly.
  """
  if img.mode not in ('L', 'RGB', 'RGBA'):
    raise ValueError(f'GaussianBlur takes 8-bit L, RGB or RGBA images, got mode {img.mode!r}')
  kx, ky = int(kernel_size[0]), int(kernel_size[1])
  array = np.asarray(img, np.float32)
  array = array.reshape(img.height, img.width, -1)
  if kx // 2 >= img.width or ky // 2 >= img.height:
    raise ValueError(f'GaussianBlur kernel {kx}x{ky} needs an image larger than half of it, got '
                     f'{img.width}x{img.height} (reflect padding)')
  padded = np.pad(array, ((ky // 2, ky // 2), (kx // 2, kx // 2), (0, 0)), mode='reflect')
  out = np.zeros((padded.shape[0], img.width, array.shape[2]), np.float32)
  for i, weight in enumerate(gaussian_kernel1d(kx, sigma[0])):
    out += weight * padded[:, i:i + img.width]
  blurred = np.zeros_like(array)
  for i, weight in enumerate(gaussian_kernel1d(ky, sigma[1])):
    blurred += weight * out[i:i + img.height]
  result = np.round(blurred).astype(np.uint8)
  return Image.fromarray(result[..., 0] if img.mode == 'L' else result)


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
