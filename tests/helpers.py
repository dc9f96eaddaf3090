"""Shared tolerances and torch-side builders for the parity tests."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

# Every parity tolerance in one place. Relative errors are max|ours - torch| / max|torch|.
TOL = {
    'logits_rel': 1e-4,        # eval logits (the bound)
    'activation_rel': 1e-4,    # stem / layer1..4 outputs
    'running_stat_abs': 1e-5,  # BN running mean/var after a train-mode forward
    'grad_rel': 1e-4,          # per-tensor gradient of the CE loss (float32, the seeds in the test)
    'grad_rel_f64': 1e-10,     # the same in float64
    # vgg11_bn's float32 gradients against torch's float64 ones on the same ReLU/max-pool branches
    # (test_vgg: a branch flipped by rounding moves them ~1e-2): our worst error over torch float32's.
    'grad_f32_error_ratio': 2.0,
    'pixel_abs': 1e-6,         # preprocessing, float pixels
    'pil_levels': 0,           # PIL ops whose torchvision path is integer: max |ours - torch| in 8-bit levels
    'blur_levels': 1,          # GaussianBlur: torchvision convolves in float32 tensors and rounds to 8 bits
    'blur_fraction': 1e-3,     # ... and the fraction of pixels that round the other way
    'train_loss_abs': 1e-5,    # per-step loss in the 5-step SGD comparison
    # The float32 loss after one update, against the float64 run's: our error over torch float32's own
    # (measured: ours 2.4e-7, torch's 9.3e-5), with this floor for when torch's happens to be tiny.
    'train_loss_f32_error_ratio': 2.0,
    'train_loss_f32_error_floor': 1e-5,
    'train_loss_f32_budget': 1.0,   # our error over that allowance
    'train_loss_abs_f64': 1e-9,     # 5 SGD steps in float64, per-step loss
    'train_delta_rel_f64': 1e-7,    # parameter change after 5 float64 steps, relative to torch's change
    'metric_abs_f64': 1e-12,   # precision/recall/F1/accuracy/log loss in float64 against scikit-learn
    'eval_loss_abs': 1e-5,     # evaluate.py's mean cross-entropy against torchvision's (float32 logits)
    'lr_rel_f64': 1e-12,       # lr of an epoch against torch's scheduler, float64
    'lr_rel_f32': 1e-5,        # the same in float32, the trainer's (0.9 ** 159 in float32: ~1e-6)
    'optim_rel_f64': 1e-12,    # parameter change after each of 12 optimizer steps on one tensor, float64
    # parameter change after every step of a toy model's param groups / clipping / accumulation (float64):
    # Adam's m / (sqrt(v) + eps) magnifies the gradients' last bits where |g| is near eps
    'optim_toy_rel_f64': 1e-10,
    'parallel_epoch_rel_f32': 1e-5,  # a float32 training epoch on N devices vs 1 (the bound)
    'bf16_logits_rel': 2e-2,        # eval logits with bfloat16 convs/matmuls vs float32
    'parallel_abs_f64': 1e-12,      # 4 devices / 2 processes vs 1 device, float64: losses, params, BN stats
    'parallel_rel_f64': 1e-12,      # the same for eval sums (relative: a loss sum is ~20)
    'rewrite_rel_f64': 1e-12,  # a rewritten op (conv value/dx/dW vs lax, max-pool vs torch), float64
    'calibration_abs_f32': 1e-6,   # ECE/MCE against torchmetrics, which bins and sums in float32
    'loss_abs_f64': 1e-12,     # a loss value (CE with smoothing/weights, BCE with pos_weight) vs torch, float64
    'mix_abs_f64': 1e-12,      # MixUp/CutMix images and soft targets vs torchvision given the same λ/box, float64
    # Two-sample Kolmogorov-Smirnov statistic of 4000 of our λ/box draws against 4000 of torchvision's:
    # the critical value at significance 0.001 is 1.95 * sqrt(2 / 4000) = 0.044 (fixed seeds: deterministic).
    'mix_ks_stat': 0.044,
    'ema_rel_f64': 1e-14,      # the weights' moving average against torch's AveragedModel on the same values
    # AugMix: torchvision runs its chains with the uint8 tensor ops (grid_sample, truncating float blends), we
    # with the PIL ops; max |ours - torchvision| in 8-bit levels and the mean over pixels (measured, test_policies).
    'augmix_levels': 64,        # measured 47 (a few pixels where a bilinear sample lands elsewhere)
    'augmix_mean_levels': 0.5,  # measured 0.12 (slow tier, 50 draws) to 0.29 (default tier, 4)
    # RandomPerspective end to end: torch solves for the coefficients with MKL's gels, we with LU; their float32
    # roundings differ in ~1 in 10 draws, moving a few pixels; the fraction of pixels that differ.
    'perspective_fraction': 1e-2,
}


# (test id, what, measured, tolerance key) of every parity check; conftest prints the worst per check.
MEASURED: list[tuple[str, str, float, str]] = []


def within(err: float, tol_key: str, what: str) -> bool:
  """err <= TOL[tol_key], recording the measured value for the session's parity table."""
  test_id = os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]
  MEASURED.append((test_id, what, float(err), tol_key))
  return float(err) <= TOL[tol_key]


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12))


def data_root() -> Path:
  """The genuine hymenoptera_data beside the checkout (or TL_JAX_DATA_ROOT)."""
  env = os.environ.get('TL_JAX_DATA_ROOT')
  return Path(env) if env else Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'hymenoptera_data'


def require_data() -> Path:
  root = data_root()
  if not (root / 'train').is_dir():
    pytest.skip(f'hymenoptera_data not found at {root}')
  return root


def random_torchvision_model(arch: str, num_classes: int, seed: int = 0):
  """A torchvision model with random weights and randomised BN affine params and running stats.

  BN with its default init (scale 1, bias 0, mean 0, var 1) is nearly the identity in eval
  mode, which would hide a wrong mapping of BN tensors.
  """
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  torch.manual_seed(seed)
  model = getattr(torchvision.models, arch)(num_classes=num_classes)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
  return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


class TorchDraws:
  """Stands in for the numpy Generator, drawing torch's numbers the way torchvision's transforms do.

  With torch seeded as torchvision's transform would be, our sampler sees the same random numbers,
  so it must return the parameters torchvision used.
  """

  def __init__(self, torch):
    self.torch = torch

  def uniform(self, low, high):
    return self.torch.empty(1).uniform_(low, high).item()

  def integers(self, low, high):
    return int(self.torch.randint(low, high, size=(1,)).item())

  def random(self):
    return self.torch.rand(1).item()

  def permutation(self, n):
    return self.torch.randperm(n).tolist()

  def standard_normal(self, size, dtype=None):
    """torch.empty(size).normal_(): RandomErasing's 'random' values."""
    return self.torch.empty(list(size), dtype=self.torch.float32).normal_().numpy()

  def dirichlet(self, alpha):
    """torch._sample_dirichlet on a (1, K) float32 batch, as AugMix draws its weights."""
    return self.torch._sample_dirichlet(self.torch.tensor(list(alpha)).expand(1, -1))[0].numpy()


def two_class_folder(root: Path, per_class: int = 6, val_per_class: int = 3) -> Path:
  """An image folder (train/ and val/, 'ants' dark and 'bees' bright, 40x48 PNGs) for runs of the real loop."""
  from PIL import Image
  rng = np.random.default_rng(5)
  for split, n in (('train', per_class), ('val', val_per_class)):
    for label, cls in enumerate(('ants', 'bees')):
      folder = root / split / cls
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        pixels = np.clip(rng.normal(70 + 110 * label, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f'{cls}_{i}.png')
  return root


def head_only_values(data: Path, stages: list, **top) -> dict:
  """A recipe of random-weight ResNet-18 stages at 32 px whose backbone features are cached (deterministic
  transforms, head only, bn: frozen), so a run of the real loop takes seconds. `stages` entries are
  merged over the head-only stage."""
  fixed = [{'Resize': {'size': 36}}, {'CenterCrop': {'size': 32}}, {'ToTensor': {}},
           {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]}}]
  base = {'epochs': 2, 'trainable': ['head'], 'bn': 'frozen', 'optimizer': {'name': 'sgd', 'lr': 0.01, 'momentum': 0.9}}
  return {'model': {'arch': 'resnet18', 'weights': 'random'},
          'data': {'path': str(data), 'batch_size': 4, 'eval_batch_size': 8, 'workers': 0,
                   'train_transforms': fixed, 'val_transforms': fixed},
          'stages': [{**base, **stage} for stage in stages], 'seed': 0, **top}


@contextlib.contextmanager
def persistent_compilation_cache(directory=None, min_compile_secs: float = 0.0):
  """JAX's persistent compilation cache while the block runs (in `directory`, else the one already set),
  caching what takes at least `min_compile_secs` to compile; the previous settings afterwards. A cached
  executable is the one that was compiled, so it gives the same numbers."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cache
  values = {'jax_persistent_cache_min_compile_time_secs': min_compile_secs,
            'jax_persistent_cache_min_entry_size_bytes': 0}
  if directory is not None:
    values['jax_compilation_cache_dir'] = str(directory)
  before = {key: getattr(jax.config, key) for key in values}
  for key, value in values.items():
    jax.config.update(key, value)
  cache.reset_cache()
  try:
    yield
  finally:
    for key, value in before.items():
      jax.config.update(key, value)
    cache.reset_cache()


@pytest.fixture(scope='module')
def compilation_cache():
  """Every compilation of a module's runs of the real loop kept in the session's persistent cache
  (tests/conftest.py caches only those over 0.2 s): the runs compile the same init, features and steps,
  and the first run's executables serve the others. Import it into a test module and name it in
  `pytestmark = pytest.mark.usefixtures(...)`."""
  with persistent_compilation_cache(min_compile_secs=0.0):
    yield
