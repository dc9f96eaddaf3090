#!/usr/bin/env python
"""Train a classifier the way PyTorch's transfer-learning tutorial does.

  python scripts/train.py --strategy frozen      # only the new fc learns
  python scripts/train.py --strategy finetune    # every parameter learns

Values come from configs/<strategy>.yaml (or --config); flags override them.
"""

import argparse
from pathlib import Path

from tl_jax import cli

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--strategy', choices=['frozen', 'finetune'], help='what learns (default: finetune)')
  parser.add_argument('--config', help='YAML config (default: configs/<strategy>.yaml)')
  parser.add_argument('--data', help='folder with train/ and val/ (default: data/hymenoptera_data, '
                                     'downloaded when missing)')
  parser.add_argument('--weights', help='imagenet | random | PATH to a .pth/.safetensors state dict')
  parser.add_argument('--arch', help='resnet18 | resnet34 | resnet50 | resnet101')
  parser.add_argument('--epochs', type=int)
  parser.add_argument('--batch-size', type=int)
  parser.add_argument('--eval-batch-size', type=int)
  parser.add_argument('--lr', type=float)
  parser.add_argument('--workdir', help='run directory (default: runs/<strategy>)')
  parser.add_argument('--seed', type=int)
  parser.add_argument('--bn', choices=['train', 'frozen'],
                      help='train: BN uses batch statistics while training (the tutorial); frozen: eval-mode BN')
  parser.add_argument('--workers', type=int, help='data loading threads')
  parser.add_argument('--skip-bad-images', action='store_true', default=None,
                      help='warn about and drop unreadable images instead of stopping')
  parser.add_argument('--resume', action='store_true', help='continue the run in --workdir')
  parser.add_argument('--no-progress', action='store_true', help='no progress bars')
  args = parser.parse_args()

  from tl_jax.config import load_config
  from tl_jax.train import train_and_evaluate
  strategy = args.strategy or 'finetune'
  config_path = args.config or CONFIGS / f'{strategy}.yaml'
  config = load_config(config_path, strategy=args.strategy, data=args.data, weights=args.weights, arch=args.arch,
                       epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                       lr=args.lr, seed=args.seed, bn=args.bn, workers=args.workers,
                       skip_bad_images=args.skip_bad_images)
  workdir = args.workdir or f'runs/{config.strategy}'
  train_and_evaluate(config, workdir, resume=args.resume, progress=not args.no_progress)
  return 0


if __name__ == '__main__':
  cli.run(main)
