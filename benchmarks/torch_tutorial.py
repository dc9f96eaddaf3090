"""PyTorch's "Transfer Learning for Computer Vision" tutorial, kept as close to its code as possible.

The tutorial's recipe, with its hyper-parameters taken from a `TutorialRecipe`: ImageFolder with the
tutorial's transforms, DataLoader(batch_size=4, shuffle=True) for both phases (the tutorial
shuffles val too), torchvision's resnet18 with `fc` replaced, SGD(0.001, 0.9) over all parameters
(finetune) or over `fc` only with the backbone's `requires_grad` off (frozen), StepLR(7, 0.1)
stepped once per epoch, and a deep copy of the state dict whenever val accuracy strictly improves.

It is the baseline for `benchmarks.epochs` (speed) and for behavioural tests (what is frozen, the
learning rate per epoch). It imports torch and lives outside the package: nothing in tl_jax imports it.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torchvision
from torch import nn, optim
from torch.optim import lr_scheduler
from torchvision import datasets, transforms

from tl_jax.config import TutorialRecipe
from tl_jax.data import transforms as tl_transforms

# The tutorial writes them out; they are torchvision's ImageNet statistics, tl_jax's too.
IMAGENET_MEAN, IMAGENET_STD = list(tl_transforms.IMAGENET_MEAN), list(tl_transforms.IMAGENET_STD)
PHASES = ('train', 'val')


@dataclasses.dataclass
class TorchResult:
  """What `train_torch` returns; `model` holds the best epoch's weights, as the tutorial's does."""
  history: list[dict]
  best_val_acc: float
  best_epoch: int
  model: nn.Module
  class_names: list[str]
  dataset_sizes: dict[str, int]
  device: str
  num_threads: int
  start_method: str   # how the DataLoader started its workers ('fork' as on Linux), or 'none' at 0 workers


def data_transforms() -> dict[str, transforms.Compose]:
  """The tutorial's `data_transforms`."""
  return {
      'train': transforms.Compose([
          transforms.RandomResizedCrop(224),
          transforms.RandomHorizontalFlip(),
          transforms.ToTensor(),
          transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
      ]),
      'val': transforms.Compose([
          transforms.Resize(256),
          transforms.CenterCrop(224),
          transforms.ToTensor(),
          transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
      ]),
  }


def image_datasets(data_root: str | os.PathLike) -> dict[str, datasets.ImageFolder]:
  """`{'train': ImageFolder(root/train), 'val': ImageFolder(root/val)}` with the tutorial's transforms."""
  tfms = data_transforms()
  return {x: datasets.ImageFolder(os.path.join(data_root, x), tfms[x]) for x in PHASES}


def worker_context(num_workers: int) -> Optional[multiprocessing.context.BaseContext]:
  """The start method of the tutorial's workers as it runs on Linux: fork.

  Stated, not inherited: a process started by `spawn` (as benchmarks.epochs starts this one)
  makes spawn its own default, and the DataLoader would then start fresh interpreters that
  import torch again, for every phase of every epoch (non-persistent workers). None at 0
  workers (the DataLoader takes no context then) and where fork does not exist.
  """
  if num_workers <= 0 or 'fork' not in multiprocessing.get_all_start_methods():
    return None
  return multiprocessing.get_context('fork')


def start_method(loader: torch.utils.data.DataLoader) -> str:
  """How `loader` starts its worker processes: 'fork', 'spawn', ... or 'none' (loads in-process)."""
  if loader.num_workers == 0:
    return 'none'
  context = loader.multiprocessing_context or multiprocessing.get_context()
  return context.get_start_method()


def dataloaders(image_datasets: Mapping[str, datasets.ImageFolder], batch_size: int,
                num_workers: int, eval_batch_size: Optional[int] = None) -> dict[str, torch.utils.data.DataLoader]:
  """The tutorial's loaders: both shuffled; val uses `batch_size` too unless `eval_batch_size` is given.

  Workers are forked (`worker_context`), as the tutorial's are on Linux.
  """
  sizes = {'train': batch_size, 'val': eval_batch_size or batch_size}
  return {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=sizes[x], shuffle=True,
                                         num_workers=num_workers,
                                         multiprocessing_context=worker_context(num_workers))
          for x in PHASES}


def process_start_method() -> str:
  """This process's default start method: 'spawn' in the benchmark's child, whatever the platform's."""
  return multiprocessing.get_start_method()


def loader_start_methods(data_root: str | os.PathLike, num_workers: int) -> dict[str, str]:
  """How the tutorial's loaders over `data_root` start their workers, per phase (see `start_method`)."""
  loaders = dataloaders(image_datasets(data_root), 4, num_workers)
  return {phase: start_method(loader) for phase, loader in loaders.items()}


def build_model(arch: str, num_classes: int, strategy: str,
                state_dict: Optional[Mapping[str, Any]] = None) -> nn.Module:
  """torchvision's `arch` (random init, then `state_dict`'s backbone if given) with a fresh `fc`.

  Seeding happens before this is called; the order (backbone init, then `fc`) is the tutorial's,
  so the fresh `fc` draws the same numbers whether or not pretrained weights are loaded.
  """
  model = getattr(torchvision.models, arch)()
  if state_dict is not None:
    load_backbone(model, state_dict)
  if strategy == 'frozen':
    for param in model.parameters():
      param.requires_grad = False
  # Parameters of newly constructed modules have requires_grad=True by default.
  model.fc = nn.Linear(model.fc.in_features, num_classes)
  return model


def load_backbone(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
  """Loads every non-`fc` tensor of `state_dict` (NumPy arrays or tensors) into `model`."""
  tensors = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
             for k, v in state_dict.items() if not k.startswith('fc.')}
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  # num_batches_tracked only counts steps; files converted from other frameworks may lack it.
  missing = [k for k in missing if not k.startswith('fc.') and not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise ValueError(f'state_dict does not fit {type(model).__name__}: missing {missing[:10]}, '
                     f'unexpected {list(unexpected)[:10]}')


def build_optimizer(model: nn.Module, config: TutorialRecipe) -> tuple[optim.Optimizer, lr_scheduler.StepLR]:
  """SGD over all parameters (finetune) or `fc`'s (frozen), and StepLR stepped per epoch."""
  params = model.fc.parameters() if config.strategy == 'frozen' else model.parameters()
  optimizer = optim.SGD(params, lr=config.lr, momentum=config.momentum)
  scheduler = lr_scheduler.StepLR(optimizer, step_size=config.step_size_epochs, gamma=config.gamma)
  return optimizer, scheduler


def set_phase(model: nn.Module, phase: str, bn: str) -> None:
  """train()/eval() as the tutorial; bn='frozen' keeps every BatchNorm in eval mode while training."""
  if phase == 'train':
    model.train()
    if bn == 'frozen':
      for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
          module.eval()
  else:
    model.eval()


def default_device() -> str:
  return 'cuda:0' if torch.cuda.is_available() else 'cpu'


def train_torch(config: TutorialRecipe, data_root: str | os.PathLike, state_dict: Optional[Mapping[str, Any]] = None,
                log: Callable[[str], None] = print, epochs: Optional[int] = None, *,
                num_threads: Optional[int] = None, device: Optional[str] = None,
                eval_batch_size: Optional[int] = None) -> TorchResult:
  """Runs the tutorial's `train_model` with `config`'s recipe and returns per-epoch numbers.

  Args:
    config: strategy, arch, batch_size, lr, momentum, step_size_epochs, gamma, bn, seed and
      workers (DataLoader num_workers) are used; `config.data` and `config.weights` are not.
    data_root: folder holding train/ and val/ class folders.
    state_dict: initial backbone weights (name -> NumPy array or tensor, torchvision names);
      None keeps torchvision's random init. `fc.*` entries are ignored.
    log: receives the tutorial's progress lines.
    epochs: overrides `config.epochs`.
    num_threads: torch.set_num_threads(num_threads) when given.
    device: default cuda:0 when available, else cpu (the tutorial's choice).
    eval_batch_size: val batch size; default `config.batch_size`, as in the tutorial.

  Returns:
    TorchResult; `history[i]` has epoch (0-based), lr (used during that epoch), train/val
    loss and acc, train/val/total seconds and data_wait_seconds (train phase time spent
    waiting on the DataLoader).
  """
  num_epochs = config.epochs if epochs is None else epochs
  if num_threads:
    torch.set_num_threads(num_threads)
  device = device or default_device()
  torch.manual_seed(config.seed)

  sets = image_datasets(data_root)
  loaders = dataloaders(sets, config.batch_size, config.workers, eval_batch_size)
  dataset_sizes = {x: len(sets[x]) for x in PHASES}
  class_names = sets['train'].classes

  model = build_model(config.arch, len(class_names), config.strategy, state_dict).to(device)
  criterion = nn.CrossEntropyLoss()
  optimizer, scheduler = build_optimizer(model, config)

  since = time.time()
  best_model_wts = copy.deepcopy(model.state_dict())
  best_acc, best_epoch = 0.0, -1
  history = []
  for epoch in range(num_epochs):
    log(f'Epoch {epoch}/{num_epochs - 1}')
    log('-' * 10)
    row: dict[str, Any] = {'epoch': epoch, 'lr': optimizer.param_groups[0]['lr']}
    for phase in PHASES:
      set_phase(model, phase, config.bn)
      running_loss = 0.0
      running_corrects = 0
      data_wait = 0.0
      start = time.perf_counter()
      fetch_start = start
      for inputs, labels in loaders[phase]:
        data_wait += time.perf_counter() - fetch_start
        inputs = inputs.to(device)
        labels = labels.to(device)
        optimizer.zero_grad()
        with torch.set_grad_enabled(phase == 'train'):
          outputs = model(inputs)
          _, preds = torch.max(outputs, 1)
          loss = criterion(outputs, labels)
          if phase == 'train':
            loss.backward()
            optimizer.step()
        running_loss += loss.item() * inputs.size(0)
        running_corrects += torch.sum(preds == labels.data).item()
        fetch_start = time.perf_counter()
      if phase == 'train':
        scheduler.step()
      seconds = time.perf_counter() - start
      epoch_loss = running_loss / dataset_sizes[phase]
      epoch_acc = running_corrects / dataset_sizes[phase]
      log(f'{phase} Loss: {epoch_loss:.4f} Acc: {epoch_acc:.4f}')
      row.update({f'{phase}_loss': epoch_loss, f'{phase}_acc': epoch_acc, f'{phase}_seconds': seconds})
      if phase == 'train':
        row['data_wait_seconds'] = data_wait
      if phase == 'val' and epoch_acc > best_acc:
        best_acc, best_epoch = epoch_acc, epoch
        best_model_wts = copy.deepcopy(model.state_dict())
    row['seconds'] = row['train_seconds'] + row['val_seconds']
    history.append(row)
    log('')

  time_elapsed = time.time() - since
  log(f'Training complete in {time_elapsed // 60:.0f}m {time_elapsed % 60:.0f}s')
  log(f'Best val Acc: {best_acc:4f}')
  model.load_state_dict(best_model_wts)
  return TorchResult(history=history, best_val_acc=best_acc, best_epoch=best_epoch, model=model,
                     class_names=class_names, dataset_sizes=dataset_sizes, device=str(device),
                     num_threads=torch.get_num_threads(), start_method=start_method(loaders['train']))
