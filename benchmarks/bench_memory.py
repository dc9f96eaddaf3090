#!/usr/bin/env python
"""Step time and peak memory of one jitted train step, e.g. VGG16 fine-tuned at batch 32 on CPU.

  python benchmarks/bench_memory.py                                   # vgg16, batch 32, finetune, 224 px
  python benchmarks/bench_memory.py --arch resnet18 --batch-size 4 --strategy frozen
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ is not installed

from tl_jax import cli  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='vgg16')
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--strategy', choices=['frozen', 'finetune'], default='finetune')
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up step')
  args = parser.parse_args()
  from benchmarks.steps import step_time_and_memory
  result = step_time_and_memory(args.arch, args.batch_size, args.strategy, args.image_size, args.steps)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == '__main__':
  cli.run(main)
