"""Classify images with a tl_jax checkpoint (eval mode, validation preprocessing, and the
checkpoint's fitted temperature when it has one).

  python scripts/predict.py --checkpoint runs/frozen ants.jpg bees.jpg
  python scripts/predict.py --checkpoint ckpt/resnet18 --json --topk 5 *.jpg
  python scripts/predict.py --checkpoint runs/frozen --tta five-crop --min-confidence 0.8 *.jpg

--min-confidence P answers `unknown` for an image whose top (calibrated) probability is below P;
evaluate.py's coverage table shows how many images each P answers and how accurately.
"""

import argparse
import json
import sys
from typing import Optional, Sequence

TTA_CHOICES = ('flip', 'five-crop')


def _probability(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a probability in [0, 1], got {text!r}') from None
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f'expected a probability in [0, 1], got {text}')
  return value


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='model checkpoint dir (convert_weights.py --out) or a training --workdir')
  parser.add_argument('--json', action='store_true', help='print a JSON list instead of text')
  parser.add_argument('--topk', type=int, default=1, help='classes shown per image in text mode')
  parser.add_argument('--tta', choices=TTA_CHOICES,
                      help='test-time augmentation: the mean softmax of the val crop and its mirror (flip), or of '
                      "torchvision's FiveCrop in place of the CenterCrop (five-crop)")
  parser.add_argument('--no-temperature', action='store_true', help="ignore the checkpoint's fitted temperature")
  parser.add_argument('--min-confidence', type=_probability, metavar='P',
                      help='answer "unknown" when the top probability is below P')
  parser.add_argument('images', nargs='+', help='image files')
  args = parser.parse_args(argv)
  if args.topk < 1:
    parser.error('--topk must be >= 1')

  from tl_jax.checkpoint import load_model
  from tl_jax.predict import format_prediction, predict_files
  predictions = predict_files(args.checkpoint, args.images, tta=args.tta, use_temperature=not args.no_temperature,
                              min_confidence=args.min_confidence)
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
