#!/usr/bin/env python
"""Winograd 3x3 convolutions against XLA's direct ones and torch's, per ResNet-18 / VGG16 shape.

  python benchmarks/bench_winograd.py                       # batch 4 and 32, every shape
  python benchmarks/bench_winograd.py --batch 4 --nets resnet18

For each 3x3 stride-1 shape (channels, map size) and batch: milliseconds of the forward, the input
gradient (dx) and the weight gradient (dW) for XLA's direct convolution (the gradients as tl_jax
computes them today, `fast_conv`), Winograd F(2x2, 3x3) and F(4x4, 3x3) (`tl_jax.models.winograd`),
and torch (conv2d, and torch.nn.grad's conv2d_input / conv2d_weight); the best of `--repeats`
calls. Also the float32 error of each against the float64 direct convolution (max |err| / max |ref|).
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ is not installed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tl_jax.models import fast_conv, winograd  # noqa: E402

# (net, in channels, out channels, map size) of every distinct 3x3 stride-1 conv.
SHAPES = {
    'resnet18': [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)],
    'vgg16': [(3, 64, 224), (64, 64, 224), (128, 128, 112), (256, 256, 56), (512, 512, 28), (512, 512, 14)],
}
PAD = ((1, 1), (1, 1))


def _best_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))   # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def _jax_ops(method):
  """(forward, dx, dw) jitted for `method`: 'xla' (tl_jax's current convs) or a Winograd tile size."""
  if method == 'xla':
    forward = functools.partial(fast_conv._conv, strides=(1, 1), padding=PAD)
    dx = lambda x, k, dy: fast_conv._cpu_grads((1, 1), PAD, x, k, dy)[0]   # noqa: E731
    dw = lambda x, k, dy: fast_conv._cpu_grads((1, 1), PAD, x, k, dy)[1]   # noqa: E731
  else:
    forward = functools.partial(winograd.conv, m=method)
    dx = lambda x, k, dy: winograd.input_grad(dy, k, method)   # noqa: E731
    dw = lambda x, k, dy: winograd.weight_grad(x, dy, method)  # noqa: E731
  return jax.jit(forward), jax.jit(dx), jax.jit(dw)


def _torch_ms(x, k, dy, repeats):
  import torch
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  kt = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
  dyt = torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))
  ops = {'forward': lambda: torch.nn.functional.conv2d(xt, kt, padding=1),
         'dx': lambda: torch.nn.grad.conv2d_input(xt.shape, kt, dyt, padding=1),
         'dw': lambda: torch.nn.grad.conv2d_weight(xt, kt.shape, dyt, padding=1)}
  out = {}
  with torch.no_grad():
    for name, op in ops.items():
      op()
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
      out[name] = 1e3 * min(times)
  return out


def _errors(x, k, dy, method):
  """float32 max relative error of forward, dx, dw against the float64 direct convolution."""
  with jax.enable_x64(True):
    x64, k64, dy64 = (jnp.asarray(a, jnp.float64) for a in (x, k, dy))
    ref = fast_conv._conv(x64, k64, (1, 1), PAD)
    _, vjp = jax.vjp(lambda a, b: fast_conv._conv(a, b, (1, 1), PAD), x64, k64)
    refs = (ref, *vjp(dy64))
    refs = [np.asarray(r) for r in refs]
  ops = _jax_ops(method)
  ours = [np.asarray(op(*args), np.float64) for op, args in zip(ops, [(x, k), (x, k, dy), (x, k, dy)])]
  return [float(np.max(np.abs(o - r)) / np.max(np.abs(r))) for o, r in zip(ours, refs)]


def measure(batch, ci, co, size, repeats, methods=('xla', 2, 4)):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, ci)).astype(np.float32)
  k = (rng.standard_normal((3, 3, ci, co)) / np.sqrt(9 * ci)).astype(np.float32)
  dy = rng.standard_normal((batch, size, size, co)).astype(np.float32)
  row = {'batch': batch, 'ci': ci, 'co': co, 'size': size,
         'gflop': 2 * 9 * ci * co * size * size * batch / 1e9}
  for method in methods:
    forward, dx, dw = _jax_ops(method)
    name = 'xla' if method == 'xla' else f'f{method}'
    row[name] = {'forward': _best_ms(forward, (x, k), repeats), 'dx': _best_ms(dx, (x, k, dy), repeats),
                 'dw': _best_ms(dw, (x, k, dy), repeats)}
    row[name]['errors'] = _errors(x, k, dy, method)
  row['torch'] = _torch_ms(x, k, dy, repeats)
  return row


def policy(rows, margin):
  """{'measured': ..., 'shapes': [{ci, co, size, batch, forward, dx, dw}]}: per op the faster tile
  size when it takes at most `margin` of XLA's time and its float32 error stays at the direct conv's level
  (below 2e-6: F(2x2)'s 4e-7..1e-6; F(4x4)'s 3e-6..1.2e-5 would loosen the float32 parity bounds), else 0."""
  shapes = []
  for row in rows:
    entry = {k: row[k] for k in ('ci', 'co', 'size', 'batch')}
    for i, op in enumerate(('forward', 'dx', 'dw')):
      accurate = [m for m in (2, 4) if row[f'f{m}']['errors'][i] < 2e-6]
      best = min(accurate, key=lambda m: row[f'f{m}'][op]) if accurate else None
      fast = best is not None and row[f'f{best}'][op] <= margin * row['xla'][op]
      entry[op] = best if fast else 0
    shapes.append(entry)
  return {'measured': f'benchmarks/bench_winograd.py, margin {margin}, {time.strftime("%Y-%m-%d")}, '
                      f'{jax.devices()[0].device_kind}', 'shapes': shapes}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', default='4,32', help='comma-separated batch sizes')
  parser.add_argument('--nets', default='resnet18,vgg16')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--json', help='also write the rows to this file')
  parser.add_argument('--policy', help='write the Winograd policy (tl_jax/models/winograd_policy.json): per shape '
                                       'and op the tile size that beat XLA by --margin, else 0')
  parser.add_argument('--margin', type=float, default=0.9,
                      help='Winograd is kept where it takes at most this share of XLA\'s time (default 0.9)')
  args = parser.parse_args()
  rows = []
  print('| net | batch | Ci->Co @ size | GFLOP | op | XLA direct ms | F(2x2) ms | F(4x4) ms | torch ms '
        '| F(2x2) f32 err | F(4x4) f32 err |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for batch in (int(b) for b in args.batch.split(',')):
    for net in args.nets.split(','):
      for ci, co, size in SHAPES[net]:
        row = measure(batch, ci, co, size, args.repeats)
        rows.append({'net': net, **row})
        for i, op in enumerate(('forward', 'dx', 'dw')):
          print(f"| {net} | {batch} | {ci}->{co} @ {size} | {row['gflop']:.2f} | {op} | {row['xla'][op]:.1f} | "
                f"{row['f2'][op]:.1f} | {row['f4'][op]:.1f} | {row['torch'][op]:.1f} | "
                f"{row['f2']['errors'][i]:.1e} | {row['f4']['errors'][i]:.1e} |", flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=1))
  if args.policy:
    Path(args.policy).write_text(json.dumps(policy(rows, args.margin), indent=1) + '\n')
    print(f'wrote {args.policy}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
