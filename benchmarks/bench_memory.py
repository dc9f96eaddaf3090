#!/usr/bin/env python
"""Step time and peak memory of one train step, e.g. VGG16 fine-tuned at batch 32 on CPU, in tl_jax
(the jitted step, state donated) or in torch (torchvision's model, the same SGD step).

  python benchmarks/bench_memory.py                                   # vgg16, batch 32, finetune, 224 px
  python benchmarks/bench_memory.py --arch resnet18 --batch-size 4 --strategy frozen
  python benchmarks/bench_memory.py --arch convnext_tiny --framework torch
  python benchmarks/bench_memory.py --arch convnext_tiny,vit_b_16 --framework both   # each in its own process

Peak memory is the process's peak RSS, so each measurement needs a fresh process: `--framework both`
(or several archs) starts one per arch and framework and prints a table.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ is not installed

from tl_jax import cli  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='vgg16')
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--strategy', choices=['frozen', 'finetune'], default='finetune')
  parser.add_argument('--image-size', type=int, help="default: the crop size of the arch's imagenet weights")
  parser.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up step')
  parser.add_argument('--framework', choices=['jax', 'torch', 'both'], default='jax')
  args = parser.parse_args()
  archs = args.arch.split(',')
  if len(archs) > 1 or args.framework == 'both':
    return _table(archs, args)
  from tl_jax.weights import default_preprocessing
  image_size = args.image_size or default_preprocessing(args.arch).crop_size
  if args.framework == 'torch':
    from benchmarks.steps import torch_step_time_and_memory as measure
  else:
    from benchmarks.steps import step_time_and_memory as measure
  result = measure(args.arch, args.batch_size, args.strategy, image_size, args.steps)
  print(json.dumps({'framework': args.framework, **result}))
  return 0


def _table(archs, args) -> int:
  """One child process per arch and framework (peak RSS is per process); a Markdown table."""
  frameworks = ['jax', 'torch'] if args.framework == 'both' else [args.framework]
  print('| arch | batch | size | tl_jax s/step | torch s/step | ratio | tl_jax peak GiB | torch peak GiB |')
  print('|---|---|---|---|---|---|---|---|')
  for arch in archs:
    results = {}
    for framework in frameworks:
      command = [sys.executable, __file__, '--arch', arch, '--batch-size', str(args.batch_size), '--strategy',
                 args.strategy, '--steps', str(args.steps), '--framework', framework]
      if args.image_size:
        command += ['--image-size', str(args.image_size)]
      out = subprocess.run(command, capture_output=True, text=True)
      if out.returncode != 0:
        print(f'{arch} {framework} failed:\n{out.stderr[-2000:]}', file=sys.stderr)
        continue
      results[framework] = json.loads(out.stdout.strip().splitlines()[-1])
    jax_r, torch_r = results.get('jax', {}), results.get('torch', {})
    any_r = jax_r or torch_r
    if not any_r:
      continue

    def cell(r, key, fmt):
      return format(r[key], fmt) if key in r else '-'

    ratio = f"{jax_r['step_seconds'] / torch_r['step_seconds']:.2f}" if jax_r and torch_r else '-'
    print(f"| {arch} | {args.batch_size} | {any_r['image_size']} | {cell(jax_r, 'step_seconds', '.2f')} | "
          f"{cell(torch_r, 'step_seconds', '.2f')} | {ratio} | {cell(jax_r, 'peak_rss_gib', '.1f')} | "
          f"{cell(torch_r, 'peak_rss_gib', '.1f')} |", flush=True)
  return 0


if __name__ == '__main__':
  cli.run(main)
