"""Classify images with a tl_jax checkpoint (eval mode, validation preprocessing).

  python scripts/predict.py --checkpoint runs/frozen ants.jpg bees.jpg
  python scripts/predict.py --checkpoint ckpt/resnet18 --json --topk 5 *.jpg
"""

import argparse
import json
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='model checkpoint dir (convert_weights.py --out) or a training --workdir')
  parser.add_argument('--json', action='store_true', help='print a JSON list instead of text')
  parser.add_argument('--topk', type=int, default=1, help='classes shown per image in text mode')
  parser.add_argument('images', nargs='+', help='image files')
  args = parser.parse_args(argv)
  if args.topk < 1:
    parser.error('--topk must be >= 1')

  from tl_jax.checkpoint import load_model
  from tl_jax.predict import format_prediction, predict_files
  predictions = predict_files(args.checkpoint, args.images)
  if args.json:
    print(json.dumps([p.to_json() for p in predictions], indent=2))
  else:
    names = load_model(args.checkpoint).class_names
    for p in predictions:
      print(format_prediction(p, names, args.topk))
  failed = [p for p in predictions if p.error]
  for p in failed:
    print(f'error: {p.error}', file=sys.stderr)
  return 1 if failed else 0

