"""Test-time augmentation (tl_jax.inference): the views equal torchvision's FiveCrop / hflip pixel for
pixel, and the averaged probabilities equal torch's on a converted model."""

import numpy as np
import pytest
from PIL import Image

from helpers import random_torchvision_model, rel_err, state_dict_numpy, within
from tl_jax import checkpoint, evaluate, inference, predict
from tl_jax.convert import torch_to_flax
from tl_jax.data.augment import build_pipeline

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _val_pipeline(resize=36, crop=32):
  return build_pipeline([{'Resize': {'size': resize}}, {'CenterCrop': {'size': crop}}, {'ToTensor': {}},
                         {'Normalize': {'mean': list(MEAN), 'std': list(STD)}}])


def _images(n=3, seed=0):
  rng = np.random.default_rng(seed)
  sizes = [(53, 41), (40, 67), (37, 37), (90, 45)]
  return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes[:n]]


def _torch_views(tvt, torch, resize, crop, mode):
  """torchvision's recipe: Resize then FiveCrop (each crop ToTensor + Normalize), or the val crop and its mirror."""
  to_array = tvt.Compose([tvt.ToTensor(), tvt.Normalize(MEAN, STD)])
  if mode == 'five-crop':
    return tvt.Compose([tvt.Resize(resize), tvt.FiveCrop(crop),
                        tvt.Lambda(lambda crops: torch.stack([to_array(c) for c in crops]))])
  val = tvt.Compose([tvt.Resize(resize), tvt.CenterCrop(crop)])
  from torchvision.transforms import functional as tvf
  return lambda img: torch.stack([to_array(val(img)), to_array(tvf.hflip(val(img)))])


@pytest.mark.parametrize('mode', ['five-crop', 'flip'])
@pytest.mark.parametrize('resize, crop', [(36, 32), (40, [32, 24]), ([44, 50], 31)])
def test_views_equal_torchvisions_pixel_for_pixel(tvt, torch, mode, resize, crop):
  pipeline = build_pipeline([{'Resize': {'size': resize}}, {'CenterCrop': {'size': crop}}, {'ToTensor': {}},
                             {'Normalize': {'mean': list(MEAN), 'std': list(STD)}}])
  reference = _torch_views(tvt, torch, resize, crop, mode)
  transform = inference.tta_transform(pipeline, mode)
  for img in _images(4):
    ours = transform(img)
    theirs = reference(img).numpy().transpose(0, 2, 3, 1)   # (V, C, H, W) -> (V, H, W, C)
    assert ours.shape == theirs.shape == ((5 if mode == 'five-crop' else 2),) + ours.shape[1:]
    err = float(np.max(np.abs(ours - theirs)))
    assert within(err, 'pixel_abs', f'TTA {mode} views vs torchvision (abs)'), err
  # The five crops are not all the same (a broken offset would give five centre crops).
  if mode == 'five-crop':
    assert len({v.tobytes() for v in ours}) == 5


def test_five_crop_keeps_the_ops_after_the_center_crop(tvt, torch):
  """An op after CenterCrop (here a Grayscale) runs on every crop, as it would after FiveCrop."""
  spec = [{'Resize': {'size': 40}}, {'CenterCrop': {'size': 30}}, {'Grayscale': {'num_output_channels': 3}},
          {'ToTensor': {}}, {'Normalize': {'mean': list(MEAN), 'std': list(STD)}}]
  to_array = tvt.Compose([tvt.Grayscale(3), tvt.ToTensor(), tvt.Normalize(MEAN, STD)])
  reference = tvt.Compose([tvt.Resize(40), tvt.FiveCrop(30),
                           tvt.Lambda(lambda crops: torch.stack([to_array(c) for c in crops]))])
  img = _images(1)[0]
  ours = inference.tta_transform(build_pipeline(spec), 'five-crop')(img)
  err = float(np.max(np.abs(ours - reference(img).numpy().transpose(0, 2, 3, 1))))
  assert within(err, 'pixel_abs', 'TTA five-crop with an op after the crop vs torchvision (abs)'), err


def test_bad_tta_is_one_line():
  no_crop = build_pipeline([{'Resize': {'size': [32, 32]}}, {'ToTensor': {}},
                            {'Normalize': {'mean': list(MEAN), 'std': list(STD)}}])
  with pytest.raises(inference.TTAError,
                     match=r"CenterCrop by FiveCrop.*\['Resize', 'ToTensor', 'Normalize'\].*--tta flip"):
    inference.tta_transform(no_crop, 'five-crop')
  assert inference.tta_transform(no_crop, 'flip')(_images(1)[0]).shape == (2, 32, 32, 3)
  with pytest.raises(inference.TTAError, match="'ten-crop' is not known"):
    inference.tta_transform(no_crop, 'ten-crop')
  random = build_pipeline([{'RandomResizedCrop': {'size': 32}}, {'ToTensor': {}},
                           {'Normalize': {'mean': list(MEAN), 'std': list(STD)}}])
  with pytest.raises(inference.TTAError, match='deterministic'):
    inference.tta_transform(random, 'flip')
  # A crop larger than the resized image: torchvision's FiveCrop refuses it, so do we (CenterCrop would pad).
  too_big = build_pipeline([{'Resize': {'size': [20, 20]}}, {'CenterCrop': {'size': 24}}, {'ToTensor': {}},
                            {'Normalize': {'mean': list(MEAN), 'std': list(STD)}}])
  with pytest.raises(inference.TTAError, match='24x24 is bigger than the resized image 20x20'):
    inference.tta_transform(too_big, 'five-crop')(_images(1)[0])


# ------------------------------------------------------------------ averaged probabilities vs torch


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """A random torchvision resnet18 (randomised BN stats) and the same weights as a tl_jax checkpoint
  that reads 32-pixel crops, with images on disk."""
  torch = pytest.importorskip('torch')
  root = tmp_path_factory.mktemp('tta')
  tmodel = random_torchvision_model('resnet18', 3).eval()
  variables = torch_to_flax(state_dict_numpy(tmodel), 'resnet18')
  metadata = checkpoint.make_metadata('resnet18', 3, {'resize_size': 36, 'crop_size': 32, 'mean': list(MEAN),
                                                      'std': list(STD)}, ['a', 'b', 'c'])
  checkpoint.save_model(root / 'ckpt', variables, metadata)
  paths = []
  for i, img in enumerate(_images(3, seed=5)):
    paths.append(root / f'img{i}.png')
    img.save(paths[-1])
  return {'torch': torch, 'model': tmodel, 'ckpt': root / 'ckpt', 'paths': paths, 'root': root}


@pytest.mark.parametrize('mode', ['five-crop', pytest.param('flip', marks=pytest.mark.slow)])
def test_averaged_probabilities_equal_torchs(converted, tvt, mode):
  torch, tmodel = converted['torch'], converted['model']
  reference = _torch_views(tvt, torch, 36, 32, mode)
  with torch.no_grad():
    views = torch.stack([reference(Image.open(p).convert('RGB')) for p in converted['paths']])   # (B, V, C, H, W)
    b, v = views.shape[:2]
    probs = torch.softmax(tmodel(views.flatten(0, 1)), dim=-1).reshape(b, v, -1).mean(dim=1).numpy()
  predictions = predict.predict_files(converted['ckpt'], converted['paths'], tta=mode)
  err = rel_err(np.array([p.probs for p in predictions]), probs)
  assert within(err, 'logits_rel', f'TTA {mode} mean softmax vs torch, resnet18 (rel)'), err
  assert [p.class_index for p in predictions] == probs.argmax(axis=1).tolist()
  assert all(p.logits is None for p in predictions)   # one set per view: left out


@pytest.mark.slow
def test_evaluate_with_tta_scores_the_mean_softmax(converted, tvt):
  """evaluate.py --tta five-crop: the loss is the NLL of torch's mean softmax over the five crops."""
  torch, tmodel = converted['torch'], converted['model']
  data = converted['root'] / 'data'
  for label, path in zip('abc', converted['paths']):
    (data / label).mkdir(parents=True, exist_ok=True)
    Image.open(path).save(data / label / path.name)
  report = evaluate.evaluate_checkpoint(converted['ckpt'], data, batch_size=2, workers=0, tta='five-crop',
                                        out_dir=converted['root'] / 'out')
  reference = _torch_views(tvt, torch, 36, 32, 'five-crop')
  paths = sorted(data.glob('*/*.png'))
  with torch.no_grad():
    views = torch.stack([reference(Image.open(p).convert('RGB')) for p in paths])
    probs = torch.softmax(tmodel(views.flatten(0, 1)), dim=-1).reshape(len(paths), 5, -1).mean(dim=1)
  labels = torch.tensor([ord(p.parent.name) - ord('a') for p in paths])
  ref_loss = float(torch.nn.functional.nll_loss(probs.double().log(), labels))
  err = abs(report.metrics['loss'] - ref_loss)
  assert within(err, 'eval_loss_abs', 'evaluate.py --tta five-crop NLL vs torch (abs)'), err
  assert report.info['tta'] == 'five-crop' and report.info['tta_views'] == 5
  assert 'tta:        five-crop (mean softmax over 5 views)' in evaluate.format_report(report)
