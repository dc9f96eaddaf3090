"""Images/s of the input pipeline alone: tl_jax's Loader against torchvision's DataLoader and grain.

The tutorial's train transforms (batch 32 and its own batch 4) and a heavy list (Resize, RandomCrop,
RandomHorizontalFlip, RandomRotation, ColorJitter, RandomGrayscale) at 1, 2 and all-core workers,
on the same files; frameworks interleaved epoch by epoch; the first epoch is warm-up.

Usage: python benchmarks/bench_loader.py [--data data/hymenoptera_data/train] [--workers 1 2 8] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ is not installed

from benchmarks import loader as bench  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', type=Path, default=Path('data/hymenoptera_data/train'),
                      help='a folder of one sub-folder per class')
  parser.add_argument('--workers', type=int, nargs='+', default=sorted({1, 2, os.cpu_count() or 1}))
  parser.add_argument('--lists', nargs='+', default=list(bench.LISTS), choices=list(bench.LISTS))
  parser.add_argument('--frameworks', nargs='+', default=list(bench.FRAMEWORKS), choices=bench.FRAMEWORKS)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--tutorial-batch-size', type=int, default=4, help='0: only --batch-size')
  parser.add_argument('--epochs', type=int, default=4, help='per framework and case; the first is warm-up')
  parser.add_argument('--json', type=Path, help='also write every epoch time here')
  args = parser.parse_args()

  cases = [c for c in bench.default_cases(args.workers, args.batch_size, args.tutorial_batch_size)
           if c.transforms in args.lists]
  print(f'{args.data}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
        f'{args.epochs} epochs per case (first is warm-up)')
  print(bench.format_table([]))
  results = bench.run(args.data, cases, args.frameworks, args.epochs)
  print('\n' + bench.format_table(results))
  if args.json:
    args.json.write_text(json.dumps(bench.to_json(results), indent=1))


if __name__ == '__main__':
  main()
