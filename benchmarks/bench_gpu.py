#!/usr/bin/env python
"""Train-step throughput (images/s) in bfloat16 and float32, on every device or on several counts.

  python benchmarks/bench_gpu.py                               # GPU: ResNet-18, batch 256, bf16 and f32
  python benchmarks/bench_gpu.py --devices 1,2 --cpu-devices 2 # CPU: 1 vs 2 forced devices, interleaved
  python benchmarks/bench_gpu.py --json step.json

On a machine without an accelerator the defaults shrink to a smoke test (batch 8, 64x64 images).
The batch lives on the devices already: this is the step alone, not the input pipeline.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ is not installed

from benchmarks import write_json  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='resnet18')
  parser.add_argument('--batch-size', type=int, default=None, help='global batch (default 256; 8 on CPU)')
  parser.add_argument('--image-size', type=int, default=None, help='default 224; 64 on CPU')
  parser.add_argument('--dtypes', default='bfloat16,float32')
  parser.add_argument('--strategy', default='finetune', choices=('finetune', 'frozen'))
  parser.add_argument('--steps', type=int, default=None, help='steps per timed round (default 50; 3 on CPU)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--devices', default='all', help="comma-separated device counts to compare, or 'all'")
  parser.add_argument('--cpu-devices', type=int, default=None,
                      help='force this many CPU devices (set before JAX starts)')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()

  import jax
  if args.cpu_devices:
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  from benchmarks.steps import time_train_step
  on_cpu = jax.devices()[0].platform == 'cpu'
  batch = args.batch_size or (8 if on_cpu else 256)
  size = args.image_size or (64 if on_cpu else 224)
  steps = args.steps or (3 if on_cpu else 50)
  counts = [None] if args.devices == 'all' else [int(c) for c in args.devices.split(',')]
  rows = []
  for dtype in [d.strip() for d in args.dtypes.split(',') if d.strip()]:
    if dtype not in ('bfloat16', 'float32'):
      parser.error(f'--dtypes: {dtype!r} is neither bfloat16 nor float32')
    rows += time_train_step(args.arch, batch, dtype, size, args.strategy, steps, args.rounds, counts)
  print(f"{'dtype':<9} {'devices':>7} {'batch':>6} {'img/s best':>11} {'median':>9} {'compile s':>9}  device")
  for r in rows:
    print(f"{r['dtype']:<9} {r['devices']:>7} {r['batch_size']:>6} {r['images_per_second_best']:>11.1f} "
          f"{r['images_per_second_median']:>9.1f} {r['compile_seconds']:>9.1f}  {r['device_kind']} "
          f"({r['arch']}, {r['image_size']}px, {r['strategy']})")
  if args.json:
    write_json(args.json, rows)
  return 0


if __name__ == '__main__':
  from tl_jax import cli
  cli.run(main)
