"""File-level conversion: a torchvision .pth/.safetensors <-> a tl_jax model checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from tl_jax import checkpoint, convert, weights
from tl_jax.models import ARCHS, create_model, family_of, init_variables


def imagenet_class_names() -> Optional[list[str]]:
  """ImageNet-1k class names from torchvision when it is installed, else None."""
  try:
    from torchvision.models._meta import _IMAGENET_CATEGORIES
  except ImportError:
    return None
  return list(_IMAGENET_CATEGORIES)


def import_torch_weights(src: str | Path, out: str | Path, arch: Optional[str] = None,
                         class_names: Optional[Sequence[str]] = None, overwrite: bool = False) -> checkpoint.ModelCheckpoint:
  """Converts a torchvision state dict file into a model checkpoint at `out`.

  Args:
    src: a .pth/.pt (read with weights_only=True) or .safetensors state dict.
    out: directory to create.
    arch: expected architecture (a ResNet or VGG name); by default the one whose tensor names the file has.
    class_names: names of the last layer's outputs (`fc`, or VGG's `classifier.6`), if known
      (ImageNet's are filled in for 1000).
  """
  state_dict = weights.load_state_dict(src)
  guessed = convert.guess_arch(state_dict)
  if arch is None:
    if guessed is None:
      raise convert.ConversionError(f'{src}: its tensor names match no known architecture; pass --arch')
    arch = guessed
  elif arch not in ARCHS:
    raise convert.ConversionError(f'--arch {arch!r} is not supported; choose one of {", ".join(ARCHS)}')
  elif guessed is not None and guessed != arch:
    raise convert.ConversionError(f'{src}: this looks like a {guessed} state dict, not {arch}; '
                                  f'pass --arch {guessed}')
  num_classes = convert.head_num_classes(state_dict, arch)
  if num_classes is None:
    head = f'{family_of(arch).head_torch}.weight'
    raise convert.ConversionError(f'{src} has no {head} (the last layer of {arch}); it is not a torchvision '
                                  f'{arch} classifier state dict')
  # A bare state dict gets the preprocessing of the torchvision weights `imagenet` names for the arch.
  preprocessing = weights.load_preprocessing(src) or weights.default_preprocessing(arch)
  reference = init_variables(create_model(arch, num_classes, image_size=preprocessing.crop_size), _rng())
  variables = convert.torch_to_flax(state_dict, arch, reference=reference)
  if class_names is None and num_classes == 1000:
    class_names = imagenet_class_names()
  metadata = checkpoint.make_metadata(arch, num_classes, preprocessing.to_dict(),
                                      list(class_names) if class_names else None, source=str(src))
  checkpoint.save_model(out, variables, metadata, overwrite=overwrite)
  return checkpoint.ModelCheckpoint(variables, metadata)


def export_torch_weights(checkpoint_dir: str | Path, dst: str | Path) -> dict:
  """Writes the model checkpoint's variables as a torchvision state dict (.pth or .safetensors)."""
  model = checkpoint.load_model(checkpoint_dir)
  state_dict = convert.flax_to_torch(model.variables, model.arch)
  weights.save_state_dict(state_dict, dst, module_versions=TORCH_MODULE_VERSIONS.get(family_of(model.arch).name))
  return state_dict


# Module versions torchvision's loaders check (`_metadata` of a .pth): MNASNet's layout since 0.9 is
# version 2, which the name table follows; without it torchvision's MNASNet refuses the file.
TORCH_MODULE_VERSIONS = {'mnasnet': {'': 2}}


def _rng():
  import jax
  return jax.random.PRNGKey(0)
