"""Every model family tl_jax has, registered once: adding a family is its file and one line here."""

from __future__ import annotations

from tl_jax.models import resnet
from tl_jax.models import vgg
from tl_jax.models.family import Family

FAMILIES: tuple[Family, ...] = (
    resnet.FAMILY,
    vgg.FAMILY,
)

# Every supported architecture name, family by family.
ARCHS: tuple[str, ...] = tuple(arch for family in FAMILIES for arch in family.archs)
_BY_ARCH = {arch: family for family in FAMILIES for arch in family.archs}


def family_of(arch: str) -> Family:
  """The family that builds `arch`; ValueError naming the known archs otherwise."""
  if arch not in _BY_ARCH:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(_BY_ARCH)}')
  return _BY_ARCH[arch]
