"""Every model family tl_jax has, registered once: adding a family is its file and one line here."""

from __future__ import annotations

from tl_jax.models import alexnet
from tl_jax.models import convnext
from tl_jax.models import densenet
from tl_jax.models import efficientnet
from tl_jax.models import googlenet
from tl_jax.models import inception
from tl_jax.models import maxvit
from tl_jax.models import mnasnet
from tl_jax.models import mobilenet
from tl_jax.models import regnet
from tl_jax.models import resnet
from tl_jax.models import shufflenet
from tl_jax.models import squeezenet
from tl_jax.models import swin
from tl_jax.models import vgg
from tl_jax.models import vit
from tl_jax.models.family import Family

FAMILIES: tuple[Family, ...] = (
    resnet.FAMILY,
    inception.FAMILY,
    googlenet.FAMILY,
    vgg.FAMILY,
    densenet.FAMILY,
    squeezenet.FAMILY,
    alexnet.FAMILY,
    shufflenet.FAMILY,
    swin.FAMILY,
    efficientnet.FAMILY,
    convnext.FAMILY,
    regnet.FAMILY,
    vit.FAMILY,
    maxvit.FAMILY,
    mobilenet.FAMILY_V2,
    mobilenet.FAMILY_V3,
    mnasnet.FAMILY,
)

# Every supported architecture name, family by family.
ARCHS: tuple[str, ...] = tuple(arch for family in FAMILIES for arch in family.archs)
_BY_ARCH = {arch: family for family in FAMILIES for arch in family.archs}


def family_of(arch: str) -> Family:
  """The family that builds `arch`; ValueError naming the known archs otherwise."""
  if arch not in _BY_ARCH:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(_BY_ARCH)}')
  return _BY_ARCH[arch]
