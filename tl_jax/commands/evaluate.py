"""Evaluate a tl_jax checkpoint on an image folder: accuracy, loss, per-class precision/recall/F1
and the confusion matrix, printed and written to --out as evaluation.json and confusion.png.

  python scripts/evaluate.py --checkpoint runs/frozen --data data/hymenoptera_data
  python scripts/evaluate.py --checkpoint ckpt/resnet18 --data my_images --json --out eval/

--data is a folder of class sub-folders, or a folder with val/ (then val/ is evaluated). Its class
folders must be the checkpoint's classes. Images are preprocessed as the checkpoint records.
"""

import argparse
import json
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='model checkpoint dir (convert_weights.py --out) or a training --workdir')
  parser.add_argument('--data', required=True, help='folder of class sub-folders, or one holding val/')
  parser.add_argument('--json', action='store_true', help='print the JSON report instead of text')
  parser.add_argument('--out', help='folder for evaluation.json and confusion.png (default: the training run '
                      'directory of --checkpoint, else the current directory)')
  parser.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
  parser.add_argument('--workers', type=int, default=2, help='image decoding threads')
  parser.add_argument('--skip-bad-images', action='store_true',
                      help='drop unreadable images with a warning instead of stopping')
  args = parser.parse_args(argv)

  from tl_jax.evaluate import evaluate_checkpoint, format_report
  report = evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, workers=args.workers,
                               out_dir=args.out, skip_bad_images=args.skip_bad_images)
  print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
  return 0

