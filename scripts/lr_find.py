#!/usr/bin/env python
"""The LR range test: `python scripts/lr_find.py --config RECIPE [--start-lr 1e-7 --end-lr 10 --steps 100]`.

The same as `scripts/train.py --lr-find ...` (every train flag applies: --data, --arch, --batch-size,
--workdir for lr_find.png, --stage ...); see tl_jax/training/lr_find.py.
"""

import sys

from tl_jax import cli
from tl_jax.commands import train


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  return train.main(['--lr-find', *argv], prog='lr_find.py')


if __name__ == '__main__':
  cli.run(main)
