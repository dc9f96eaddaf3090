"""Time of the jitted train step alone: per step with peak memory, and images/s per device count."""

from __future__ import annotations

import functools
import resource
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tl_jax import optim, parallel
from tl_jax.models import aux_loss_weights, create_model, family_of, init_variables
from tl_jax.training import create_train_state, train_step


def step_time_and_memory(arch: str = 'vgg16', batch_size: int = 32, strategy: str = 'finetune',
                         image_size: int = 224, steps: int = 3, num_classes: int = 4) -> dict:
  """Seconds per jitted train step (state donated) and this process's peak RSS, for one arch and batch.

  Peak RSS covers everything this process allocated (params, optimizer state, activations and the
  compiler), which on CPU is the memory a run of this shape needs.
  """
  model = create_model(arch, num_classes)
  variables = init_variables(model, jax.random.PRNGKey(0))
  tx = optim.make_optimizer(variables['params'], strategy, {'name': 'sgd', 'momentum': 0.9}, 0.001)
  state = create_train_state(model, variables, tx, jax.random.PRNGKey(1))
  del variables
  step = jax.jit(functools.partial(train_step, model=model, bn_train=True, aux_weights=aux_loss_weights(model),
                                   trainable=optim.trainable_mask(state.params, strategy)), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch = {'images': rng.standard_normal((batch_size, image_size, image_size, 3)).astype(np.float32),
           'labels': rng.integers(0, num_classes, batch_size).astype(np.int32), 'mask': np.ones(batch_size, bool)}
  start = time.perf_counter()
  step = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  times = []
  for _ in range(steps + 1):   # the first step warms up
    start = time.perf_counter()
    state, sums = step(state, batch)
    jax.block_until_ready(sums)
    times.append(time.perf_counter() - start)
  return {'arch': arch, 'batch_size': batch_size, 'strategy': strategy, 'image_size': image_size,
          'compile_seconds': compile_seconds, 'step_seconds': sorted(times[1:])[len(times[1:]) // 2],
          'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def torch_step_time_and_memory(arch: str = 'vgg16', batch_size: int = 32, strategy: str = 'finetune',
                               image_size: int = 224, steps: int = 3, num_classes: int = 4) -> dict:
  """The same for torchvision's model in torch: model.train(), SGD(momentum 0.9) on what requires
  grad (the head alone when frozen), cross-entropy, plus the auxiliary losses of Inception v3 and
  GoogLeNet as their recipes weight them."""
  import torch
  import torchvision
  torch.manual_seed(0)
  model = torchvision.models.get_model(arch, num_classes=num_classes).train()
  if strategy == 'frozen':
    head = family_of(arch).head_torch
    for name, param in model.named_parameters():
      param.requires_grad = name.startswith(head + '.')
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
  aux_weights = family_of(arch).aux_loss_weights(arch)
  images = torch.randn(batch_size, 3, image_size, image_size)
  labels = torch.randint(0, num_classes, (batch_size,))

  def step():
    optimizer.zero_grad()
    outputs = model(images)
    if aux_weights:   # InceptionOutputs(logits, aux) / GoogLeNetOutputs(logits, aux2, aux1)
      main, *aux = outputs
      loss = torch.nn.functional.cross_entropy(main, labels) + sum(
          w * torch.nn.functional.cross_entropy(a, labels) for w, a in zip(aux_weights, aux))
    else:
      loss = torch.nn.functional.cross_entropy(outputs, labels)
    loss.backward()
    optimizer.step()

  times = []
  for _ in range(steps + 1):   # the first step warms up
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {'arch': arch, 'batch_size': batch_size, 'strategy': strategy, 'image_size': image_size,
          'step_seconds': sorted(times[1:])[len(times[1:]) // 2], 'threads': torch.get_num_threads(),
          'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def time_train_step(arch: str = 'resnet18', batch_size: int = 256, dtype: str = 'float32',
                    image_size: int = 224, strategy: str = 'finetune', steps: int = 20, rounds: int = 3,
                    device_counts: Sequence[int] = (None,), num_classes: int = 2) -> list[dict]:
  """Images/s of the train step alone (batch already on the devices), per device count, interleaved.

  For each count in `device_counts` (None: every device) the step is compiled once; then
  `rounds` times, each configuration runs `steps` steps in turn, so a machine whose load
  changes affects all alike. Returns one row per configuration with the best and median round.
  """

  model = create_model(arch, num_classes, dtype=jnp.bfloat16 if dtype == 'bfloat16' else None)
  variables = init_variables(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {'images': rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32),
           'labels': rng.integers(0, num_classes, batch_size).astype(np.int32),
           'mask': np.ones(batch_size, bool)}
  configs = []
  for count in device_counts:
    mesh = parallel.make_mesh(count)
    parallel.check_batch_size(batch_size, mesh.size, 'batch size')
    tx = optim.make_optimizer(variables['params'], strategy, {'name': 'sgd', 'momentum': 0.9}, 1e-3)
    state = parallel.replicate(create_train_state(model, variables, tx), mesh)
    step = parallel.jit_train_step(train_step, mesh, model=model, trainable=optim.trainable_mask(variables['params'], strategy),
                          bn_train=True)
    device_batch = parallel.shard_batch(batch, mesh)
    start = time.perf_counter()
    state, sums = step(state, device_batch)
    jax.block_until_ready(sums)
    configs.append({'devices': mesh.size, 'mesh': mesh, 'step': step, 'state': state, 'batch': device_batch,
                    'compile_seconds': time.perf_counter() - start, 'rounds': []})
  for _ in range(rounds):
    for config in configs:
      state = config['state']
      start = time.perf_counter()
      for _ in range(steps):
        state, sums = config['step'](state, config['batch'])
      jax.block_until_ready((state, sums))
      config['rounds'].append(batch_size * steps / (time.perf_counter() - start))
      config['state'] = state
  return [{'arch': arch, 'dtype': dtype, 'batch_size': batch_size, 'image_size': image_size, 'strategy': strategy,
           'devices': c['devices'], 'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind,
           'steps_per_round': steps, 'compile_seconds': c['compile_seconds'],
           'images_per_second_best': max(c['rounds']), 'images_per_second_median': float(np.median(c['rounds'])),
           'images_per_second_rounds': c['rounds']} for c in configs]
