#!/usr/bin/env python
"""Time tl_jax against the PyTorch tutorial on the same data and machine, in one run.

  python benchmarks/benchmark.py                         # frozen and finetune, 2 epochs each
  python benchmarks/benchmark.py --epochs 3 --strategies finetune --json bench.json
  python benchmarks/benchmark.py --skip-torch --epochs 1
  python benchmarks/benchmark.py --epochs 3 --bn train,frozen      # both BatchNorm policies too
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ is not installed

from benchmarks import write_json  # noqa: E402

from tl_jax import cli  # noqa: E402

_SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'hymenoptera_data'


def _default_data() -> str:
  return str(_SHARED_DATA) if _SHARED_DATA.is_dir() else 'data/hymenoptera_data'


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--epochs', type=int, default=2, help='epochs per strategy and framework (K)')
  parser.add_argument('--strategies', default='frozen,finetune', help='comma-separated: frozen, finetune')
  parser.add_argument('--bn', default='train',
                      help="comma-separated BatchNorm policies to run each strategy with: train (the tutorial's), "
                           'frozen (default %(default)s; train,frozen runs both)')
  parser.add_argument('--data', default=_default_data(), help='folder with train/ and val/ (default %(default)s)')
  parser.add_argument('--weights', default='random',
                      help='random (default: speed does not depend on the values), imagenet or a state-dict path')
  parser.add_argument('--torch-threads', type=int, default=None, help='torch.set_num_threads (default: os.cpu_count())')
  parser.add_argument('--workers', type=int, default=None, help='loader workers for both frameworks (default: config)')
  parser.add_argument('--json', default=None, help='also write the full report here')
  parser.add_argument('--skip-torch', action='store_true', help='time tl_jax only')
  parser.add_argument('--skip-jax', action='store_true', help='time the torch tutorial only')
  parser.add_argument('--no-cache-features', dest='cache_features', action='store_false',
                      help="tl_jax computes a frozen backbone's features every epoch even where they cannot change")
  args = parser.parse_args()
  strategies = [s.strip() for s in args.strategies.split(',') if s.strip()]
  if args.epochs < 1:
    parser.error('--epochs must be >= 1')
  if args.skip_torch and args.skip_jax:
    parser.error('--skip-torch and --skip-jax leave nothing to run')
  if not strategies:
    parser.error('--strategies is empty')
  bn_policies = [b.strip() for b in args.bn.split(',') if b.strip()]
  bad = [b for b in bn_policies if b not in ('train', 'frozen')] + [s for s in strategies
                                                                  if s not in ('frozen', 'finetune')]
  if bad or not bn_policies:
    parser.error(f'unknown --strategies/--bn value(s) {bad}; strategies: frozen, finetune; bn: train, frozen')

  from benchmarks.epochs import format_report, run_benchmark
  report = run_benchmark(args.data, strategies=strategies, bn_policies=bn_policies, epochs=args.epochs, weights=args.weights,
                         torch_threads=args.torch_threads, workers=args.workers,
                         run_jax=not args.skip_jax, run_reference=not args.skip_torch,
                         cache_features=args.cache_features,
                         log=lambda m: print(m, file=sys.stderr))
  print(format_report(report))
  if args.json:
    write_json(args.json, report)
  return 0


if __name__ == '__main__':
  cli.run(main)
