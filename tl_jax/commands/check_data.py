"""Check a data set before trusting a model trained on it: exact and near duplicates across train/val,
class balance, unreadable images, and with a checkpoint the likely mislabels (cleanlab).

  python scripts/check_data.py --data data/hymenoptera_data
  python scripts/check_data.py --data data/hymenoptera_data --checkpoint runs/frozen --out check/

--data holds train/ and val/ (and test/) of class sub-folders, or is one folder of classes.
Writes data_check.json, duplicates.png and mislabels.png to --out and prints a summary. Needs the
'check' extra (pip install 'tl_jax[check]': cleanlab, imagehash).
"""

import argparse
import json
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
  from tl_jax import data_check
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', required=True, help='folder with train/ and val/, or a folder of class sub-folders')
  parser.add_argument('--checkpoint', help='model checkpoint or training --workdir: its backbone gives the '
                      'features, and its probabilities the likely mislabels')
  parser.add_argument('--arch', default='resnet18', help='backbone without --checkpoint (default resnet18)')
  parser.add_argument('--weights', default='random', help='its weights without --checkpoint: random (default), '
                      'imagenet, a torchvision weight name or a .pth/.safetensors file')
  parser.add_argument('--out', default='data_check', help='folder for the report and pictures (default data_check/)')
  parser.add_argument('--hash-bits', type=int, default=data_check.HASH_MAX_BITS,
                      help=f'perceptual-hash bits (of 64) at or below which a val/train pair is flagged '
                      f'(default {data_check.HASH_MAX_BITS})')
  parser.add_argument('--cosine', type=float, help=f'feature cosine at or above which a pair is flagged (default '
                      f'{data_check.COSINE_THRESHOLD} with trained weights; random weights: not used)')
  parser.add_argument('--no-features', action='store_true', help='hashes only: no backbone, no mislabels')
  parser.add_argument('--folds', type=int, default=5, help='k of the k-fold heads for train mislabels (default 5)')
  parser.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
  parser.add_argument('--workers', type=int, default=2, help='image decoding threads')
  parser.add_argument('--json', action='store_true', help='print the JSON report instead of the summary')
  args = parser.parse_args(argv)
  if not 0 <= args.hash_bits <= 64:
    parser.error(f'--hash-bits {args.hash_bits}: choose 0..64')
  if args.cosine is not None and not -1.0 <= args.cosine <= 1.0:
    parser.error(f'--cosine {args.cosine}: choose a value in [-1, 1]')

  report = data_check.check_data(args.data, args.checkpoint, arch=args.arch, weights=args.weights, out_dir=args.out,
                                 hash_max_bits=args.hash_bits, cosine_threshold=args.cosine,
                                 batch_size=args.batch_size, workers=args.workers, folds=args.folds,
                                 use_features=not args.no_features)
  print(json.dumps(report, indent=2) if args.json else data_check.format_summary(report))
  return 0
