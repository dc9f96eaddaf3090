"""One process of the data-parallel tests: `python parallel_worker.py MODE OUT.npz [options]`.

Device counts (`--devices`) must be set before JAX starts, so each configuration is a process.
Modes:
  steps   5 train steps of every strategy x BN policy, unsharded (`--devices 1`) or over a mesh.
  multi   the same global batches fed by this process's rows only (`--coordinator ...`), then an
          orbax save and restore of the replicated state and one more step from it.
  die     join a 2-process run, then process 1 exits abruptly while process 0 keeps stepping.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# 64 px: layer4's BatchNorm then averages 2x2 positions per image; at 32 px (1x1) train-mode BN
# over 4 values amplifies rounding tenfold per step.
ARCH, NUM_CLASSES, SIZE, GLOBAL_BATCH, NUM_SAMPLES, LR = 'resnet18', 3, 64, 4, 19, 0.001
# finetune with train-mode BN last: the multi-process run and the checkpoint continue from it.
CONFIGS = [('frozen', 'train'), ('frozen', 'frozen'), ('finetune', 'frozen'), ('finetune', 'train')]


def parse():
  parser = argparse.ArgumentParser()
  parser.add_argument('mode', choices=('steps', 'multi', 'die'))
  parser.add_argument('out')
  parser.add_argument('--devices', type=int, default=1)
  parser.add_argument('--mesh', action='store_true', help='steps: shard over a mesh even with 1 device')
  parser.add_argument('--coordinator')
  parser.add_argument('--num-processes', type=int)
  parser.add_argument('--process-id', type=int)
  parser.add_argument('--ckpt')
  return parser.parse_args()


def main():
  args = parse()
  # No --xla_backend_optimization_level=0 here: with XLA's Eigen convolutions (tl_jax.xla_defaults)
  # float64 convolutions run as XLA's own emitted loops, which unoptimised made a float64
  # finetune step 10x slower (23 s against 2.3 s on 2 cores) and the test's workers time out.
  import jax
  jax.config.update('jax_num_cpu_devices', args.devices)
  jax.config.update('jax_enable_x64', True)
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from tl_jax import parallel
  joined = parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                           timeout_s=30, heartbeat_timeout_s=5)
  if args.mode == 'die':
    return die(args)
  import numpy as np
  configs = CONFIGS if args.mode == 'steps' else [('finetune', 'train')]
  results = run_steps(args, parallel, configs, use_mesh=args.mesh or joined or args.devices > 1)
  if args.ckpt:
    results.update(save_restore(args, parallel))
  if jax.process_index() == 0 or args.mode == 'steps':
    np.savez(args.out, **results)
  else:
    np.savez(args.out, **{k: v for k, v in results.items() if k.startswith('restored')})
  return 0


_STATE = {}


def setup(strategy):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from tl_jax import optim
  from tl_jax.models import create_model, init_variables
  from tl_jax.training import create_train_state
  model = create_model(ARCH, NUM_CLASSES)
  variables = init_variables(model, jax.random.PRNGKey(0), image_size=SIZE)
  rng = np.random.default_rng(3)
  # Non-trivial running statistics, so eval-mode BN is not the identity.
  stats = variables['batch_stats']
  variables['batch_stats'] = jax.tree_util.tree_map_with_path(
      lambda path, x: rng.uniform(-0.2, 0.2, x.shape) if 'mean' in jax.tree_util.keystr(path)
      else rng.uniform(0.5, 1.5, x.shape), stats)
  variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), variables)
  tx = optim.make_optimizer(variables['params'], strategy, {'name': 'sgd', 'momentum': 0.9}, LR)
  state = create_train_state(model, variables, tx)
  images = rng.standard_normal((NUM_SAMPLES, SIZE, SIZE, 3))
  labels = rng.integers(0, NUM_CLASSES, NUM_SAMPLES).astype(np.int32)
  order = rng.permutation(NUM_SAMPLES)
  del jnp
  return model, state, images, labels, order


def local_batches(images, labels, order, parallel):
  """This process's rows of each global batch, padding rows masked (and filled with junk)."""
  import numpy as np
  for positions in parallel.process_positions(NUM_SAMPLES, GLOBAL_BATCH):
    indices = parallel.host_local_order(order, positions)
    valid = indices >= 0
    yield {'images': np.where(valid[:, None, None, None], images[np.maximum(indices, 0)], 7.0),
           'labels': np.where(valid, labels[np.maximum(indices, 0)], 0).astype(np.int32),
           'mask': valid}


def run_steps(args, parallel, configs, use_mesh):
  import jax
  import numpy as np
  from tl_jax import optim
  from tl_jax.training import eval_step, train_step
  results = {}
  mesh = parallel.make_mesh() if use_mesh else None
  for strategy, bn in configs:
    model, state, images, labels, order = setup(strategy)
    trainable = optim.trainable_mask(state.params, strategy)
    kwargs = dict(model=model, trainable=trainable, bn_train=bn == 'train')
    if mesh is None:
      import functools
      step = jax.jit(functools.partial(train_step, **kwargs), donate_argnums=0)
      evaluate = jax.jit(functools.partial(eval_step, model=model))
      feed = lambda b: b  # noqa: E731
    else:
      step = parallel.jit_train_step(train_step, mesh, **kwargs)
      evaluate = parallel.jit_eval_step(eval_step, mesh, model=model)
      state = parallel.replicate(state, mesh)
      feed = lambda b: parallel.shard_batch(b, mesh)  # noqa: E731
    losses, counts = [], []
    for batch in local_batches(images, labels, order, parallel):
      state, sums = step(state, feed(batch))
      host = parallel.host_sums(sums)
      losses.append(host['loss_sum'] / host['count'])
      counts.append(host['count'])
    name = f'{strategy}_{bn}'
    eval_sums, predictions = {}, []
    # Eval compiles once per process: only after the config that moves every tensor.
    for batch in (local_batches(images, labels, order, parallel) if name == 'finetune_train' else ()):
      out = evaluate(state, feed(batch))
      for k, v in parallel.host_sums(out).items():
        eval_sums[k] = eval_sums.get(k, 0.0) + v
      predictions.append(parallel.gather_rows(out['predictions']))
    results[f'{name}_losses'] = np.asarray(losses)
    results[f'{name}_counts'] = np.asarray(counts)
    results[f'{name}_train_compiles'] = np.asarray(step._cache_size())
    if predictions:
      results['eval'] = np.asarray([eval_sums['loss_sum'], eval_sums['correct'], eval_sums['count']])
      results['predictions'] = np.concatenate(predictions)
      results['eval_compiles'] = np.asarray(evaluate._cache_size())
    leaves = jax.tree_util.tree_leaves_with_path({'params': state.params, 'batch_stats': state.batch_stats})
    for path, leaf in leaves:
      # Every tensor's sum and up to 512 evenly strided entries: full float64 copies of four
      # ResNet-18s would be 90 MB each.
      values = np.asarray(leaf.addressable_data(0)).reshape(-1)
      picked = values[::max(values.size // 512, 1)]
      results[f'{name}/' + jax.tree_util.keystr(path)] = np.concatenate([picked, [values.sum()]])
    _STATE['last'] = (state, step, feed, images, labels, order, mesh)
  return results


def save_restore(args, parallel):
  """Both processes save the replicated state, restore it onto the mesh, and step once from it."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  state, step, feed, images, labels, order, mesh = _STATE['last']
  tree = {'params': state.params, 'batch_stats': state.batch_stats, 'opt_state': state.opt_state,
          'step': state.step}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(Path(args.ckpt) / 'state', tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(Path(args.ckpt) / 'state', abstract)
  same = all(np.array_equal(a.addressable_data(0), b.addressable_data(0)) and a.sharding == b.sharding
             for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(restored)))
  batch = next(iter(local_batches(images, labels, order, parallel)))
  resumed = state.replace(**restored)
  _, sums = step(resumed, feed(batch))
  host = parallel.host_sums(sums)
  return {'restored_equal': np.asarray(same), 'restored_next_loss': np.asarray(host['loss_sum'] / host['count']),
          'restored_compiles': np.asarray(step._cache_size())}


def die(args):
  import jax
  import jax.numpy as jnp
  from tl_jax import parallel
  mesh = parallel.make_mesh()
  total = jax.jit(lambda x: jnp.sum(x), in_shardings=parallel.batch_sharded(mesh),
                  out_shardings=parallel.replicated(mesh))
  local = jnp.ones((2,), jnp.float32)
  float(total(parallel.shard_batch({'x': local}, mesh)['x']).addressable_data(0))
  print('both joined', flush=True)
  if args.process_id == 1:
    time.sleep(1)
    os._exit(17)
  start = time.monotonic()
  while time.monotonic() - start < 120:
    float(total(parallel.shard_batch({'x': local}, mesh)['x']).addressable_data(0))
    time.sleep(0.1)
  print('still running after 120 s', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
