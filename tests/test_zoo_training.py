"""One member of every zoo family through the real run loop: a two-stage recipe (head only with frozen
BatchNorm, so its features are cached where the family allows it; then every layer), a run that dies
after its first epoch and is resumed ending with the uninterrupted run's numbers, and a bfloat16 run.

The families' numerics are proven against torchvision in their own test files; this checks that each
one plugs into the loop: stages and freezing, the feature cache, checkpoints and resume, aux heads
(Inception v3, GoogLeNet), stochastic depth keys, the compute dtype.
"""

import numpy as np
import pytest

from helpers import two_class_folder
from test_train import _Crash, _Recorder
from tl_jax.config import validate
from tl_jax.models import family_of

# The smallest member of each family that is not already run end to end elsewhere (ResNet, VGG). Those whose
# train step holds something the loop must carry (aux heads, stochastic depth keys, attention, a per-arch stage
# list) also crash and resume; the others run the recipe once (the slow tier's time is counted).
RESUMED = ['mobilenet_v3_small', 'efficientnet_b0', 'convnext_tiny', 'inception_v3', 'googlenet', 'swin_t']
# (MobileNetV2, EfficientNetV2, Swin V2 and MaxViT share their loop paths with members above; MaxViT's
# 224-px minimum makes it the costliest to run here. A random-weight RegNet at 32 px and batch 2 normalises
# 2 values per channel in its last BatchNorms and its updates overflow float32 within the stage.)
ONCE = ['alexnet', 'squeezenet1_1', 'densenet121', 'shufflenet_v2_x0_5', 'mnasnet0_5', 'vit_b_16']
QUIET = dict(progress=False, plots=False, report=False, log=lambda _: None)


def _size(arch):
  # Inception v3's aux head trains from 299 px (as torchvision's); ViT and MaxViT take their native 224;
  # the others their family's smallest input, at least 32 px.
  return 299 if arch == 'inception_v3' else max(family_of(arch).init_size(arch), 32)


def _config(tmp_path, arch, stages, dtype='float32', size=None):
  size = size or _size(arch)
  norm = {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]}}
  return validate({
      'model': {'arch': arch, 'weights': 'random', 'dtype': dtype},
      'data': {'path': str(two_class_folder(tmp_path / 'data', per_class=4, val_per_class=2)), 'batch_size': 2,
               'eval_batch_size': 4, 'workers': 0,
               'train_transforms': [{'RandomResizedCrop': {'size': size}}, {'RandomHorizontalFlip': {}},
                                    {'ToTensor': {}}, norm],
               'val_transforms': [{'Resize': {'size': size + 4}}, {'CenterCrop': {'size': size}}, {'ToTensor': {}},
                                  norm]},
      'stages': stages, 'seed': 0})


TWO_STAGES = [{'name': 'head', 'epochs': 1, 'trainable': ['head'], 'bn': 'frozen',
               'optimizer': {'name': 'sgd', 'lr': 0.01, 'momentum': 0.9}},
              {'name': 'all', 'epochs': 1, 'trainable': 'all',
               'optimizer': {'name': 'sgd', 'lr': 0.001, 'momentum': 0.9}}]


def _stages(arch):
  if arch == 'inception_v3':
    # torchvision's Inception init (truncated normal, std 0.1) grows activations ~17x per 3x3 conv; with
    # random weights only batch statistics keep them finite (eval-mode BN over fresh running stats: 1e18 logits).
    return [{**TWO_STAGES[0], 'bn': 'train'}, TWO_STAGES[1]]
  return TWO_STAGES


@pytest.mark.slow
@pytest.mark.parametrize('arch', ONCE)
def test_two_stages_run(tmp_path, arch):
  from tl_jax.training import train_and_evaluate
  # Batch statistics in the head stage too: a random-weight deep net under eval-mode BN with fresh 0/1
  # statistics gives features large enough to blow the head's updates up (RegNet, DenseNet).
  stages = [{**TWO_STAGES[0], 'bn': 'train'}, TWO_STAGES[1]]
  result = train_and_evaluate(_config(tmp_path, arch, stages), tmp_path / 'run', **QUIET)
  assert [r['stage'] for r in result.history] == ['head', 'all']
  # Train losses only: with random weights the val phase's eval-mode BatchNorm normalises by running statistics
  # still near their fresh 0/1, and deep nets (DenseNet, RegNet) can overflow there; numerics are the family
  # tests' business, this one checks the loop's plumbing.
  assert all(np.isfinite(r['train_loss']) and 0 <= r['val_acc'] <= 1 for r in result.history), result.history


@pytest.mark.slow
@pytest.mark.parametrize('arch', RESUMED)
def test_two_stages_crash_and_resume_give_the_uninterrupted_run(tmp_path, arch):
  from tl_jax.training import train_and_evaluate
  stages = _stages(arch)
  config = _config(tmp_path, arch, stages)
  expected = train_and_evaluate(config, tmp_path / 'straight', **QUIET)
  assert len(expected.history) == 2 and all(np.isfinite(r['train_loss']) for r in expected.history)
  with pytest.raises(_Crash):
    train_and_evaluate(config, tmp_path / 'crashed', callbacks=[_Recorder(crash_after_epoch=0)], **QUIET)
  resumed = _Recorder()
  result = train_and_evaluate(config, tmp_path / 'crashed', resume=True, callbacks=[resumed], **QUIET)
  assert resumed.calls[:3] == ['run_start', 'stage_start all', 'epoch_start 1']
  for ours, theirs in zip(result.history, expected.history, strict=True):
    for key in ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'lr'):
      # nan_ok: a random-weight EfficientNet's val phase (eval-mode BN, fresh statistics) can overflow; the
      # resumed run must overflow the same way.
      assert ours[key] == pytest.approx(theirs[key], rel=1e-5, nan_ok=True), (arch, key)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['efficientnet_b0', 'convnext_tiny', 'swin_t'])
def test_a_bfloat16_run_trains_and_stays_near_the_float32_run(tmp_path, arch):
  """bfloat16 convolutions and matmuls (params, norm statistics and the loss float32): the first
  epoch's train loss within a few percent of the float32 run's."""
  from tl_jax.training import train_and_evaluate
  stages = [{'name': 'all', 'epochs': 1, 'trainable': 'all', 'optimizer': {'name': 'sgd', 'lr': 0.001}}]
  # EfficientNet at 96 px: at 32 px its last blocks see 1x1 maps, so train-mode BatchNorm normalises 2 values per
  # channel to +-1 by the sign of their difference, which bfloat16 rounding flips (train loss 0.90 against 0.74 at
  # 32 px, 0.67 against 0.78 at 64 px, 0.673 against 0.663 at 96 px: 3x3 maps, 18 values).
  size = 96 if arch == 'efficientnet_b0' else None
  runs = {dtype: train_and_evaluate(_config(tmp_path / dtype, arch, stages, dtype, size), tmp_path / dtype / 'run',
                                    **QUIET)
          for dtype in ('float32', 'bfloat16')}
  for key in ('train_loss',):   # (val: random weights under eval-mode BN can overflow, see above)
    f32, bf16 = runs['float32'].history[0][key], runs['bfloat16'].history[0][key]
    assert np.isfinite(bf16) and bf16 == pytest.approx(f32, rel=0.05), (arch, key, f32, bf16)


@pytest.mark.slow
def test_every_arch_declares_exactly_the_stages_its_parameters_use():
  """`trainable: all` and the stage names a recipe may give come from the declared stages; each arch's
  must be the ones its parameter tree maps to (MobileNetV3-Small has 13 feature modules, Large 17)."""
  import jax
  from tl_jax import models
  from tl_jax.models import ARCHS, arch_stages, create_model, stage_tree
  wrong = {}
  for arch in sorted(ARCHS):
    model = create_model(arch, 3)
    size = models.init_size(model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, size, size, 3)),
                                               train=False))
    used = set(jax.tree_util.tree_leaves(stage_tree(shapes['params'])))
    if used != set(arch_stages(arch)):
      wrong[arch] = (sorted(set(arch_stages(arch)) - used), sorted(used - set(arch_stages(arch))))
  assert not wrong, wrong
