"""torchvision's policy augmentations (AutoAugment, RandAugment, TrivialAugmentWide, AugMix), RandomAffine,
RandomPerspective, RandomErasing and the one-image colour ops, as `Op`s that `augment.TRANSFORMS` lists.

Pixels go through PIL exactly as torchvision's PIL path does: `F.affine`/`F.perspective` on a PIL image is
`Image.transform` with the coefficients torchvision computes (copied here), the colour ops are ImageOps and
ImageEnhance. What is hand-written is only what must match torchvision: the policies' op tables and magnitude
bins, the inverse affine matrix, the perspective coefficients and the order of the random draws.

Two places cannot be equal bit for bit, by construction of torchvision:
- AugMix converts a PIL image to a uint8 tensor and runs its chains with the tensor ops (grid_sample, float
  blends that truncate); ours runs them with the PIL ops and mixes with torchvision's float32 arithmetic.
- RandomPerspective solves for its coefficients with torch's LAPACK (MKL) in float64 and rounds to float32; the
  system is ill-conditioned enough that another solver's float32 coefficients differ in the last bit now and
  then. Given the same coefficients the pixels are equal.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from pydantic import Field, StrictBool, StrictInt, StrictStr

from tl_jax.data import transforms as F
from tl_jax.data.op_base import (_PROB, FillArg, Number, Op, _BadArg, _check_fill, _check_interpolation, _check_p,
                                 _Coin, _uniform32)

# ---------------------------------------------------------------- torchvision.transforms.functional on PIL images


def inverse_affine_matrix(center: Sequence[float], angle: float, translate: Sequence[float], scale: float,
                          shear: Sequence[float]) -> list[float]:
  """torchvision's `_get_inverse_affine_matrix` (inverted=True): output -> input pixel map for PIL's AFFINE.

  The matrix is T * C * R(angle) * S(scale) * SHy * SHx * C^-1 inverted, in float64 as torchvision computes it.
  """
  rot = math.radians(angle)
  sx, sy = math.radians(shear[0]), math.radians(shear[1])
  cx, cy = center
  tx, ty = translate
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  matrix = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
  matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
  matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
  matrix[2] += cx
  matrix[5] += cy
  return matrix


def affine(img: Image.Image, angle: float, translate: Sequence[int], scale: float, shear: Sequence[float],
           interpolation: int = Image.NEAREST, fill: F.Fill = None,
           center: Optional[Sequence[float]] = None) -> Image.Image:
  """F.affine on a PIL image: clockwise `angle` degrees about `center` (default the image centre, without
  torchvision's +0.5), then `translate` pixels; the size is kept."""
  if center is None:
    center = [img.width * 0.5, img.height * 0.5]
  matrix = inverse_affine_matrix(center, float(angle), translate, scale, shear)
  return img.transform(img.size, Image.AFFINE, matrix, interpolation, fillcolor=F._parse_fill(fill, img))


def perspective_coeffs(startpoints: Sequence[Sequence[int]], endpoints: Sequence[Sequence[int]]) -> list[float]:
  """torchvision's `_get_perspective_coeffs`: (a..h) mapping output to input pixels, solved in float64 and
  rounded to float32 as torchvision does (its solver is LAPACK gels; here an LU solve of the same 8x8 system)."""
  a_matrix = np.zeros((8, 8), np.float64)
  for i, (p1, p2) in enumerate(zip(endpoints, startpoints)):
    a_matrix[2 * i] = [p1[0], p1[1], 1, 0, 0, 0, -p2[0] * p1[0], -p2[0] * p1[1]]
    a_matrix[2 * i + 1] = [0, 0, 0, p1[0], p1[1], 1, -p2[1] * p1[0], -p2[1] * p1[1]]
  b_vector = np.asarray(startpoints, np.float64).reshape(8)
  return [float(c) for c in np.linalg.solve(a_matrix, b_vector).astype(np.float32)]


def perspective(img: Image.Image, coeffs: Sequence[float], interpolation: int = Image.BILINEAR,
                fill: F.Fill = None) -> Image.Image:
  """F.perspective on a PIL image given torchvision's coefficients."""
  return img.transform(img.size, Image.PERSPECTIVE, list(coeffs), interpolation, fillcolor=F._parse_fill(fill, img))


def adjust_sharpness(img: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Sharpness(img).enhance(factor)


def posterize(img: Image.Image, bits: int) -> Image.Image:
  """ImageOps.posterize, and for 0 bits (AugMix's top severities; PIL refuses them) torchvision's tensor op:
  every value masked to 0."""
  if bits == 0:
    return img.point([0] * 256 * len(img.getbands()))
  return ImageOps.posterize(img, bits)


def linspace32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace(start, end, steps) in float32, bit for bit as torch's CPU kernel computes it.

  torch fills the first half as start + step * i and the second as end - step * (steps - 1 - i), each a fused
  multiply-add (one rounding): emulated in float64, where step * i is exact.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.asarray([start32], np.float32)
  step = np.float32(end32 - start32) / np.float32(steps - 1)
  index = np.arange(steps)
  head = (np.float64(start32) + np.float64(step) * index).astype(np.float32)
  tail = (np.float64(end32) - np.float64(step) * (steps - 1 - index)).astype(np.float32)
  return np.where(index < steps // 2, head, tail).astype(np.float32)


def _frozen(space: dict) -> dict:
  """Read-only magnitude arrays: the spaces are cached and shared by every draw."""
  for magnitudes, _ in space.values():
    if magnitudes is not None:
      magnitudes.setflags(write=False)
  return space


def _posterize_bins(num_bins: int, top: int, span: int) -> np.ndarray:
  """`top - (torch.arange(num_bins) / ((num_bins - 1) / span)).round().int()`: float32 division, half to even."""
  return (top - np.round(np.arange(num_bins).astype(np.float32) / np.float32((num_bins - 1) / span))
          ).astype(np.int32)


# The ops of torchvision's `_apply_op`, on PIL images as torchvision applies them to one.
_POLICY_OPS = {
    'Identity': lambda img, m, interp, fill: img,
    # torchvision shears by atan(magnitude) degrees about the corner (0, 0), as the official AutoAugment.
    'ShearX': lambda img, m, interp, fill: affine(img, 0.0, [0, 0], 1.0, [math.degrees(math.atan(m)), 0.0], interp,
                                                  fill, center=[0, 0]),
    'ShearY': lambda img, m, interp, fill: affine(img, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(m))], interp,
                                                  fill, center=[0, 0]),
    'TranslateX': lambda img, m, interp, fill: affine(img, 0.0, [int(m), 0], 1.0, [0.0, 0.0], interp, fill),
    'TranslateY': lambda img, m, interp, fill: affine(img, 0.0, [0, int(m)], 1.0, [0.0, 0.0], interp, fill),
    'Rotate': lambda img, m, interp, fill: F.rotate(img, m, interp, False, None, fill),
    'Brightness': lambda img, m, interp, fill: F.adjust_brightness(img, 1.0 + m),
    'Color': lambda img, m, interp, fill: F.adjust_saturation(img, 1.0 + m),
    'Contrast': lambda img, m, interp, fill: F.adjust_contrast(img, 1.0 + m),
    'Sharpness': lambda img, m, interp, fill: adjust_sharpness(img, 1.0 + m),
    'Posterize': lambda img, m, interp, fill: posterize(img, int(m)),
    'Solarize': lambda img, m, interp, fill: ImageOps.solarize(img, m),
    'AutoContrast': lambda img, m, interp, fill: ImageOps.autocontrast(img),
    'Equalize': lambda img, m, interp, fill: ImageOps.equalize(img),
    'Invert': lambda img, m, interp, fill: ImageOps.invert(img),
}


def apply_op(img: Image.Image, name: str, magnitude: float, interpolation: int = Image.NEAREST,
             fill: F.Fill = None) -> Image.Image:
  """torchvision.transforms.autoaugment._apply_op on a PIL image."""
  return _POLICY_OPS[name](img, magnitude, interpolation, fill)


# An op's magnitudes (None: it takes none) and whether a coin flips their sign, as `_augmentation_space`.
# Cached per (bins, size): torchvision rebuilds them on every image; do not mutate.
Space = dict[str, tuple[Optional[np.ndarray], bool]]


@functools.lru_cache(maxsize=256)
def autoaugment_space(num_bins: int, height: int, width: int) -> Space:
  """AutoAugment's and RandAugment's `_augmentation_space` (RandAugment puts Identity first, no Invert)."""
  return _frozen({
      'ShearX': (linspace32(0.0, 0.3, num_bins), True),
      'ShearY': (linspace32(0.0, 0.3, num_bins), True),
      'TranslateX': (linspace32(0.0, 150.0 / 331.0 * width, num_bins), True),
      'TranslateY': (linspace32(0.0, 150.0 / 331.0 * height, num_bins), True),
      'Rotate': (linspace32(0.0, 30.0, num_bins), True),
      'Brightness': (linspace32(0.0, 0.9, num_bins), True),
      'Color': (linspace32(0.0, 0.9, num_bins), True),
      'Contrast': (linspace32(0.0, 0.9, num_bins), True),
      'Sharpness': (linspace32(0.0, 0.9, num_bins), True),
      'Posterize': (_posterize_bins(num_bins, 8, 4), False),
      'Solarize': (linspace32(255.0, 0.0, num_bins), False),
      'AutoContrast': (None, False),
      'Equalize': (None, False),
      'Invert': (None, False),
  })


@functools.lru_cache(maxsize=256)
def randaugment_space(num_bins: int, height: int, width: int) -> Space:
  space = autoaugment_space(num_bins, height, width)
  return {'Identity': (None, False), **{name: entry for name, entry in space.items() if name != 'Invert'}}


@functools.lru_cache(maxsize=16)
def trivialaugment_space(num_bins: int) -> Space:
  return _frozen({
      'Identity': (None, False),
      'ShearX': (linspace32(0.0, 0.99, num_bins), True),
      'ShearY': (linspace32(0.0, 0.99, num_bins), True),
      'TranslateX': (linspace32(0.0, 32.0, num_bins), True),
      'TranslateY': (linspace32(0.0, 32.0, num_bins), True),
      'Rotate': (linspace32(0.0, 135.0, num_bins), True),
      'Brightness': (linspace32(0.0, 0.99, num_bins), True),
      'Color': (linspace32(0.0, 0.99, num_bins), True),
      'Contrast': (linspace32(0.0, 0.99, num_bins), True),
      'Sharpness': (linspace32(0.0, 0.99, num_bins), True),
      'Posterize': (_posterize_bins(num_bins, 8, 6), False),
      'Solarize': (linspace32(255.0, 0.0, num_bins), False),
      'AutoContrast': (None, False),
      'Equalize': (None, False),
  })


@functools.lru_cache(maxsize=256)
def augmix_space(num_bins: int, height: int, width: int, all_ops: bool) -> Space:
  space = {
      'ShearX': (linspace32(0.0, 0.3, num_bins), True),
      'ShearY': (linspace32(0.0, 0.3, num_bins), True),
      'TranslateX': (linspace32(0.0, width / 3.0, num_bins), True),
      'TranslateY': (linspace32(0.0, height / 3.0, num_bins), True),
      'Rotate': (linspace32(0.0, 30.0, num_bins), True),
      'Posterize': (_posterize_bins(num_bins, 4, 4), False),
      'Solarize': (linspace32(255.0, 0.0, num_bins), False),
      'AutoContrast': (None, False),
      'Equalize': (None, False),
  }
  if all_ops:
    space.update({name: (linspace32(0.0, 0.9, num_bins), True) for name in ('Brightness', 'Color', 'Contrast',
                                                                            'Sharpness')})
  return _frozen(space)


# torchvision's AutoAugmentPolicy tables: two (op, probability, magnitude bin) per sub-policy.
AUTOAUGMENT_POLICIES = {
    'imagenet': [
        (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)), (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
        (('Equalize', 0.8, None), ('Equalize', 0.6, None)), (('Posterize', 0.6, 7), ('Posterize', 0.6, 6)),
        (('Equalize', 0.4, None), ('Solarize', 0.2, 4)), (('Equalize', 0.4, None), ('Rotate', 0.8, 8)),
        (('Solarize', 0.6, 3), ('Equalize', 0.6, None)), (('Posterize', 0.8, 5), ('Equalize', 1.0, None)),
        (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)), (('Equalize', 0.6, None), ('Posterize', 0.4, 6)),
        (('Rotate', 0.8, 8), ('Color', 0.4, 0)), (('Rotate', 0.4, 9), ('Equalize', 0.6, None)),
        (('Equalize', 0.0, None), ('Equalize', 0.8, None)), (('Invert', 0.6, None), ('Equalize', 1.0, None)),
        (('Color', 0.6, 4), ('Contrast', 1.0, 8)), (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
        (('Color', 0.8, 8), ('Solarize', 0.8, 7)), (('Sharpness', 0.4, 7), ('Invert', 0.6, None)),
        (('ShearX', 0.6, 5), ('Equalize', 1.0, None)), (('Color', 0.4, 0), ('Equalize', 0.6, None)),
        (('Equalize', 0.4, None), ('Solarize', 0.2, 4)), (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
        (('Invert', 0.6, None), ('Equalize', 1.0, None)), (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
        (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
    ],
    'cifar10': [
        (('Invert', 0.1, None), ('Contrast', 0.2, 6)), (('Rotate', 0.7, 2), ('TranslateX', 0.3, 9)),
        (('Sharpness', 0.8, 1), ('Sharpness', 0.9, 3)), (('ShearY', 0.5, 8), ('TranslateY', 0.7, 9)),
        (('AutoContrast', 0.5, None), ('Equalize', 0.9, None)), (('ShearY', 0.2, 7), ('Posterize', 0.3, 7)),
        (('Color', 0.4, 3), ('Brightness', 0.6, 7)), (('Sharpness', 0.3, 9), ('Brightness', 0.7, 9)),
        (('Equalize', 0.6, None), ('Equalize', 0.5, None)), (('Contrast', 0.6, 7), ('Sharpness', 0.6, 5)),
        (('Color', 0.7, 7), ('TranslateX', 0.5, 8)), (('Equalize', 0.3, None), ('AutoContrast', 0.4, None)),
        (('TranslateY', 0.4, 3), ('Sharpness', 0.2, 6)), (('Brightness', 0.9, 6), ('Color', 0.2, 8)),
        (('Solarize', 0.5, 2), ('Invert', 0.0, None)), (('Equalize', 0.2, None), ('AutoContrast', 0.6, None)),
        (('Equalize', 0.2, None), ('Equalize', 0.6, None)), (('Color', 0.9, 9), ('Equalize', 0.6, None)),
        (('AutoContrast', 0.8, None), ('Solarize', 0.2, 8)), (('Brightness', 0.1, 3), ('Color', 0.7, 0)),
        (('Solarize', 0.4, 5), ('AutoContrast', 0.9, None)), (('TranslateY', 0.9, 9), ('TranslateY', 0.7, 9)),
        (('AutoContrast', 0.9, None), ('Solarize', 0.8, 3)), (('Equalize', 0.8, None), ('Invert', 0.1, None)),
        (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, None)),
    ],
    'svhn': [
        (('ShearX', 0.9, 4), ('Invert', 0.2, None)), (('ShearY', 0.9, 8), ('Invert', 0.7, None)),
        (('Equalize', 0.6, None), ('Solarize', 0.6, 6)), (('Invert', 0.9, None), ('Equalize', 0.6, None)),
        (('Equalize', 0.6, None), ('Rotate', 0.9, 3)), (('ShearX', 0.9, 4), ('AutoContrast', 0.8, None)),
        (('ShearY', 0.9, 8), ('Invert', 0.4, None)), (('ShearY', 0.9, 5), ('Solarize', 0.2, 6)),
        (('Invert', 0.9, None), ('AutoContrast', 0.8, None)), (('Equalize', 0.6, None), ('Rotate', 0.9, 3)),
        (('ShearX', 0.9, 4), ('Solarize', 0.3, 3)), (('ShearY', 0.8, 8), ('Invert', 0.7, None)),
        (('Equalize', 0.9, None), ('TranslateY', 0.6, 6)), (('Invert', 0.9, None), ('Equalize', 0.6, None)),
        (('Contrast', 0.3, 3), ('Rotate', 0.8, 4)), (('Invert', 0.8, None), ('TranslateY', 0.0, 2)),
        (('ShearY', 0.7, 6), ('Solarize', 0.4, 8)), (('Invert', 0.6, None), ('Rotate', 0.8, 4)),
        (('ShearY', 0.3, 7), ('TranslateX', 0.9, 3)), (('ShearX', 0.1, 6), ('Invert', 0.6, None)),
        (('Solarize', 0.7, 2), ('TranslateY', 0.6, 7)), (('ShearY', 0.8, 4), ('Invert', 0.8, None)),
        (('ShearX', 0.7, 9), ('TranslateY', 0.8, 3)), (('ShearY', 0.8, 5), ('AutoContrast', 0.7, None)),
        (('ShearX', 0.7, 2), ('Invert', 0.1, None)),
    ],
}

# A policy's draw: the ops applied in order, each (name, magnitude).
OpList = tuple[tuple[str, float], ...]


def _draw_op(rng, space: Space, magnitude_index) -> tuple[str, float]:
  """One op of `space` as torchvision draws it: its index, then (`magnitude_index(magnitudes)`), then the sign
  coin for a signed op. `magnitude_index` may draw too (TrivialAugmentWide, AugMix)."""
  name = list(space)[int(rng.integers(0, len(space)))]
  magnitudes, signed = space[name]
  magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_index(magnitudes)])
  if signed and int(rng.integers(0, 2)):
    magnitude *= -1.0
  return name, magnitude


class _Policy(Op):
  """Shared by the policies: torchvision's interpolation (nearest) and fill (None: 0) for the geometric ops."""
  random: ClassVar[bool] = True
  interpolation: str = 'nearest'
  fill: Optional[FillArg] = Field(None, description='a number or one per channel')

  def check(self):
    _check_interpolation(self.interpolation)
    _check_fill(self.fill)

  def _apply_ops(self, img: Image.Image, ops: OpList) -> Image.Image:
    interpolation = F.INTERPOLATIONS[self.interpolation]
    for name, magnitude in ops:
      img = apply_op(img, name, magnitude, interpolation, self.fill)
    return img

  def apply(self, img, params):
    return self._apply_ops(img, params)


class AutoAugment(_Policy):
  policy: Literal['imagenet', 'cifar10', 'svhn'] = Field('imagenet', description="'imagenet', 'cifar10' or 'svhn'")

  def sample(self, rng, width, height):
    """AutoAugment.get_params (a sub-policy, two U[0, 1) and two sign coins, all drawn), then the ops whose
    draw is <= their probability, compared in float32 as torch compares its tensor."""
    policies = AUTOAUGMENT_POLICIES[self.policy]
    policy_id = int(rng.integers(0, len(policies)))
    probs = [np.float32(rng.random()) for _ in range(2)]
    signs = [int(rng.integers(0, 2)) for _ in range(2)]
    space = autoaugment_space(10, height, width)
    ops = []
    for i, (name, p, magnitude_id) in enumerate(policies[policy_id]):
      if probs[i] <= np.float32(p):
        magnitudes, signed = space[name]
        magnitude = float(magnitudes[magnitude_id]) if magnitude_id is not None else 0.0
        if signed and signs[i] == 0:
          magnitude *= -1.0
        ops.append((name, magnitude))
    return tuple(ops)


class RandAugment(_Policy):
  num_ops: StrictInt = 2
  magnitude: StrictInt = 9
  num_magnitude_bins: StrictInt = 31

  def check(self):
    super().check()
    if self.num_ops < 0:
      raise _BadArg('num_ops', self.num_ops, 'must be 0 or more')
    if self.num_magnitude_bins < 2:
      raise _BadArg('num_magnitude_bins', self.num_magnitude_bins, 'needs at least 2 bins')
    if not 0 <= self.magnitude < self.num_magnitude_bins:
      raise _BadArg('magnitude', self.magnitude, f'a bin index in [0, {self.num_magnitude_bins - 1}] '
                    f'(num_magnitude_bins is {self.num_magnitude_bins})')

  def sample(self, rng, width, height):
    space = randaugment_space(self.num_magnitude_bins, height, width)
    return tuple(_draw_op(rng, space, lambda magnitudes: self.magnitude) for _ in range(self.num_ops))


class TrivialAugmentWide(_Policy):
  num_magnitude_bins: StrictInt = 31

  def check(self):
    super().check()
    if self.num_magnitude_bins < 2:
      raise _BadArg('num_magnitude_bins', self.num_magnitude_bins, 'needs at least 2 bins')

  def sample(self, rng, width, height):
    """One op, uniformly; one of its magnitude bins, uniformly; a sign coin for signed ops."""
    space = trivialaugment_space(self.num_magnitude_bins)
    return (_draw_op(rng, space, lambda magnitudes: int(rng.integers(0, len(magnitudes)))),)


@dataclasses.dataclass(frozen=True)
class AugMixParams:
  """AugMix's draws: the original's weight, each chain's weight (float32 as torch's) and each chain's ops."""
  original_weight: float
  chain_weights: tuple[float, ...]
  chains: tuple[OpList, ...]


class AugMix(_Policy):
  severity: StrictInt = 3
  mixture_width: StrictInt = 3
  chain_depth: StrictInt = -1
  alpha: Number = 1.0
  all_ops: StrictBool = True
  interpolation: str = 'bilinear'

  _PARAMETER_MAX: ClassVar[int] = 10

  def check(self):
    super().check()
    if not 1 <= self.severity <= self._PARAMETER_MAX:
      raise _BadArg('severity', self.severity, f'must lie in [1, {self._PARAMETER_MAX}]')
    if self.mixture_width < 1:
      raise _BadArg('mixture_width', self.mixture_width, 'needs at least 1 chain')
    if self.alpha <= 0:
      raise _BadArg('alpha', self.alpha, 'a Dirichlet concentration must be positive')

  def sample(self, rng, width, height):
    """torchvision's order: Dirichlet([α, α]) for original vs mix, Dirichlet([α] * width) for the chains
    (scaled by the mix's share, in float32), then per chain its depth (1-3 unless chain_depth > 0) and ops."""
    alpha = float(self.alpha)
    m = np.asarray(rng.dirichlet([alpha, alpha]), np.float32)
    weights = np.asarray(rng.dirichlet([alpha] * self.mixture_width), np.float32) * m[1]
    space = augmix_space(self._PARAMETER_MAX, height, width, self.all_ops)
    chains = []
    for _ in range(self.mixture_width):
      depth = self.chain_depth if self.chain_depth > 0 else int(rng.integers(1, 4))
      chains.append(tuple(_draw_op(rng, space, lambda magnitudes: int(rng.integers(0, self.severity)))
                          for _ in range(depth)))
    return AugMixParams(float(m[0]), tuple(float(w) for w in weights), tuple(chains))

  def apply(self, img, params):
    """Each chain on the image, then torchvision's float32 sum (original first) truncated to uint8."""
    original = np.asarray(img)
    mix = np.float32(params.original_weight) * original.astype(np.float32)
    for weight, chain in zip(params.chain_weights, params.chains, strict=True):
      chained = np.asarray(self._apply_ops(img, chain))
      mix += np.float32(weight) * chained.astype(np.float32)
    return Image.fromarray(mix.astype(np.uint8), img.mode)


@dataclasses.dataclass(frozen=True)
class AffineParams:
  """RandomAffine.get_params: clockwise angle in degrees, integer translation (x, y), scale, shear (x, y)."""
  angle: float
  translate: tuple[int, int]
  scale: float
  shear: tuple[float, float]


def _check_range(key: str, value: Any, lengths=(2,), low: Optional[float] = None, high: Optional[float] = None):
  values = value if isinstance(value, list) else [value]
  if len(values) not in lengths:
    raise _BadArg(key, value, f'needs {" or ".join(map(str, lengths))} values')
  if any(values[k] > values[k + 1] for k in range(0, len(values) - 1, 2)):
    raise _BadArg(key, value, 'needs [min, max] pairs with min <= max')
  if (low is not None and min(values) < low) or (high is not None and max(values) > high):
    raise _BadArg(key, value, f'values must lie in [{low}, {high}]')


def _symmetric(key: str, value: Union[float, list[float]], lengths=(2,)) -> list[float]:
  """torchvision's `_setup_angle`: a number d is [-d, d]."""
  if isinstance(value, list):
    _check_range(key, value, lengths)
    return [float(v) for v in value]
  if value < 0:
    raise _BadArg(key, value, 'a single number must be non-negative (the range is [-d, d])')
  return [-float(value), float(value)]


class RandomAffine(Op):
  random: ClassVar[bool] = True
  degrees: Union[Number, list[Number]] = Field(description='a number or [min, max] in degrees')
  translate: Optional[list[Number]] = Field(None, description='[max x fraction, max y fraction] in [0, 1]')
  scale: Optional[list[Number]] = Field(None, description='[min, max]')
  shear: Optional[Union[Number, list[Number]]] = Field(None, description='a number, [min, max] or [x min, x max, '
                                                                         'y min, y max] in degrees')
  interpolation: str = 'nearest'
  fill: FillArg = Field(0, description='a number or one per channel')
  center: Optional[list[Number]] = Field(None, description='[x, y] in pixels')

  def check(self):
    _symmetric('degrees', self.degrees)
    if self.translate is not None:
      if len(self.translate) != 2 or not all(0.0 <= t <= 1.0 for t in self.translate):
        raise _BadArg('translate', self.translate, 'needs [x, y] fractions, each in [0, 1]')
    if self.scale is not None:
      _check_range('scale', self.scale)
      if min(self.scale) <= 0:
        raise _BadArg('scale', self.scale, 'scales must be positive')
    if self.shear is not None:
      _symmetric('shear', self.shear, lengths=(2, 4))
    if self.center is not None and len(self.center) != 2:
      raise _BadArg('center', self.center, 'needs [x, y]')
    _check_interpolation(self.interpolation)
    _check_fill(self.fill)

  def sample(self, rng, width, height):
    """The angle, the translation (each U(±fraction·size) rounded), the scale, the x then y shear, each drawn
    in float32 and only where set (the angle always)."""
    angle = _uniform32(rng, *_symmetric('degrees', self.degrees))
    translate = (0, 0)
    if self.translate is not None:
      max_dx, max_dy = float(self.translate[0] * width), float(self.translate[1] * height)
      translate = (int(round(_uniform32(rng, -max_dx, max_dx))),
                   int(round(_uniform32(rng, -max_dy, max_dy))))
    scale = 1.0 if self.scale is None else _uniform32(rng, float(self.scale[0]), float(self.scale[1]))
    shear = (0.0, 0.0)
    if self.shear is not None:
      shears = _symmetric('shear', self.shear, lengths=(2, 4))
      shear = (_uniform32(rng, shears[0], shears[1]),
               _uniform32(rng, shears[2], shears[3]) if len(shears) == 4 else 0.0)
    return AffineParams(angle, translate, scale, shear)

  def apply(self, img, params):
    return affine(img, params.angle, list(params.translate), params.scale, list(params.shear),
                  F.INTERPOLATIONS[self.interpolation], self.fill, self.center)


@dataclasses.dataclass(frozen=True)
class PerspectiveParams:
  """RandomPerspective.get_params: the corners [top-left, top-right, bottom-right, bottom-left] before/after."""
  startpoints: tuple[tuple[int, int], ...]
  endpoints: tuple[tuple[int, int], ...]


class RandomPerspective(Op):
  random: ClassVar[bool] = True
  distortion_scale: Number = Field(0.5, description='a number in [0, 1]')
  p: Number = Field(0.5, description=_PROB)
  interpolation: str = 'bilinear'
  fill: FillArg = Field(0, description='a number or one per channel')

  def check(self):
    if not 0.0 <= self.distortion_scale <= 1.0:
      raise _BadArg('distortion_scale', self.distortion_scale, 'must lie in [0, 1]')
    _check_p(self.p)
    _check_interpolation(self.interpolation)
    _check_fill(self.fill)

  def sample(self, rng, width, height):
    """The coin, then each corner's x and y offset within distortion_scale of half the side, in torchvision's
    order (top-left, top-right, bottom-right, bottom-left); None when the coin says no."""
    if not rng.random() < self.p:
      return None
    dx, dy = int(self.distortion_scale * (width // 2)), int(self.distortion_scale * (height // 2))

    def near(low_side: bool, size: int, offset: int) -> int:
      return int(rng.integers(0, offset + 1)) if low_side else int(rng.integers(size - offset - 1, size))

    corners = [(True, True), (False, True), (False, False), (True, False)]   # (left, top) per corner
    endpoints = tuple((near(left, width, dx), near(top, height, dy)) for left, top in corners)
    startpoints = ((0, 0), (width - 1, 0), (width - 1, height - 1), (0, height - 1))
    return PerspectiveParams(startpoints, endpoints)

  def apply(self, img, params):
    if params is None:
      return img
    coeffs = perspective_coeffs(params.startpoints, params.endpoints)
    return perspective(img, coeffs, F.INTERPOLATIONS[self.interpolation], self.fill)


class RandomAutocontrast(_Coin):

  def apply(self, img, params):
    return ImageOps.autocontrast(img) if params else img


class RandomEqualize(_Coin):

  def apply(self, img, params):
    return ImageOps.equalize(img) if params else img


class RandomPosterize(_Coin):
  bits: StrictInt = Field(description='an int in [1, 8]')

  def check(self):
    super().check()
    if not 1 <= self.bits <= 8:  # torchvision takes 0 for tensors, but its PIL path (PIL's posterize) refuses it
      raise _BadArg('bits', self.bits, 'the bits to keep must lie in [1, 8]')

  def apply(self, img, params):
    return ImageOps.posterize(img, self.bits) if params else img


class RandomSolarize(_Coin):
  threshold: Number = Field(description='a number: pixels >= it are inverted')

  def apply(self, img, params):
    return ImageOps.solarize(img, self.threshold) if params else img


class RandomAdjustSharpness(_Coin):
  sharpness_factor: Number = Field(description='a non-negative number')

  def check(self):
    super().check()
    if self.sharpness_factor < 0:
      raise _BadArg('sharpness_factor', self.sharpness_factor, 'must be non-negative')

  def apply(self, img, params):
    return adjust_sharpness(img, self.sharpness_factor) if params else img


@dataclasses.dataclass(frozen=True)
class ErasingParams:
  """RandomErasing.get_params: the box (top, left, height, width) and, for value 'random', its (C, h, w) values."""
  top: int
  left: int
  height: int
  width: int
  values_chw: Optional[np.ndarray] = dataclasses.field(default=None, compare=False)


class RandomErasing(Op):
  """On the float array after ToTensor (and usually Normalize), as torchvision's tensor-only RandomErasing."""
  random: ClassVar[bool] = True
  stage: ClassVar[str] = 'tensor'
  p: Number = Field(0.5, description=_PROB)
  scale: list[Number] = Field([0.02, 0.33], description='[min, max] fractions of the area in [0, 1]')
  ratio: list[Number] = Field([0.3, 3.3], description='[min, max] aspect ratios (h/w)')
  value: Union[Number, list[Number], StrictStr] = Field(0, description="a number, one per channel, or 'random'")
  inplace: StrictBool = False  # no effect: arrays are never shared

  def check(self):
    _check_p(self.p)
    _check_range('scale', self.scale, low=0.0, high=1.0)
    _check_range('ratio', self.ratio)
    if self.ratio[0] <= 0:
      raise _BadArg('ratio', self.ratio, 'aspect ratios must be positive')
    if isinstance(self.value, str) and self.value != 'random':
      raise _BadArg('value', self.value, "the only string allowed is 'random'")
    if isinstance(self.value, list) and len(self.value) not in (1, 3):
      raise _BadArg('value', self.value, 'needs one value or one per channel')

  def sample(self, rng, width, height, bands: int = 3):
    """The coin, then up to ten tries of an area fraction ~ U(scale) and a log-uniform ratio (float32, as torch)
    until the box fits strictly inside; for 'random' its N(0, 1) values (C, h, w), then its row and column.
    None: nothing is erased."""
    if not rng.random() < self.p:
      return None
    area = height * width
    log_ratio = np.log(np.asarray(self.ratio, np.float32))
    for _ in range(10):
      erase_area = area * _uniform32(rng, float(self.scale[0]), float(self.scale[1]))
      aspect_ratio = float(np.exp(np.float32(rng.uniform(float(log_ratio[0]), float(log_ratio[1])))))
      h = int(round(math.sqrt(erase_area * aspect_ratio)))
      w = int(round(math.sqrt(erase_area / aspect_ratio)))
      if not (h < height and w < width):
        continue
      values = None
      if self.value == 'random':
        values = np.asarray(rng.standard_normal((bands, h, w), dtype=np.float32), np.float32)
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return ErasingParams(top, left, h, w, values)
    return None

  def apply_array(self, array_hwc: np.ndarray, params: Optional[ErasingParams]) -> np.ndarray:
    """F.erase on the HWC float array: the box set to the value(s), broadcast over channels where one."""
    if params is None:
      return array_hwc
    if isinstance(self.value, list) and len(self.value) not in (1, array_hwc.shape[-1]):
      raise ValueError(f'RandomErasing value {self.value} needs 1 or {array_hwc.shape[-1]} values (the channels)')
    out = array_hwc.copy()
    box = (slice(params.top, params.top + params.height), slice(params.left, params.left + params.width))
    if params.values_chw is not None:
      out[box] = np.transpose(params.values_chw, (1, 2, 0))
    else:
      out[box] = np.asarray(self.value, np.float32)
    return out


# Merged into `augment.TRANSFORMS`, the names a transform list may use.
TRANSFORMS: dict[str, type[Op]] = {cls.__name__: cls for cls in (
    AutoAugment, RandAugment, TrivialAugmentWide, AugMix, RandomErasing, RandomAffine, RandomPerspective,
    RandomAutocontrast, RandomEqualize, RandomPosterize, RandomSolarize, RandomAdjustSharpness)}
