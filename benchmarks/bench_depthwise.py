#!/usr/bin/env python
"""Depthwise convolutions: XLA's grouped convolution against `fast_conv.depthwise_taps`, per shape.

  python benchmarks/bench_depthwise.py

Milliseconds of the forward and of forward + both gradients (jitted, best of 3) for depthwise
shapes of MobileNet V3 / EfficientNet-B0 (3x3, 5x5) and ConvNeXt-T (7x7) at batch 32.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ is not installed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tl_jax.models import fast_conv  # noqa: E402

# (kernel, stride, map size, channels)
SHAPES = [(3, 1, 112, 32), (3, 2, 112, 96), (5, 2, 56, 144), (3, 1, 56, 144), (5, 1, 14, 480), (7, 1, 56, 96),
          (7, 1, 7, 768)]


def _lax(x, k, stride, pad):
  return jax.lax.conv_general_dilated(x, k, (stride, stride), (pad, pad), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=x.shape[-1])


def _taps(x, k, stride, pad):
  return fast_conv.depthwise_taps(x, k, (stride, stride), (pad, pad))


def _best_ms(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def main() -> int:
  rng = np.random.default_rng(0)
  print('| kernel | stride | map | channels | XLA fwd ms | taps fwd ms | XLA fwd+bwd ms | taps fwd+bwd ms |')
  print('|---|---|---|---|---|---|---|---|')
  for kernel, stride, size, channels in SHAPES:
    pad = ((kernel - 1) // 2,) * 2
    x = jnp.asarray(rng.standard_normal((32, size, size, channels)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kernel, kernel, 1, channels)), jnp.float32)
    row = []
    for conv in (_lax, _taps):
      forward = jax.jit(lambda a, b, conv=conv: conv(a, b, stride, pad))
      grads = jax.jit(jax.grad(lambda a, b, conv=conv: jnp.sum(jnp.square(conv(a, b, stride, pad))), argnums=(0, 1)))
      row.append((_best_ms(forward, x, k), _best_ms(grads, x, k)))
    (lax_f, lax_g), (taps_f, taps_g) = row
    print(f'| {kernel} | {stride} | {size} | {channels} | {lax_f:.1f} | {taps_f:.1f} | {lax_g:.1f} | {taps_g:.1f} |',
          flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
