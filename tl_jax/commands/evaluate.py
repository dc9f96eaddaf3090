"""Evaluate a tl_jax checkpoint on an image folder: accuracy, loss, per-class precision/recall/F1,
the confusion matrix, the calibration (ECE, adaptive ECE, MCE, NLL, Brier) and the coverage-accuracy
table, printed and written to --out as evaluation.json, confusion.png, reliability.png and coverage.png.

  python scripts/evaluate.py --checkpoint runs/frozen --data data/hymenoptera_data
  python scripts/evaluate.py --checkpoint ckpt/resnet18 --data my_images --json --out eval/
  python scripts/evaluate.py --checkpoint runs/frozen --data data/hymenoptera_data --fit-temperature
  python scripts/evaluate.py --checkpoint runs/frozen --data data/hymenoptera_data --tta five-crop

--data is a folder of class sub-folders, or a folder with val/ (then val/ is evaluated). Its class
folders must be the checkpoint's classes. Images are preprocessed as the checkpoint records.
A temperature fitted with --fit-temperature is stored in the checkpoint and applied from then on
(here and by predict.py) unless --no-temperature.
"""

import argparse
import json
import sys
from typing import Optional, Sequence

TTA_CHOICES = ('flip', 'five-crop')


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='model checkpoint dir (convert_weights.py --out) or a training --workdir')
  parser.add_argument('--data', required=True, help='folder of class sub-folders, or one holding val/, or a '
                      'labels CSV for a multi-label checkpoint')
  parser.add_argument('--json', action='store_true', help='print the JSON report instead of text')
  parser.add_argument('--out', help='folder for evaluation.json and the figures (default: the training run '
                      'directory of --checkpoint, else the current directory)')
  parser.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
  parser.add_argument('--workers', type=int, default=2, help='image decoding threads')
  parser.add_argument('--skip-bad-images', action='store_true',
                      help='drop unreadable images with a warning instead of stopping')
  parser.add_argument('--tta', choices=TTA_CHOICES,
                      help='test-time augmentation: the mean softmax of the val crop and its mirror (flip), or of '
                      "torchvision's FiveCrop in place of the CenterCrop (five-crop)")
  temperature = parser.add_mutually_exclusive_group()
  temperature.add_argument('--fit-temperature', action='store_true',
                           help='fit one temperature on these images (minimum NLL), report the calibration before '
                           'and after, and store it in the checkpoint')
  temperature.add_argument('--no-temperature', action='store_true',
                           help="ignore the checkpoint's fitted temperature")
  args = parser.parse_args(argv)

  from tl_jax.data.multilabel import is_labels_csv
  if is_labels_csv(args.data):   # multi-label: per-class precision/recall/F1, mAP, subset accuracy
    from tl_jax.evaluate import EvaluationError, evaluate_labels_csv
    if args.fit_temperature or args.tta:
      raise EvaluationError(f'--data {args.data} is a labels CSV (multi-label): temperatures are not fitted and '
                            'TTA is not applied for multi-label (sigmoid) heads; drop --fit-temperature / --tta')
    from tl_jax.metrics import format_multilabel
    result = evaluate_labels_csv(args.checkpoint, args.data, batch_size=args.batch_size, workers=args.workers,
                                 out_dir=args.out, skip_bad_images=args.skip_bad_images)
    print(json.dumps(result, indent=2) if args.json else format_multilabel(result))
    return 0
  from tl_jax.evaluate import evaluate_checkpoint, format_report
  report = evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, workers=args.workers,
                               out_dir=args.out, skip_bad_images=args.skip_bad_images, tta=args.tta,
                               use_temperature=not args.no_temperature, fit_temperature=args.fit_temperature)
  print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
  if report.info.get('temperature_fit_error'):
    # The evaluation stands; the fit that was asked for did not happen.
    print(f'error: no temperature fitted: {report.info["temperature_fit_error"]}', file=sys.stderr)
    return 1
  return 0
