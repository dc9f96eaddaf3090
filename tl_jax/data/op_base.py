"""What every transform op shares: the `Op` base (arguments as pydantic fields, sample then apply), the
argument checks that report a bad keyword, and torchvision's coin. `augment` (the classic ops and the
pipeline) and `policies` (issue 24's ops) both build on it; `augment.TRANSFORMS` lists them all.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence, Union

import numpy as np
import pydantic
from PIL import Image
from pydantic import ConfigDict, Field, StrictFloat, StrictInt

from tl_jax.data import transforms as F

Number = Union[StrictInt, StrictFloat]
SizeArg = Union[StrictInt, list[StrictInt]]
FillArg = Union[Number, list[Number]]

_SIZE = 'an int or [height, width]'
_RANGE = 'a number or [min, max]'
_PROB = 'a probability in [0, 1]'


class _BadArg(Exception):
  """Raised by `Op.check` with the offending keyword; `build_pipeline` adds the key path."""

  def __init__(self, key: str, value: Any, message: str):
    super().__init__(message)
    self.key, self.value, self.message = key, value, message


def _check_size(key: str, value: Any, lengths: Sequence[int] = (1, 2)) -> tuple[int, int]:
  sizes = [value] if isinstance(value, int) else list(value)
  if len(sizes) not in lengths:
    raise _BadArg(key, value, f'needs {" or ".join(map(str, lengths))} values')
  if any(s <= 0 for s in sizes):
    raise _BadArg(key, value, 'sizes must be positive')
  return F._pair(value)


def _check_interpolation(value: str) -> int:
  if value not in F.INTERPOLATIONS:
    raise _BadArg('interpolation', value, f'unknown interpolation; allowed: {", ".join(F.INTERPOLATIONS)}')
  return F.INTERPOLATIONS[value]


def _check_p(value: float) -> None:
  if not 0.0 <= value <= 1.0:
    raise _BadArg('p', value, 'a probability must lie in [0, 1]')


def _check_fill(value: Any) -> None:
  if isinstance(value, list) and len(value) not in (1, 3, 4):
    raise _BadArg('fill', value, 'needs one value or one per channel')


def _uniform32(rng: np.random.Generator, low: float, high: float) -> float:
  # torch draws these in float32 (`torch.empty(1).uniform_`); so do we.
  return float(np.float32(rng.uniform(low, high)))


class Op(pydantic.BaseModel):
  """One transform: its keyword arguments as fields, and how it samples and applies.

  `stage` is 'pil' for ops on PIL images, 'to_tensor' for ToTensor, 'tensor' for ops on its array
  (Normalize, and RandomErasing whose `sample` also takes the channel count and which applies with
  `apply_array`).
  """
  model_config = ConfigDict(extra='forbid', frozen=True)
  random: ClassVar[bool] = False
  stage: ClassVar[str] = 'pil'

  def check(self) -> None:
    """Raises `_BadArg` for what torchvision rejects (at construction or when called)."""

  def sample(self, rng: Optional[np.random.Generator], width: int, height: int) -> Any:
    return None

  def size_after(self, width: int, height: int, params: Any) -> tuple[int, int]:
    """PIL size (width, height) of the output for an input of that size."""
    return width, height

  def bands_after(self, bands: int) -> int:
    """Channels of the output for an input with `bands` channels."""
    return bands

  def fixed_size(self, size_hw: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
    """Output (height, width) when it does not depend on the input, given the input's if known."""
    return size_hw

  def apply(self, img: Image.Image, params: Any) -> Image.Image:
    raise NotImplementedError


class _Coin(Op):
  """An op applied with probability p: torchvision draws torch.rand(1) < p."""
  random: ClassVar[bool] = True
  p: Number = Field(0.5, description=_PROB)

  def check(self):
    _check_p(self.p)

  def sample(self, rng, width, height):
    return bool(rng.random() < self.p)
