"""Train a classifier the way PyTorch's transfer-learning tutorial does, or any recipe in a config.

  python scripts/train.py --strategy frozen      # only the new fc learns
  python scripts/train.py --strategy finetune    # every parameter learns
  python scripts/train.py --strategy two-stage   # fc first (--head-epochs), then all layers at lr/10
  python scripts/train.py --trainable layer4,head           # partial unfreezing, one stage
  python scripts/train.py --config configs/resnet101_two_stage.yaml --data data/weather
  python scripts/train.py --config configs/resnet101_two_stage.yaml --lr-find   # LR range test only

Values come from --config, else the --strategy preset (tl_jax/presets/); flags override them.
--epochs, --lr and --bn apply to every stage of the recipe (with --strategy two-stage, --epochs is
the total of both stages and the second stage's lr is --lr / 10).

Exit status: 0 done; 2 bad input, a checkpoint that cannot be read or written, a --workdir in use;
3 a non-finite loss (nothing non-finite saved); 143 / 130 stopped by SIGTERM / SIGINT after saving
where it got (a second one exits at once). After a stop, --resume continues from the last saved state.
"""

import argparse
from pathlib import Path
from typing import Optional, Sequence

from tl_jax.config import PRESETS


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--strategy', choices=sorted(PRESETS), help='what learns (default: finetune)')
  parser.add_argument('--config', help='YAML recipe (default: the --strategy preset, tl_jax/presets/)')
  parser.add_argument('--data', help='folder with train/ and val/, a folder of class folders (split with '
                                     'data.val_fraction), or tfds:NAME[/CONFIG][:VERSION] '
                                     '(default: data/hymenoptera_data, downloaded when missing)')
  parser.add_argument('--tfds-data-dir', help='where TFDS sets are prepared (default: $TFDS_DATA_DIR or '
                                              '~/tensorflow_datasets)')
  parser.add_argument('--tfds-download', action='store_true', default=None,
                      help='download and prepare a TFDS set that is not prepared yet (needs network)')
  parser.add_argument('--weights', help='imagenet | a torchvision weight name (IMAGENET1K_V2, DEFAULT, ...) | '
                      'random | PATH to a .pth/.safetensors state dict')
  parser.add_argument('--arch', help='any torchvision classifier: resnet18, vgg16, convnext_tiny, vit_b_16, ... '
                      '(`tl-jax archs` lists them)')
  parser.add_argument('--epochs', type=int, help='epochs of every stage (two-stage: of both together)')
  parser.add_argument('--head-epochs', type=int, default=10, help='--strategy two-stage: epochs of the head stage')
  parser.add_argument('--trainable', help="stages that learn in a single-stage recipe, e.g. layer4,head (or all)")
  parser.add_argument('--batch-size', type=int, help='train batch size (all stages)')
  parser.add_argument('--eval-batch-size', type=int)
  parser.add_argument('--lr', type=float, help='learning rate of every stage (two-stage: of the head stage)')
  parser.add_argument('--workdir', help='run directory (default: runs/<strategy or config name>)')
  parser.add_argument('--seed', type=int)
  parser.add_argument('--bn', choices=['train', 'frozen'],
                      help='every stage: train = BN uses batch statistics while training (the tutorial); '
                           'frozen = eval-mode BN')
  parser.add_argument('--workers', type=int, help='data loading threads')
  parser.add_argument('--no-cache-features', dest='cache_features', action='store_false', default=None,
                      help='compute a frozen backbone\'s features every epoch (default: once per stage where '
                      'they cannot change: backbone frozen, bn frozen or no BatchNorm)')
  parser.add_argument('--skip-bad-images', action='store_true', default=None,
                      help='warn about and drop unreadable images instead of stopping')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'],
                      help='compute dtype of convolutions and matmuls (params, BN statistics and loss stay float32)')
  parser.add_argument('--no-winograd', dest='winograd', action='store_false', default=None,
                      help='ResNets/VGG on CPU: direct 3x3 convolutions everywhere (default: Winograd where '
                           'measured faster, model.winograd)')
  parser.add_argument('--devices', type=int, help='use the first N local devices (default: all); the batch is '
                                                  'split over them')
  parser.add_argument('--coordinator', help='multi-process run: HOST:PORT of process 0 (with --num-processes and '
                                            '--process-id; leave all three out under SLURM/Kubernetes/TPU)')
  parser.add_argument('--num-processes', type=int, help='multi-process run: number of processes')
  parser.add_argument('--process-id', type=int, help='multi-process run: this process, 0..N-1')
  parser.add_argument('--resume', action='store_true', help='continue the run in --workdir')
  parser.add_argument('--no-progress', action='store_true', help='no progress bars')
  finder = parser.add_argument_group('LR range test (tl_jax.training.lr_find; trains nothing, touches no checkpoint)')
  finder.add_argument('--lr-find', action='store_true',
                      help='sweep the lr exponentially over a copy of the recipe\'s initial state, write '
                           'WORKDIR/lr_find.png and print a suggested lr, then exit')
  finder.add_argument('--start-lr', type=float, help='--lr-find: first lr (default 1e-7)')
  finder.add_argument('--end-lr', type=float, help='--lr-find: last lr (default 10)')
  finder.add_argument('--steps', type=int, help='--lr-find: optimizer steps of the sweep (default 100)')
  finder.add_argument('--stage', help='--lr-find: the recipe\'s stage (name or index) whose trainable stages '
                                      'and optimizer it uses (default: the first)')
  parser.add_argument('--no-tensorboard', dest='tensorboard', action='store_false',
                      help='write no TensorBoard log (default: WORKDIR/tb/, `tensorboard --logdir WORKDIR/tb`)')
  parser.add_argument('--tb-every', type=int, default=10,
                      help='TensorBoard: log the train loss, accuracy and lr every N train steps (0: per epoch only)')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
  args = parse_args(argv, prog)
  from tl_jax import parallel
  # Before any other JAX work: the devices of every process form one mesh.
  parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  from tl_jax import config as config_lib
  from tl_jax.training import train_and_evaluate
  if args.strategy and args.config:
    raise config_lib.ConfigError('pass --strategy or --config, not both (a config file holds its own stages)')
  strategy = args.strategy or ('finetune' if not args.config else None)
  path = Path(args.config) if args.config else config_lib.preset_path(strategy)
  values = config_lib.read_yaml(path)
  config_lib.validate(values, f' in {path}')
  epochs, lr = args.epochs, args.lr
  if strategy == 'two-stage':
    values = config_lib.two_stage_values(values, args.head_epochs, epochs, lr)
    epochs = lr = None
  overrides = {'epochs': epochs, 'lr': lr, 'bn': args.bn, 'data': args.data, 'weights': args.weights,
               'arch': args.arch, 'batch_size': args.batch_size, 'eval_batch_size': args.eval_batch_size,
               'seed': args.seed, 'workers': args.workers, 'skip_bad_images': args.skip_bad_images,
               'trainable': args.trainable, 'dtype': args.dtype, 'tfds_data_dir': args.tfds_data_dir, 'tfds_download': args.tfds_download,
               'cache_features': args.cache_features, 'winograd': args.winograd}
  given = {k: v for k, v in overrides.items() if v is not None}
  config = config_lib.validate(config_lib.apply_overrides(values, given),
                               f' in {path}' + (' with the command-line flags' if given else ''))
  workdir = args.workdir or f'runs/{strategy or path.stem}'
  finder_flags = {'--start-lr': args.start_lr, '--end-lr': args.end_lr, '--steps': args.steps, '--stage': args.stage}
  if not args.lr_find and any(v is not None for v in finder_flags.values()):
    raise config_lib.ConfigError(f'{", ".join(k for k, v in finder_flags.items() if v is not None)} '
                                 'belong to --lr-find; add --lr-find or leave them out')
  if args.lr_find:
    if args.resume:
      raise config_lib.ConfigError('--lr-find sweeps from the recipe\'s initial weights; leave out --resume')
    from tl_jax.training.lr_find import lr_find
    lr_find(config, workdir, stage=args.stage if args.stage is not None else 0,
            start_lr=1e-7 if args.start_lr is None else args.start_lr,
            end_lr=10.0 if args.end_lr is None else args.end_lr, steps=100 if args.steps is None else args.steps,
            devices=args.devices, progress=not args.no_progress)
    return 0
  callbacks = []
  if args.tensorboard:
    from tl_jax.training.tensorboard import TensorBoard
    if args.tb_every < 0:
      raise config_lib.ConfigError(f'--tb-every must be >= 0 (0: per epoch only), got {args.tb_every}')
    callbacks.append(TensorBoard(every=args.tb_every))
  train_and_evaluate(config, workdir, resume=args.resume, progress=not args.no_progress, devices=args.devices,
                     callbacks=callbacks)
  return 0

