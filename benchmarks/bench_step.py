"""Per-step time of the jitted ResNet train step against torch's, per strategy, and per conv op.

  python benchmarks/bench_step.py [--steps 12] [--batch 4] [--size 224] [--ops] [--jax-profile] [--torch-profile]

Every variant is compiled first, then the variants run in turn, one step each per round, so a
busy machine slows them alike; the table shows the median over rounds. Variants: XLA's own conv
gradients (`xla`, create_model(fast_backward=False)), tl_jax's default with fast_conv's CPU
rewrites (`fast`) and torch (the tutorial's model.train() + SGD step). `--ops` adds a
per-convolution breakdown: forward, input gradient and weight gradient of every distinct
ResNet-18 conv shape, XLA, fast and torch. Where the Winograd policy (tl_jax/models/winograd_policy.json)
keeps any op, the variant `wino` adds its Winograd convolutions to `fast`.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import tl_jax  # noqa: F401  first: it sets XLA:CPU's flags before JAX starts (tl_jax.xla_defaults)
import jax
import numpy as np


def _median_ms(times):
  return 1e3 * float(np.median(times))


# time.perf_counter (wall) or time.process_time (CPU seconds of every thread of this process:
# on a machine shared with other jobs it counts our work, not our wait for a core).
CLOCK = time.perf_counter


def _interleaved(fns: dict, rounds: int) -> dict:
  """name -> median ms of fn() over `rounds`, taking one call of each name per round."""
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = CLOCK()
      fn()
      times[name].append(CLOCK() - start)
  return {name: _median_ms(t) for name, t in times.items()}


def jax_step(strategy: str, fast_backward: bool, batch: int, size: int, bn: str = 'train', winograd: bool = False):
  """A zero-argument callable running one jitted train step (state carried), and its compile time."""
  from tl_jax import optim, training as train
  from tl_jax.models import create_model, init_variables
  model = create_model('resnet18', 2, fast_backward=fast_backward, winograd=winograd)
  variables = init_variables(model, jax.random.PRNGKey(0), image_size=32)
  tx = optim.make_optimizer(variables['params'], strategy, {'name': 'sgd', 'momentum': 0.9}, 0.001)
  state = train.create_train_state(model, variables, tx, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  data = {'images': rng.standard_normal((batch, size, size, 3), dtype=np.float32),
          'labels': rng.integers(0, 2, batch).astype(np.int32), 'mask': np.ones(batch, bool)}
  step = jax.jit(functools.partial(train.train_step, model=model,
                                   trainable=optim.trainable_mask(state.params, strategy),
                                   bn_train=bn == 'train'), donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def run():
    holder[0], sums = compiled(holder[0], data)
    jax.block_until_ready(sums)

  run()
  return run, compile_s


def torch_step(strategy: str, batch: int, size: int):
  import torch
  import torchvision
  model = torchvision.models.resnet18(num_classes=2)
  if strategy == 'frozen':
    for p in model.parameters():
      p.requires_grad = False
    model.fc = torch.nn.Linear(512, 2)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=0.001, momentum=0.9)
  model.train()
  x = torch.randn(batch, 3, size, size)
  y = torch.randint(0, 2, (batch,))

  def run():
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  run()
  return run, model, x, y, opt


# (name, input size, in channels, out channels, kernel, stride, padding) for batch 4 at 224 px.
CONV_SHAPES = [('conv1 7x7/2', 224, 3, 64, 7, 2, 3), ('layer1 3x3', 56, 64, 64, 3, 1, 1),
               ('layer2.0.conv1 3x3/2', 56, 64, 128, 3, 2, 1), ('layer2 3x3', 28, 128, 128, 3, 1, 1),
               ('layer2 down 1x1/2', 56, 64, 128, 1, 2, 0), ('layer3.0.conv1 3x3/2', 28, 128, 256, 3, 2, 1),
               ('layer3 3x3', 14, 256, 256, 3, 1, 1), ('layer3 down 1x1/2', 28, 128, 256, 1, 2, 0),
               ('layer4.0.conv1 3x3/2', 14, 256, 512, 3, 2, 1), ('layer4 3x3', 7, 512, 512, 3, 1, 1),
               ('layer4 down 1x1/2', 14, 256, 512, 1, 2, 0)]
# How many times each shape occurs in ResNet-18.
CONV_COUNT = {'conv1 7x7/2': 1, 'layer1 3x3': 4, 'layer2 3x3': 3, 'layer3 3x3': 3, 'layer4 3x3': 3}


def conv_ops(batch: int, rounds: int):
  """Per conv shape: ms of forward, dx, dW in XLA, fast_conv and torch (interleaved)."""
  import torch
  from jax import lax

  from tl_jax.models import fast_conv
  rows = []
  for name, size, cin, cout, k, s, p in CONV_SHAPES:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = rng.standard_normal((k, k, cin, cout), dtype=np.float32)
    out = (size + 2 * p - k) // s + 1
    dy = rng.standard_normal((batch, out, out, cout), dtype=np.float32)
    pads = ((p, p), (p, p))
    plain = lambda x_, w_: lax.conv_general_dilated(x_, w_, (s, s), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    fast = lambda x_, w_: fast_conv.conv2d(x_, w_, (s, s), pads)
    fns = {}
    for label, f in (('xla', plain), ('fast', fast)):
      fwd = jax.jit(f)
      dx = jax.jit(lambda x_, w_, d, f=f: jax.vjp(lambda a: f(a, w_), x_)[1](d)[0])
      dw = jax.jit(lambda x_, w_, d, f=f: jax.vjp(lambda b: f(x_, b), w_)[1](d)[0])
      for op, fn, args in (('fwd', fwd, (x, w)), ('dx', dx, (x, w, dy)), ('dW', dw, (x, w, dy))):
        jax.block_until_ready(fn(*args))
        fns[f'{label} {op}'] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)
    tw = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).requires_grad_(True)
    tdy = torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))
    conv = lambda: torch.nn.functional.conv2d(tx, tw, stride=s, padding=p)

    def torch_fwd():
      with torch.no_grad():
        conv()
    fns['torch fwd'] = torch_fwd
    fns['torch dx'] = lambda: torch.autograd.grad(conv(), tx, tdy)
    fns['torch dW'] = lambda: torch.autograd.grad(conv(), tw, tdy)
    rows.append((name, _interleaved(fns, rounds)))
  return rows


def jax_profile(strategy: str, batch: int, size: int, steps: int = 3, top: int = 20) -> list[tuple[str, float, float]]:
  """(op kind, ms per step, % of op time) of the jitted step under jax.profiler, the largest first.

  Op names are XLA's thunk names with their numeric suffix dropped (`transpose_copy_fusion.57` ->
  `transpose_copy_fusion`); times are summed over XLA's worker threads, so on 2 threads they can
  add up to about twice the step's wall time.
  """
  import collections
  import glob
  import gzip
  import json
  import re
  import tempfile
  run, _ = jax_step(strategy, True, batch, size)   # the default model (fast_conv on)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        run()
    path = glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  kinds: collections.Counter = collections.Counter()
  for e in events:
    thread = threads.get((e.get('pid'), e.get('tid')), '')
    if e.get('ph') != 'X' or not thread.startswith('tf_XLA') or e['name'].startswith('ThunkExecutor'):
      continue
    kinds[re.sub(r'(\.\d+)+$', '', e['name'])] += e['dur']
  total = sum(kinds.values()) or 1
  return [(k, d / 1e3 / steps, 100 * d / total) for k, d in kinds.most_common(top)]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=12, help='timed rounds (after one warm-up step)')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--strategies', default='finetune,frozen')
  parser.add_argument('--ops', action='store_true', help='per-conv-op breakdown too')
  parser.add_argument('--jax-profile', action='store_true', help="XLA's op profile of tl_jax's finetune step")
  parser.add_argument('--torch-profile', action='store_true', help="torch's own op profile of its finetune step")
  parser.add_argument('--cpu-time', action='store_true',
                      help='report CPU seconds of this process instead of wall time (for a shared machine; '
                           'run under `taskset -c 0` so that no spinning worker thread inflates it)')
  args = parser.parse_args()
  global CLOCK
  if args.cpu_time:
    CLOCK = time.process_time
  import torch
  from tl_jax.models import winograd
  # XLA sizes its thread pool from the CPUs this process may run on (taskset); torch from the
  # machine's cores unless told.
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  print(f'{len(os.sched_getaffinity(0))} of {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.2f}), '
        f'jax {jax.__version__} '
        f'({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads); '
        f"batch {args.batch}, {args.size} px; {'CPU' if args.cpu_time else 'wall'} ms, median of {args.steps} rounds; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or 'unset'} (tl_jax.xla_defaults)")
  for strategy in filter(None, args.strategies.split(',')):
    fns, compile_s = {}, {}
    for label, fast_backward in (('xla', False), ('fast', True)):
      fns[label], compile_s[label] = jax_step(strategy, fast_backward, args.batch, args.size)
    if any(any(ops) for ops in winograd.policy().values()):   # the policy's Winograd convs on top of `fast`
      fns['wino'], compile_s['wino'] = jax_step(strategy, True, args.batch, args.size, winograd=True)
    fns['torch'] = torch_step(strategy, args.batch, args.size)[0]
    ms = _interleaved(fns, args.steps)
    print(f'{strategy:9s} ' + '  '.join(f'{k} {v:6.1f} ms' for k, v in ms.items())
          + f"  | fast/torch {ms['fast'] / ms['torch']:.2f}, xla/torch {ms['xla'] / ms['torch']:.2f}"
          + (f", wino/torch {ms['wino'] / ms['torch']:.2f}" if 'wino' in ms else '')
          + '  | compile ' + ', '.join(f'{k} {v:.1f}s' for k, v in compile_s.items()))
  if args.ops:
    print(f'\nper conv op, ms (median of {args.steps} interleaved rounds), batch {args.batch}:')
    ops = ('fwd', 'dx', 'dW')
    print(f"{'conv':22s} " + ' '.join(f'{f"{lib} {op}":>10s}' for op in ops for lib in ('xla', 'fast', 'torch')))
    for name, ms in conv_ops(args.batch, args.steps):
      print(f'{name:22s} ' + ' '.join(f'{ms[f"{lib} {op}"]:10.2f}' for op in ops for lib in ('xla', 'fast', 'torch'))
            + (f'   x{CONV_COUNT[name]}' if name in CONV_COUNT else ''))
  if args.jax_profile:
    print("\ntl_jax's finetune step (3 steps), XLA ops by kind (summed over XLA's threads):")
    for kind, ms, share in jax_profile('finetune', args.batch, args.size):
      print(f'{ms:9.1f} ms/step {share:6.1f} %  {kind}')
  if args.torch_profile:
    run, *_ = torch_step('finetune', args.batch, args.size)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
      for _ in range(3):
        run()
    print("\ntorch's finetune step (3 steps), by op:")
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15))


if __name__ == '__main__':
  main()
