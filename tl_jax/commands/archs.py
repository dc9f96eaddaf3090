"""List the architectures tl_jax builds: family, torchvision weights, input size and stages.

  tl-jax archs                   one line per arch
  tl-jax archs --markdown        the README's table
  tl-jax archs --arch vit_b_16   one arch, every weight enum with its preprocessing
"""

import argparse
from typing import Optional, Sequence


def _stages(arch: str) -> str:
  from tl_jax import models
  stages = models.arch_stages(arch)
  # Long runs of numbered stages (MobileNet's features.0 .. features.18) read better as a range.
  return ', '.join(stages) if len(stages) <= 8 else f'{", ".join(stages[:3])} .. {", ".join(stages[-3:])}'


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
  parser.add_argument('--arch', help='describe one arch and each of its torchvision weights')
  args = parser.parse_args(argv)

  from tl_jax import models, weights
  from tl_jax.weight_files import WEIGHT_FILES, imagenet_weights_name
  if args.arch:
    family = models.family_of(args.arch)
    print(f'{args.arch}: family {family.name}, head {family.head_torch}, stages {", ".join(models.arch_stages(args.arch))}')
    for name, file in WEIGHT_FILES[args.arch].items():
      mark = ' (imagenet)' if name == imagenet_weights_name(args.arch) else ''
      print(f'  {name}{mark}: {file.filename}, Resize({file.resize_size}, {file.interpolation}) '
            f'CenterCrop({file.crop_size}) Normalize(mean={list(file.mean)}, std={list(file.std)})')
    return 0
  if args.markdown:
    print('| arch | family | `weights: imagenet` (other enums) | eval size (resize / crop, interpolation) | stages |')
    print('|---|---|---|---|---|')
  for arch in models.ARCHS:
    family = models.family_of(arch)
    name = imagenet_weights_name(arch)
    file = WEIGHT_FILES[arch][name]
    others = [n for n in WEIGHT_FILES[arch] if n != name]
    size = f'{file.resize_size} / {file.crop_size}, {file.interpolation}'
    filename = weights.IMAGENET_URLS[arch].rsplit('/', 1)[1]
    if args.markdown:
      more = f' ({", ".join(others)})' if others else ''
      print(f'| {arch} | {family.name} | `{filename}`{more} | {size} | {_stages(arch)} |')
    else:
      print(f'{arch:20s} {family.name:14s} {filename:44s} {size}')
  return 0
