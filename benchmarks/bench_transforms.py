"""Speed of the input pipeline: tl_jax's transforms against torchvision's on the same files.

Prints, for the material's full augmentation list and the tutorial's training list:
  - milliseconds per image in one thread (decoded RGB images in memory, pipeline only), ours and
    torchvision's alternated round by round in this process so both see the same machine load;
  - per-op milliseconds of the full list (--per-op);
  - images/s through tl_jax.data.loader.Loader (decode + transform + batching) with --workers
    threads at --batch-size, both frameworks' transforms in the same Loader;
  - with --train-epochs N: a short training run of a random-init ResNet-18 with the full list and
    the data-wait share of train time that train.py reports (the issue's 5 % bound).

Usage: python benchmarks/bench_transforms.py [--data data/hymenoptera_data] [--rounds 5] [--per-op]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ is not installed

from benchmarks.loader import MATERIAL_TRAIN as FULL_TRAIN, MATERIAL_VAL as FULL_VAL  # noqa: E402
from tl_jax.data import augment  # noqa: E402
from tl_jax.data.folder import ImageFolder, load_image  # noqa: E402
from tl_jax.data.loader import Loader  # noqa: E402
from tl_jax.weights import Preprocessing  # noqa: E402


def torchvision_compose(spec):
  """torchvision's Compose of the same spec, as an (image, rng) -> float32 HWC transform."""
  import torch
  from torchvision import transforms as tvt

  def build(name, kwargs):
    kwargs = dict(kwargs)
    if 'interpolation' in kwargs:
      kwargs['interpolation'] = tvt.InterpolationMode(kwargs['interpolation'])
    return getattr(tvt, name)(**kwargs)

  compose = tvt.Compose([build(*next(iter(entry.items()))) for entry in spec])

  def transform(img, rng=None):
    if rng is not None:  # reproducible per sample, as our rng is
      torch.manual_seed(int(rng.integers(0, 2**31)))
    return compose(img).permute(1, 2, 0).numpy()

  return transform, compose


def per_image_ms(transform, images, rng_seed=0) -> float:
  rng = np.random.default_rng(rng_seed)
  start = time.perf_counter()
  for img in images:
    transform(img, rng)
  return 1000 * (time.perf_counter() - start) / len(images)


def single_thread(specs: dict, images, rounds: int) -> None:
  print(f'\none thread, {len(images)} decoded images, median of {rounds} alternating rounds (ms per image)')
  for label, spec in specs.items():
    ours = augment.build_pipeline(spec)
    theirs, _ = torchvision_compose(spec)
    times = {'tl_jax': [], 'torchvision': []}
    for _ in range(rounds):
      times['tl_jax'].append(per_image_ms(ours, images))
      times['torchvision'].append(per_image_ms(theirs, images))
    a, b = statistics.median(times['tl_jax']), statistics.median(times['torchvision'])
    print(f'  {label:<10} tl_jax {a:6.2f} ms ({1000 / a:6.0f} img/s)   torchvision {b:6.2f} ms '
          f'({1000 / b:6.0f} img/s)   ratio {a / b:4.2f}')


def per_op(spec, images, rounds: int) -> None:
  """Each PIL op on the previous ops' output; ours with our draws, torchvision's class with torch's."""
  pipeline = augment.build_pipeline(spec)
  _, compose = torchvision_compose(spec)
  print(f'\nper op of the full list (ms per image, median of {rounds} rounds; torchvision class, torch draws)')
  rng = np.random.default_rng(0)
  for position, (op, tv_op) in enumerate(zip(pipeline.ops, compose.transforms)):
    if op.stage != 'pil':
      continue
    inputs = []
    for img in images:
      params = pipeline.sample(rng, img.width, img.height)
      for previous, p in zip(pipeline.ops[:position], params[:position]):
        img = previous.apply(img, p)
      inputs.append((img, params[position]))
    ours, theirs = [], []
    for _ in range(rounds):
      start = time.perf_counter()
      for img, p in inputs:
        op.apply(img, p)
      ours.append(time.perf_counter() - start)
      start = time.perf_counter()
      for img, _ in inputs:
        tv_op(img)
      theirs.append(time.perf_counter() - start)
    scale = 1000 / len(inputs)
    print(f'  [{position}] {type(op).__name__:<20} {str(op.model_dump(exclude_defaults=True)):<28} '
          f'tl_jax {scale * statistics.median(ours):6.3f}   torchvision {scale * statistics.median(theirs):6.3f}')


def loader_throughput(specs: dict, samples, workers: int, batch_size: int, rounds: int) -> None:
  print(f'\nLoader: {len(samples)} files, decode + transform, {workers} worker threads, batch {batch_size}, '
        f'median of {rounds} alternating epochs (img/s)')
  for label, spec in specs.items():
    transforms = {'tl_jax': augment.build_pipeline(spec), 'torchvision': torchvision_compose(spec)[0]}
    rates = {k: [] for k in transforms}
    for epoch in range(rounds):
      for name, transform in transforms.items():
        loader = Loader(samples, transform, batch_size, shuffle=True, seed=0, workers=workers)
        start = time.perf_counter()
        for _ in loader.epoch(epoch):
          pass
        rates[name].append(len(samples) / (time.perf_counter() - start))
    print(f'  {label:<10} ' + '   '.join(f'{k} {statistics.median(v):6.0f} img/s' for k, v in rates.items()))


def train_data_wait(data: Path, epochs: int, batch_size: int, workers: int) -> None:
  """A short run of train.py's loop with the full list as its train transforms; prints its data-wait share."""
  from tl_jax import training as train
  from tl_jax.config import validate
  config = validate({
      'model': {'arch': 'resnet18', 'weights': 'random'},
      'data': {'path': str(data), 'batch_size': batch_size, 'eval_batch_size': 64, 'workers': workers,
               'train_transforms': FULL_TRAIN, 'val_transforms': FULL_VAL},
      'stages': [{'name': 'finetune', 'epochs': epochs, 'trainable': 'all'}], 'seed': 0})
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, Path(workdir) / 'run', progress=False, plots=False, report=False,
                             log=lambda _: None)
    rows = json.loads((Path(workdir) / 'run' / 'history.json').read_text())
  rows = rows['epochs']
  print(f'\ntraining, ResNet-18 finetune (random init), full list, batch {batch_size}, {workers} workers:')
  for row in rows:
    wait, seconds = row.get('data_wait_seconds', float('nan')), row['train_seconds']
    print(f"  epoch {row['epoch']}: train {seconds:6.1f} s, {row['train_steps']} steps, "
          f"{seconds / row['train_steps']:.2f} s/step, data wait {wait:.2f} s = {100 * wait / seconds:.1f} %")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', type=Path, default=Path('data/hymenoptera_data'))
  parser.add_argument('--images', type=int, default=60, help='decoded images for the one-thread timings')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--per-op', action='store_true')
  parser.add_argument('--no-loader', action='store_true')
  parser.add_argument('--train-epochs', type=int, default=0)
  args = parser.parse_args()

  import torch
  torch.set_num_threads(1)  # torchvision's PIL ops are single-threaded; keep ToTensor/Normalize so too
  specs = {'full': FULL_TRAIN, 'tutorial': augment.tutorial_train_spec(Preprocessing()),
           'val': augment.tutorial_val_spec(Preprocessing())}
  samples = ImageFolder(args.data / 'train').samples
  images = [load_image(path) for path, _ in samples[::max(1, len(samples) // args.images)][:args.images]]
  print(f'{len(samples)} training files in {args.data}; PIL {Image.__version__}, torch {torch.__version__}')
  single_thread(specs, images, args.rounds)
  if args.per_op:
    per_op(FULL_TRAIN, images, args.rounds)
  if not args.no_loader:
    loader_throughput({k: specs[k] for k in ('full', 'tutorial')}, samples, args.workers, args.batch_size,
                      max(2, args.rounds // 2))
  if args.train_epochs:
    train_data_wait(args.data, args.train_epochs, args.batch_size, args.workers)


if __name__ == '__main__':
  main()
