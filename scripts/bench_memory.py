#!/usr/bin/env python
"""Step time and peak memory of one jitted train step, e.g. VGG16 fine-tuned at batch 32 on CPU.

  python scripts/bench_memory.py                                   # vgg16, batch 32, finetune, 224 px
  python scripts/bench_memory.py --arch resnet18 --batch-size 4 --strategy frozen
"""

import argparse
import json

from tl_jax import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='vgg16')
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--strategy', choices=['frozen', 'finetune'], default='finetune')
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up step')
  args = parser.parse_args()
  from tl_jax.benchmark import step_time_and_memory
  result = step_time_and_memory(args.arch, args.batch_size, args.strategy, args.image_size, args.steps)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == '__main__':
  cli.run(main)
