"""MixUp / CutMix against torchvision.transforms.v2 given the same λ and box (float64), their samplers
against torchvision's draws (two-sample KS), RandomChoice of the two, padding rows, and a train step
that mixes while the val step does not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import nchw_to_nhwc, within
from tl_jax import losses
from tl_jax.data import mix

torch = pytest.importorskip('torch')
v2 = pytest.importorskip('torchvision.transforms.v2')

B, C, H, W = 6, 4, 10, 14
DRAWS = 4000


def _batch(seed=0):
  gen = torch.Generator().manual_seed(seed)
  images = torch.randn(B, 3, H, W, generator=gen, dtype=torch.float64)
  labels = torch.tensor([0, 3, 1, 1, 2, 0])
  return images, labels


def _float64_one_hot(labels):
  """torchvision one-hot encodes integer labels in float32; given probability labels it mixes them in
  their own dtype, so float64 one-hot rows compare the arithmetic without float32 rounding."""
  return torch.nn.functional.one_hot(labels, C).double()


def _fixed_lam(monkeypatch, transform, lam):
  monkeypatch.setattr(transform._dist, 'sample', lambda *a, **k: torch.tensor([lam], dtype=torch.float64))


def _compare(what, ours_images, ours_targets, theirs_images, theirs_targets):
  err_images = np.max(np.abs(np.asarray(ours_images) - nchw_to_nhwc(theirs_images.numpy())))
  err_targets = np.max(np.abs(np.asarray(ours_targets) - theirs_targets.numpy()))
  assert within(err_images, 'mix_abs_f64', f'{what}: images'), err_images
  assert within(err_targets, 'mix_abs_f64', f'{what}: soft targets'), err_targets


@pytest.mark.parametrize('lam', [0.3, 0.87])
def test_mixup_matches_torchvision_given_lambda(monkeypatch, lam):
  images, labels = _batch()
  mixup = v2.MixUp(alpha=0.2, num_classes=C)
  _fixed_lam(monkeypatch, mixup, lam)
  theirs_images, theirs_targets = mixup(images, _float64_one_hot(labels))
  with jax.enable_x64(True):
    targets = jax.nn.one_hot(jnp.asarray(labels.numpy()), C, dtype=jnp.float64)
    partner = mix.partner_rows(jnp.ones(B, bool))
    ours = mix.mixup(jnp.asarray(nchw_to_nhwc(images.numpy())), targets, lam, partner)
  _compare(f'MixUp float64 λ={lam}', *ours, theirs_images, theirs_targets)


@pytest.mark.parametrize('lam, seed', [(0.3, 0), (0.75, 1), (0.05, 2)])
def test_cutmix_matches_torchvision_given_lambda_and_box(monkeypatch, lam, seed):
  images, labels = _batch(seed)
  cutmix = v2.CutMix(alpha=1.0, num_classes=C)
  _fixed_lam(monkeypatch, cutmix, lam)
  torch.manual_seed(seed)
  theirs_images, theirs_targets = cutmix(images, _float64_one_hot(labels))
  torch.manual_seed(seed)   # the box centre torchvision drew
  r_x, r_y = int(torch.randint(W, size=(1,))), int(torch.randint(H, size=(1,)))
  with jax.enable_x64(True):
    box, lam_adjusted = mix.cutmix_box(jnp.float64(lam), r_x, r_y, H, W)
    targets = jax.nn.one_hot(jnp.asarray(labels.numpy()), C, dtype=jnp.float64)
    partner = mix.partner_rows(jnp.ones(B, bool))
    ours = mix.cutmix(jnp.asarray(nchw_to_nhwc(images.numpy())), targets, box, lam_adjusted, partner)
  assert not np.array_equal(np.asarray(ours[0]), nchw_to_nhwc(images.numpy()))   # the box is not empty
  _compare(f'CutMix float64 λ={lam}', *ours, theirs_images, theirs_targets)


def test_loss_on_mixed_targets_with_smoothing_and_weights_is_torchs(monkeypatch):
  """CrossEntropyLoss(weight, label_smoothing) on torchvision's mixed targets vs our loss on ours."""
  images, labels = _batch(3)
  cutmix = v2.CutMix(alpha=1.0, num_classes=C)
  _fixed_lam(monkeypatch, cutmix, 0.6)
  torch.manual_seed(3)
  _, theirs_targets = cutmix(images, _float64_one_hot(labels))
  logits = np.random.default_rng(0).normal(0, 2, (B, C))
  weights = [0.5, 1.0, 2.0, 1.5]
  ref = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float64), label_smoothing=0.1)(
      torch.from_numpy(logits), theirs_targets).item()
  torch.manual_seed(3)
  r_x, r_y = int(torch.randint(W, size=(1,))), int(torch.randint(H, size=(1,)))
  with jax.enable_x64(True):
    box, lam_adjusted = mix.cutmix_box(jnp.float64(0.6), r_x, r_y, H, W)
    _, targets = mix.cutmix(jnp.asarray(nchw_to_nhwc(images.numpy())),
                            jax.nn.one_hot(jnp.asarray(labels.numpy()), C, dtype=jnp.float64), box, lam_adjusted,
                            mix.partner_rows(jnp.ones(B, bool)))
    sums = losses.weighted_cross_entropy(0.1, weights)(
        jnp.asarray(logits), {'labels': jnp.asarray(labels.numpy()), 'soft_labels': targets, 'mask': jnp.ones(B, bool)})
  err = abs(float(sums['loss_sum'] / sums['count']) - ref)
  assert within(err, 'loss_abs_f64', 'CutMix float64: CrossEntropyLoss(weight, label_smoothing) on the mixed targets')


def test_padding_rows_mix_with_themselves_and_the_roll_runs_over_the_valid_rows(monkeypatch):
  """Our last batch is padded where torch's is short: the valid rows mix as torchvision mixes the short batch."""
  images, labels = _batch(4)
  valid = 4
  mixup = v2.MixUp(alpha=1.0, num_classes=C)
  _fixed_lam(monkeypatch, mixup, 0.4)
  theirs_images, theirs_targets = mixup(images[:valid], _float64_one_hot(labels[:valid]))
  mask = jnp.arange(B) < valid
  assert mix.partner_rows(mask).tolist() == [3, 0, 1, 2, 4, 5]
  with jax.enable_x64(True):
    ours_images, ours_targets = mix.mixup(jnp.asarray(nchw_to_nhwc(images.numpy())),
                                          jax.nn.one_hot(jnp.asarray(labels.numpy()), C, dtype=jnp.float64), 0.4,
                                          mix.partner_rows(mask))
  _compare('MixUp float64 padded batch', ours_images[:valid], ours_targets[:valid], theirs_images, theirs_targets)
  # A padding row is mixed with itself: x (1 - λ) + x λ, x up to rounding (and masked out anyway).
  np.testing.assert_allclose(np.asarray(ours_images[valid:]), nchw_to_nhwc(images[valid:].numpy()), rtol=1e-15,
                             atol=1e-15)


def _ks(ours, theirs) -> float:
  stats = pytest.importorskip('scipy.stats')
  # Both rounded to float32: a discrete draw (CutMix's box area) must not split one atom in two.
  return float(stats.ks_2samp(np.float32(ours), np.float32(theirs)).statistic)


@pytest.mark.parametrize('alpha', [0.2, 1.0])
def test_lambda_draws_follow_torchvisions(alpha):
  torch.manual_seed(0)
  dist = v2.MixUp(alpha=alpha, num_classes=C)._dist
  theirs = dist.sample((DRAWS,)).reshape(-1).numpy()
  ours = jax.vmap(lambda k: mix.sample_lam(k, alpha))(jax.random.split(jax.random.PRNGKey(0), DRAWS))
  assert within(_ks(ours, theirs), 'mix_ks_stat', f'MixUp λ ~ Beta({alpha}, {alpha}) vs torchvision (KS)')


def test_cutmix_box_draws_follow_torchvisions():
  torch.manual_seed(0)
  cutmix = v2.CutMix(alpha=1.0, num_classes=C)
  flat = [torch.zeros(1, 3, H, W)]
  theirs = [cutmix.make_params(flat) for _ in range(DRAWS)]

  def draw(key):
    lam, r_x, r_y = mix.sample_cutmix(key, 1.0, H, W)
    return mix.cutmix_box(lam, r_x, r_y, H, W)

  (x1, y1, x2, y2), lam_adjusted = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.PRNGKey(1), DRAWS))
  for i, (name, ours) in enumerate([('x1', x1), ('y1', y1), ('x2', x2), ('y2', y2)]):
    assert within(_ks(ours, [p['box'][i] for p in theirs]), 'mix_ks_stat', f'CutMix box {name} vs torchvision (KS)')
  assert within(_ks(lam_adjusted, [p['lam_adjusted'] for p in theirs]), 'mix_ks_stat',
                'CutMix box-adjusted λ vs torchvision (KS)')


def test_both_alphas_choose_mixup_or_cutmix_per_batch_with_equal_odds():
  """RandomChoice([MixUp, CutMix]): a CutMix batch copies whole pixels, a MixUp batch blends every pixel."""
  images = jax.random.normal(jax.random.PRNGKey(0), (B, H, W, 3))
  batch = {'images': images, 'labels': jnp.array([0, 3, 1, 1, 2, 0]), 'mask': jnp.ones(B, bool)}
  mixed = jax.jit(jax.vmap(lambda k: mix.mix_batch(batch, k, C, 1.0, 1.0)['images']))(
      jax.random.split(jax.random.PRNGKey(2), 400))
  kept = np.mean(np.asarray(mixed) == np.asarray(images)[None], axis=(1, 2, 3, 4))
  cutmix_share = np.mean(kept > 0)   # CutMix keeps the pixels outside the box exactly; MixUp keeps none
  assert 0.42 < cutmix_share < 0.58, cutmix_share


def test_mixing_step_mixes_image_batches_and_passes_feature_batches():
  """The mixing wrapper (which setup_stage puts around the train step only, never the eval step) adds
  soft labels from the step's key; batches of cached features pass unchanged."""
  seen = []

  def step(state, batch):
    seen.append(batch)
    return state, {}

  class State:
    rng, step = jax.random.PRNGKey(0), 3

  wrapped = mix.mixing_step(step, num_classes=C, mixup_alpha=0.4, cutmix_alpha=0.0)
  images = jax.random.normal(jax.random.PRNGKey(1), (B, H, W, 3))
  batch = {'images': images, 'labels': jnp.array([0, 3, 1, 1, 2, 0]), 'mask': jnp.ones(B, bool)}
  wrapped(State(), batch)
  assert seen[-1]['soft_labels'].shape == (B, C) and not np.allclose(seen[-1]['images'], images)
  np.testing.assert_allclose(np.asarray(seen[-1]['soft_labels']).sum(-1), 1.0, rtol=1e-6)
  assert seen[-1]['labels'] is batch['labels']   # accuracy counts against the unmixed labels
  features = {'features': jnp.ones((B, 8)), 'labels': batch['labels'], 'mask': batch['mask']}
  wrapped(State(), features)
  assert seen[-1] is features or seen[-1] == features


def test_mixing_settings_follow_the_recipe():
  from tl_jax import config
  from tl_jax.training.stages import recipe_loss
  values = config.default_values()
  values['data'] = {'mixup_alpha': 0.2, 'cutmix_alpha': 1.0}
  values['loss'] = {'label_smoothing': 0.1}
  loss, mixing = recipe_loss(config.validate(values), [0, 1, 1], 2)
  assert mixing == {'num_classes': 2, 'mixup_alpha': 0.2, 'cutmix_alpha': 1.0, 'multi_label': False}
  assert loss is not losses.cross_entropy
  values['data'], values['loss'] = {}, {}
  assert recipe_loss(config.validate(values), [0, 1], 2) == (losses.cross_entropy, None)


@pytest.mark.slow
def test_train_script_runs_a_recipe_with_loss_options_and_mixing(tmp_path):
  """scripts/train.py end to end on a tiny generated folder: label smoothing, class weights, MixUp and CutMix."""
  import json
  import subprocess
  import sys
  from pathlib import Path
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, counts in (('train', (6, 3)), ('val', (2, 2))):
    for label, (cls, n) in enumerate(zip(('ants', 'bees'), counts)):
      (tmp_path / 'data' / split / cls).mkdir(parents=True)
      for i in range(n):
        pixels = np.clip(rng.normal(70 + 110 * label, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / 'data' / split / cls / f'{i}.png')
  recipe = tmp_path / 'recipe.yaml'
  recipe.write_text(
      'model: {arch: resnet18, weights: random}\n'
      'data: {batch_size: 4, eval_batch_size: 4, workers: 0, mixup_alpha: 0.2, cutmix_alpha: 1.0,\n'
      '       train_transforms: [{RandomResizedCrop: {size: 32}}, RandomHorizontalFlip, ToTensor,\n'
      '                          {Normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}],\n'
      '       val_transforms: [{Resize: {size: 32}}, {CenterCrop: {size: 32}}, ToTensor,\n'
      '                        {Normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}]}\n'
      'loss: {label_smoothing: 0.1, class_weights: [1.0, 3.0]}\n'
      'stages: [{name: finetune, epochs: 2, optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}]\n')
  repo = Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, str(repo / 'scripts' / 'train.py'), '--config', recipe, '--data',
                         tmp_path / 'data', '--workdir', tmp_path / 'run', '--no-progress'],
                        cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  history = json.loads((tmp_path / 'run' / 'history.json').read_text())
  assert history['config']['loss'] == {'label_smoothing': 0.1, 'class_weights': [1.0, 3.0], 'pos_weight': None}
  for row in history['epochs']:
    assert np.isfinite(row['train_loss']) and np.isfinite(row['val_loss'])
    # Accuracy counts rows, not the class weights' sum: 4 val images give quarters.
    assert 0 <= row['train_acc'] <= 1 and row['val_acc'] * 4 == round(row['val_acc'] * 4)

  bad = recipe.read_text().replace('[1.0, 3.0]', '[1.0, 3.0, 2.0]')
  recipe.write_text(bad)
  proc = subprocess.run([sys.executable, str(repo / 'scripts' / 'train.py'), '--config', recipe, '--data',
                         tmp_path / 'data', '--workdir', tmp_path / 'run2', '--no-progress'],
                        cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert 'loss.class_weights has 3 entries but the data has 2 classes' in proc.stderr
