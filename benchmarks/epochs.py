"""Speed of tl_jax against the PyTorch tutorial: same recipe, same data, same machine, same run.

For each strategy both frameworks train K epochs, one after the other (torch in a spawned child
process, see `run_torch`). The table shows per-epoch
train / val / total seconds and images per second; tl_jax's jit compile time is reported on its
own line (it is not part of any epoch's seconds). The steady-state ratio tl_jax / PyTorch averages
the epochs after the first (the first pays for warm-up: caches, worker start-up, allocations).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tl_jax.config import TutorialRecipe

FRAMEWORKS = ('tl_jax', 'torch')


@dataclasses.dataclass
class FrameworkRun:
  """One framework's K epochs of one strategy, reduced to what the report needs (JSON-able)."""
  framework: str
  history: list[dict]
  compile_seconds: dict[str, float]
  best_val_acc: float
  best_epoch: int
  wall_seconds: float  # the whole call: data listing, model init, compile, epochs, checkpoints
  info: dict = dataclasses.field(default_factory=dict)  # e.g. the torch child's device and threads

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _prefix_lines(prefix: str, message: str) -> str:
  return '\n'.join(f'{prefix} {line}' for line in str(message).splitlines()) or prefix


def _prefixed(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
  return lambda message: log(_prefix_lines(prefix, message))


def run_tl_jax(config: TutorialRecipe, log: Callable[[str], None] = print) -> FrameworkRun:
  """`tl_jax.training.train_and_evaluate` in a temporary workdir, without progress bars or plots."""
  from tl_jax.training import train_and_evaluate
  with tempfile.TemporaryDirectory(prefix='tl_jax_benchmark_') as workdir:
    start = time.perf_counter()
    # No plots: plotting is not part of the tutorial's loop.
    result = train_and_evaluate(config.to_config(), Path(workdir) / 'run', progress=False, plots=False,
                                  report=False, log=log)
    wall = time.perf_counter() - start
  return FrameworkRun('tl_jax', [dict(row) for row in result.history], dict(result.compile_seconds),
                      float(result.best_val_acc), int(result.best_epoch), wall)


def _log_stderr(prefix: str, message: str) -> None:
  print(_prefix_lines(prefix, message), file=sys.stderr, flush=True)


def _torch_child(config: TutorialRecipe, data_root: str, state_dict, num_threads: Optional[int],
                 prefix: str) -> FrameworkRun:
  """Runs in a fresh process: the tutorial's loop and its forked DataLoader workers never see JAX."""
  from benchmarks.torch_tutorial import train_torch
  start = time.perf_counter()
  result = train_torch(config, data_root, state_dict=state_dict, log=functools.partial(_log_stderr, prefix),
                       num_threads=num_threads)
  wall = time.perf_counter() - start
  return FrameworkRun('torch', [dict(row) for row in result.history], {}, float(result.best_val_acc),
                      int(result.best_epoch), wall,
                      {'device': result.device, 'threads': result.num_threads,
                       'start_method': result.start_method, 'matmul_gflops': torch_matmul_gflops()})


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """The fastest of `repeats` calls after a warm-up: a busy machine only ever adds time."""
  fn()   # warm-up (compilation, allocation)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def jax_matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """GFLOP/s of one jitted float32 (n, n) @ (n, n) on JAX's default device: the machine's matmul rate."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  return 2 * n**3 / _best_seconds(lambda: matmul(a, b).block_until_ready(), repeats) / 1e9


def torch_matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """The same float32 matmul in torch (its current thread setting): torch's side of the machine's rate."""
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def jaxpr_flops(jaxpr) -> float:
  """FLOPs (2 per multiply-add) of the convolutions and matmuls of `jaxpr`, sub-jaxprs included.

  Elementwise work (BatchNorm, ReLU, pooling, the optimizer) is not counted: it is a few percent
  of a CNN's FLOPs and does not run at the matmul rate anyway. A `cond` (e.g. fast_conv's
  lax.platform_dependent) counts its costliest branch, a `scan` its body times its length.
  """
  import math
  from jax.extend import core as jax_core
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec   # (out features, in features, *spatial)
      per_output = rhs.shape[rhs_spec[1]] * math.prod(rhs.shape[d] for d in rhs_spec[2:])
      # An input gradient of a strided conv dilates its input with zeros: only 1 in prod(lhs_dilation)
      # of the products is work (those are the forward's products again).
      zeros = math.prod(eqn.params['lhs_dilation'] or (1,))
      total += 2.0 * math.prod(out.shape) * per_output / zeros
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
      total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
    elif name == 'cond':
      total += max(jaxpr_flops(branch.jaxpr) for branch in eqn.params['branches'])
    elif name == 'scan':
      total += eqn.params['length'] * jaxpr_flops(eqn.params['jaxpr'].jaxpr)
    else:
      total += sum(jaxpr_flops(sub) for sub in jax_core.jaxprs_in_params(eqn.params))
  return total


def epoch_flops(config: TutorialRecipe, sizes: dict[str, int], num_classes: int = 2, image_size: int = 224) -> dict:
  """FLOPs of one epoch of `config`'s strategy, counted from the model's jaxprs.

  train: the train step (train-mode forward, and the backward the strategy needs: `fc` alone when
  frozen; every input and weight gradient but the image's when fine-tuning) per image, times the
  train images; val: the eval forward per image, times the val images. The same work as torch's
  loop, whose frozen backbone has requires_grad off and whose image needs no gradient.
  Counted on the model with XLA's own gradients (fast_conv's CPU rewrites regroup the same
  products, and their jaxpr holds forward convolutions that XLA removes as dead code).
  """
  import jax
  import numpy as np
  from tl_jax import optim
  from tl_jax.models import create_model
  from tl_jax.training import create_train_state, eval_step, train_step
  model = create_model(config.arch, num_classes, fast_backward=False)
  batch = config.batch_size
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), np.float32)
  example = {'images': images, 'labels': jax.ShapeDtypeStruct((batch,), np.int32),
             'mask': jax.ShapeDtypeStruct((batch,), np.bool_)}
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  tx = optim.make_optimizer(variables['params'], config.strategy, {'name': 'sgd', 'momentum': config.momentum},
                            config.lr)
  state = jax.eval_shape(lambda v: create_train_state(model, v, tx), variables)
  trainable = optim.trainable_mask(state.params, config.strategy)
  train = functools.partial(train_step, model=model, trainable=trainable, bn_train=config.bn == 'train')
  train_per_image = jaxpr_flops(jax.make_jaxpr(train)(state, example).jaxpr) / batch
  val_per_image = jaxpr_flops(jax.make_jaxpr(functools.partial(eval_step, model=model))(state, example).jaxpr) / batch
  flops = {'train_per_image': train_per_image, 'val_per_image': val_per_image,
           'train': train_per_image * sizes['train'], 'val': val_per_image * sizes['val']}
  flops['epoch'] = flops['train'] + flops['val']
  return flops


def run_torch(config: TutorialRecipe, data_root: str | Path, state_dict=None, num_threads: Optional[int] = None,
              prefix: str = '[torch]') -> FrameworkRun:
  """The tutorial's PyTorch loop (`benchmarks.torch_tutorial`) in a spawned child process.

  A child because JAX, once imported here, runs threads, and the tutorial's DataLoader workers
  are fork()ed: forking a process with JAX's threads can deadlock. The child imports no JAX, and
  its progress lines go straight to stderr. Its DataLoader forks its workers as the tutorial's
  does on Linux, although the child itself was spawned (torch_tutorial.worker_context).
  """
  return in_torch_child(_torch_child, config, str(data_root), state_dict, num_threads, prefix)


def in_torch_child(fn: Callable, *args) -> Any:
  """fn(*args) in a fresh process started by `spawn`, as the torch reference runs (see run_torch)."""
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
    return pool.submit(fn, *args).result()


def steady_state_epochs(num_epochs: int) -> list[int]:
  """0-based indices of the epochs averaged for the steady state: all but the first when K >= 2."""
  return list(range(1, num_epochs)) if num_epochs >= 2 else list(range(num_epochs))


def _mean(values: Sequence[float]) -> float:
  return sum(values) / len(values) if values else float('nan')


def summarize(runs: dict[str, FrameworkRun], sizes: dict[str, int]) -> dict:
  """Steady-state means per framework, the tl_jax / torch ratios and tl_jax's data-wait fraction."""
  summary: dict[str, Any] = {}
  for name, run in runs.items():
    rows = [run.history[i] for i in steady_state_epochs(len(run.history))]
    train_s = _mean([r['train_seconds'] for r in rows])
    val_s = _mean([r['val_seconds'] for r in rows])
    wait = sum(r.get('data_wait_seconds', float('nan')) for r in rows)
    summary[name] = {
        'epochs': [r['epoch'] for r in rows],
        'train_seconds': train_s, 'val_seconds': val_s, 'seconds': _mean([r['seconds'] for r in rows]),
        'train_images_per_second': sizes['train'] / train_s, 'val_images_per_second': sizes['val'] / val_s,
        'data_wait_fraction': wait / sum(r['train_seconds'] for r in rows) if rows else float('nan'),
    }
  if set(FRAMEWORKS) <= set(summary):
    ours, theirs = summary['tl_jax'], summary['torch']
    summary['ratio_tl_jax_over_torch'] = {k: ours[k] / theirs[k] for k in ('train_seconds', 'val_seconds', 'seconds')}
  return summary


def environment(torch_threads: Optional[int], workers: int) -> dict:
  """Devices, versions and thread counts of both frameworks (imports only what is installed)."""
  import jax
  env: dict[str, Any] = {
      'python': platform.python_version(), 'machine': platform.machine(), 'cpu_model': cpu_model(),
      'cpu_count': os.cpu_count(),
      'cpus_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
      'jax': jax.__version__, 'jax_devices': [str(d) for d in jax.devices()],
      'jax_backend': jax.default_backend(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'tl_jax_loader_workers': workers,
  }
  try:
    import flax
    env['flax'] = flax.__version__
  except ImportError:
    pass
  try:
    import torch
    import torchvision
  except ImportError:
    return env
  env.update({
      'torch': torch.__version__, 'torchvision': torchvision.__version__,
      'torch_device': 'cuda:0' if torch.cuda.is_available() else 'cpu',
      # What the torch child is told to use (run_torch passes it on); this process runs no torch.
      'torch_threads': torch_threads or os.cpu_count() or 1,
      'torch_interop_threads': torch.get_num_interop_threads(),
      'torch_dataloader_workers': workers,
  })
  if torch.cuda.is_available():
    env['torch_device_name'] = torch.cuda.get_device_name(0)
  return env


def cpu_model() -> str:
  """The processor's name as the OS reports it (Linux), else platform.processor()."""
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.lower().startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def dataset_sizes(data_root: str | Path) -> dict[str, int]:
  """Images per split as ImageFolder counts them (non-image files such as .gif are not counted),
  and the number of classes."""
  from tl_jax.data.folder import ImageFolder
  folders = {split: ImageFolder(Path(data_root) / split) for split in ('train', 'val')}
  return {**{split: len(folder) for split, folder in folders.items()}, 'classes': len(folders['train'].classes)}


def case_name(strategy: str, bn: str) -> str:
  """A report key: the strategy, with its BatchNorm policy when that is not the tutorial's."""
  return strategy if bn == 'train' else f'{strategy}/bn={bn}'


def run_benchmark(data_root: str | Path, *, strategies: Sequence[str] = ('frozen', 'finetune'), epochs: int = 2,
                  bn_policies: Sequence[str] = ('train',), weights: str = 'random', torch_threads: Optional[int] = None, workers: Optional[int] = None,
                  run_jax: bool = True, run_reference: bool = True, seed: int = 0, cache_features: bool = True,
                  log: Callable[[str], None] = print) -> dict:
  """Trains each strategy for `epochs` epochs with tl_jax and with the torch tutorial; returns the report.

  Args:
    data_root: hymenoptera_data-like folder with train/ and val/.
    strategies: any of 'frozen', 'finetune'.
    bn_policies: any of 'train' (the tutorial's model.train()) and 'frozen' (eval-mode BN while
      training); every strategy runs with each.
    epochs: K; the steady state averages epochs 2..K (1-based) when K >= 2.
    weights: 'random' (speed does not depend on the values), 'imagenet' or a state-dict path;
      both frameworks start from the same weights.
    torch_threads: torch.set_num_threads; default os.cpu_count().
    workers: loader workers for both (tl_jax threads, DataLoader processes); default TutorialRecipe's.
    run_jax / run_reference: which frameworks to run.
    cache_features: tl_jax's cached backbone features where valid (bn: frozen; tl_jax.feature_cache).
    seed: TutorialRecipe.seed for both.
    log: receives tl_jax's progress lines and the report's own (the torch child prints to stderr).

  Returns:
    A JSON-able dict: environment, dataset_sizes, epochs, strategies -> {runs, summary}.
  """
  if not (run_jax or run_reference):
    raise ValueError('nothing to run: both tl_jax and torch are skipped')
  workers = TutorialRecipe.workers if workers is None else workers
  base = TutorialRecipe(data=str(data_root), weights=weights, epochs=epochs, workers=workers, seed=seed,
                        cache_features=cache_features)
  sizes = dataset_sizes(data_root)
  env = environment(torch_threads, workers)
  # The machine's matmul rate, measured in this run; torch's is measured in each torch child.
  env['jax_matmul_gflops'] = jax_matmul_gflops() if run_jax else float('nan')
  state_dict = None
  if run_reference and weights != 'random':
    from tl_jax.weights import resolve_weights
    state_dict = resolve_weights(weights, base.arch, progress=False).state_dict
  report: dict[str, Any] = {'environment': env, 'dataset_sizes': sizes, 'epochs': epochs, 'weights': weights,
                            'config': base.to_dict(), 'strategies': {}}
  for strategy in strategies:
    for bn in bn_policies:
      name = case_name(strategy, bn)
      config = dataclasses.replace(base, strategy=strategy, bn=bn)
      config.to_config()   # validates
      runs: dict[str, FrameworkRun] = {}
      if run_jax:
        log(f'== {name}: tl_jax, {epochs} epoch(s)')
        runs['tl_jax'] = run_tl_jax(config, log=_prefixed(log, f'  [tl_jax {name}]'))
      if run_reference:
        log(f'== {name}: torch, {epochs} epoch(s)')
        runs['torch'] = run_torch(config, data_root, state_dict, num_threads=env.get('torch_threads'),
                                  prefix=f'  [torch {name}]')
      report['strategies'][name] = {
          'strategy': strategy, 'bn': bn,
          'runs': {framework: run.to_dict() for framework, run in runs.items()},
          'summary': summarize(runs, sizes),
          'flops': epoch_flops(config, sizes, sizes['classes']),
      }
  return report


def _epoch_span(indices: Sequence[int]) -> str:
  """0-based indices as 1-based epoch numbers: 'epoch 2' or 'epochs 2-5'."""
  if not indices:
    return 'no epochs'
  first, last = indices[0] + 1, indices[-1] + 1
  return f'epoch {first}' if first == last else f'epochs {first}-{last}'


def _fmt(value: float, digits: int = 2) -> str:
  return 'n/a' if value != value else f'{value:.{digits}f}'


def format_report(report: dict) -> str:
  """The report as text: environment, then per strategy the epoch table and the summary lines."""
  env, sizes, cfg = report['environment'], report['dataset_sizes'], report['config']
  lines = [
      f"machine: {env.get('cpu_model', '?')}, {env['cpus_usable']} usable CPU(s), {env['machine']}",
      f"device: jax {env['jax_devices']} ({env['jax_backend']}); torch {env.get('torch_device', 'not installed')}"
      + (f" ({env['torch_device_name']})" if 'torch_device_name' in env else ''),
      f"versions: jax {env['jax']}, flax {env.get('flax', '?')}, torch {env.get('torch', '-')}, "
      f"torchvision {env.get('torchvision', '-')}, python {env['python']}",
      f"threads: {env['cpus_usable']} usable CPUs (os.cpu_count {env['cpu_count']}); "
      f"torch intra-op {env.get('torch_threads', '-')}, inter-op {env.get('torch_interop_threads', '-')}; "
      f"XLA CPU uses its own pool (XLA_FLAGS={env['xla_flags'] or 'unset'}); "
      f"loader workers: tl_jax {env['tl_jax_loader_workers']} threads, "
      f"torch DataLoader {env.get('torch_dataloader_workers', '-')} processes "
      f"(started by {torch_start_method(report)})",
      f"data: {sizes['train']} train / {sizes['val']} val images; weights {report['weights']}; "
      f"train batch {cfg['batch_size']} (both); val batch tl_jax {cfg['eval_batch_size']}, "
      f"torch {cfg['batch_size']} (the tutorial's)",
      'epoch numbers below are 1-based; seconds exclude tl_jax compilation; '
      'data wait = share of train seconds the step starved for data '
      '(tl_jax: waiting with no step running; torch: blocked in the DataLoader)',
  ]
  header = (f"{'epoch':>5}  {'framework':<9}  {'train s':>8}  {'val s':>7}  {'total s':>8}  "
            f"{'train img/s':>11}  {'val img/s':>9}  {'data wait':>9}")
  for strategy, entry in report['strategies'].items():
    runs, summary = entry['runs'], entry['summary']
    lines += ['', f"{strategy}, {report['epochs']} epoch(s)", header, '-' * len(header)]
    num_epochs = max(len(run['history']) for run in runs.values())
    for i in range(num_epochs):
      for name in FRAMEWORKS:
        if name not in runs or i >= len(runs[name]['history']):
          continue
        row = runs[name]['history'][i]
        wait = row.get('data_wait_seconds', float('nan')) / row['train_seconds']
        lines.append(f"{i + 1:>5}  {name:<9}  {row['train_seconds']:>8.2f}  {row['val_seconds']:>7.2f}  "
                     f"{row['seconds']:>8.2f}  {sizes['train'] / row['train_seconds']:>11.1f}  "
                     f"{sizes['val'] / row['val_seconds']:>9.1f}  {_fmt(100 * wait, 1):>8}%")
    if 'tl_jax' in runs:
      compile_seconds = runs['tl_jax']['compile_seconds']
      parts = ', '.join(f'{k} {v:.2f} s' for k, v in compile_seconds.items())
      lines.append(f"tl_jax compile (not in the epoch seconds): {parts} (total {sum(compile_seconds.values()):.2f} s)")
      features = sum(row.get('feature_seconds', 0.0) for row in runs['tl_jax']['history'])
      if features:
        lines.append(f'tl_jax cached backbone features, computed once (not in the epoch seconds): {features:.2f} s')
    for name in FRAMEWORKS:
      if name in summary:
        s = summary[name]
        lines.append(f"{name} steady state ({_epoch_span(s['epochs'])}): {s['seconds']:.2f} s/epoch "
                     f"(train {s['train_seconds']:.2f} s = {s['train_images_per_second']:.1f} img/s, "
                     f"val {s['val_seconds']:.2f} s = {s['val_images_per_second']:.1f} img/s), "
                     f"wall for the whole run {runs[name]['wall_seconds']:.1f} s")
    if 'ratio_tl_jax_over_torch' in summary:
      r = summary['ratio_tl_jax_over_torch']
      note = '' if report['epochs'] >= 2 else ' (only 1 epoch: includes warm-up)'
      lines.append(f"ratio tl_jax/torch per epoch, {_epoch_span(summary['tl_jax']['epochs'])}{note}: "
                   f"total {r['seconds']:.2f}, train {r['train_seconds']:.2f}, val {r['val_seconds']:.2f} "
                   f"(< 1: tl_jax faster)")
    if 'tl_jax' in summary:
      lines.append(f"tl_jax data-wait fraction ({_epoch_span(summary['tl_jax']['epochs'])}): "
                   f"{_fmt(100 * summary['tl_jax']['data_wait_fraction'], 1)}% of train seconds")
    if 'flops' in entry:
      lines += flops_lines(entry, matmul_rates(report))
  lines += [''] + summary_table(report)
  return '\n'.join(lines)


def torch_start_method(report: dict) -> str:
  """How the torch children's DataLoaders started their workers ('fork', ...), as they reported it."""
  methods = {entry['runs']['torch']['info'].get('start_method', '?')
             for entry in report['strategies'].values() if 'torch' in entry['runs']}
  return ', '.join(sorted(methods)) or 'no torch run'


def matmul_rates(report: dict) -> dict[str, float]:
  """GFLOP/s of a 2048^2 float32 matmul: JAX's (measured once) and torch's (best of its children)."""
  rates = {'tl_jax': report['environment'].get('jax_matmul_gflops', float('nan'))}
  torch_rates = [entry['runs']['torch']['info'].get('matmul_gflops', float('nan'))
                 for entry in report['strategies'].values() if 'torch' in entry['runs']]
  if torch_rates:
    rates['torch'] = max(torch_rates)
  return rates


def flops_lines(entry: dict, rates: dict[str, float]) -> list[str]:
  """An epoch's FLOPs, each framework's achieved rate, and the epoch's floor at the matmul rate."""
  flops, summary = entry['flops'], entry['summary']
  lines = [f"FLOPs per epoch (convolutions and matmuls, counted from the model): {flops['epoch'] / 1e12:.3f} T "
           f"= train {flops['train'] / 1e12:.3f} T ({flops['train_per_image'] / 1e9:.2f} G/img) "
           f"+ val {flops['val'] / 1e12:.3f} T ({flops['val_per_image'] / 1e9:.2f} G/img)"]
  rate_text = ', '.join(f'{name} {_fmt(rate, 1)}' for name, rate in rates.items())
  best = max((r for r in rates.values() if r == r), default=float('nan'))
  floor = flops['epoch'] / (best * 1e9)
  lines.append(f"matmul rate (2048^2 float32, this run): {rate_text} GFLOP/s; "
               f"the epoch's floor at {_fmt(best, 1)} GFLOP/s: {_fmt(floor)} s")
  for name in FRAMEWORKS:
    if name in summary:
      s = summary[name]
      lines.append(f"{name} achieved ({_epoch_span(s['epochs'])}): epoch {flops['epoch'] / s['seconds'] / 1e9:.1f} "
                   f"GFLOP/s (train {flops['train'] / s['train_seconds'] / 1e9:.1f}, "
                   f"val {flops['val'] / s['val_seconds'] / 1e9:.1f}), {s['seconds'] / floor:.2f}x the floor")
  return lines


def summary_table(report: dict) -> list[str]:
  """One line per case: steady-state seconds per epoch of both frameworks, their ratio, compile, data wait."""
  header = (f"{'strategy':<10} {'bn':<7} {'tl_jax s/epoch':>14} {'torch s/epoch':>13} {'tl_jax/torch':>12} "
            f"{'compile s':>9} {'features s':>10} {'data wait':>9}")
  lines = ['summary (steady state)', header, '-' * len(header)]
  for entry in report['strategies'].values():
    summary, runs = entry['summary'], entry['runs']
    ours, theirs = summary.get('tl_jax', {}), summary.get('torch', {})
    ratio = summary.get('ratio_tl_jax_over_torch', {}).get('seconds', float('nan'))
    compile_s = sum(runs['tl_jax']['compile_seconds'].values()) if 'tl_jax' in runs else float('nan')
    features_s = (sum(row.get('feature_seconds', 0.0) for row in runs['tl_jax']['history'])
                  if 'tl_jax' in runs else float('nan'))
    lines.append(f"{entry.get('strategy', '?'):<10} {entry.get('bn', 'train'):<7} "
                 f"{_fmt(ours.get('seconds', float('nan'))):>14} {_fmt(theirs.get('seconds', float('nan'))):>13} "
                 f"{_fmt(ratio):>12} {_fmt(compile_s, 1):>9} {_fmt(features_s, 1):>10} "
                 f"{_fmt(100 * ours.get('data_wait_fraction', float('nan')), 1):>8}%")
  return lines
