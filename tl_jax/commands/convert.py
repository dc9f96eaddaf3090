"""Convert torchvision weights to a tl_jax checkpoint, or back.

  python scripts/convert_weights.py --from-torch resnet18-f37072fd.pth --out ckpt/resnet18
  python scripts/convert_weights.py --from-torch vgg16-397923af.pth --arch vgg16 --out ckpt/vgg16
  python scripts/convert_weights.py --to-torch runs/frozen --out frozen.pth
"""

import argparse
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument('--from-torch', metavar='SRC', help='torchvision state dict (.pth/.safetensors)')
  direction.add_argument('--to-torch', metavar='DIR', help='tl_jax checkpoint dir or training workdir')
  parser.add_argument('--out', required=True, help='checkpoint dir to create, or the .pth/.safetensors to write')
  parser.add_argument('--arch', help='expected architecture, any torchvision classifier (`tl-jax archs` lists '
                      'them; default: recognised from the file)')
  parser.add_argument('--class-names', help="comma-separated names of the last layer's outputs")
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = parser.parse_args(argv)

  from tl_jax import export
  if args.from_torch:
    names = args.class_names.split(',') if args.class_names else None
    model = export.import_torch_weights(args.from_torch, args.out, args.arch, names, args.overwrite)
    print(f'wrote {args.out}: {model.arch}, {model.num_classes} classes')
  else:
    if Path(args.out).exists() and not args.overwrite:
      raise ValueError(f'{args.out} already exists; pass --overwrite to replace it')
    state_dict = export.export_torch_weights(args.to_torch, args.out)
    print(f'wrote {args.out}: {len(state_dict)} tensors')
  return 0

