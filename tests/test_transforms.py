"""Our PIL/NumPy transforms against torchvision's: op by op, as pipelines, and the crop sampler."""

from __future__ import annotations

import functools
import itertools
import math
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import TOL, TorchDraws, require_data, within
from tl_jax.data import transforms as T

ODD_SIZES = [(1, 1), (3, 5), (5, 3), (1000, 7), (7, 1000), (2, 300), (224, 224), (255, 257), (301, 200),
             (97, 61)]  # PIL (width, height)
MODES = ['RGB', 'L', 'RGBA', 'P', 'CMYK', '1', 'LA', 'F']
REAL_ODD_NAMES = {'36900412_92b81831ad.jpg', 'hormiga_co_por.jpg', 'ant photos.jpg', '662541407_ff8db781e7.jpg',
                  'Ant_1.jpg', 'formica.jpeg', 'trap-jaw-ant-insect-bg.jpg', 'army-ants-red-picture.jpg',
                  'Ant-1818.jpg', '854534770_31f6156383.jpg'}


def _make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
  """Smooth gradients plus noise, so that interpolation and cropping offsets show."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([(xx * (37 + 11 * c) + yy * (53 - 7 * c)) % 256 for c in range(4)], -1)
  noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
  if mode == 'F':
    return Image.fromarray((noisy[..., 0].astype(np.float32) - 60.0) / 97.0)
  if mode == '1':
    return Image.fromarray(noisy[..., 0] > 127)
  if mode == 'L':
    return Image.fromarray(noisy[..., 0])
  if mode == 'P':
    img = Image.fromarray(noisy[..., 0]).convert('P')
    img.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tobytes())
    return img
  if mode == 'LA':
    return Image.merge('LA', [Image.fromarray(np.ascontiguousarray(noisy[..., i])) for i in range(2)])
  if mode in ('RGB', 'RGBA', 'CMYK'):
    array = np.ascontiguousarray(noisy[..., :len(Image.new(mode, (1, 1)).getbands())])
    return Image.frombytes(mode, (width, height), array.tobytes())
  raise ValueError(mode)


@functools.lru_cache(maxsize=None)
def _odd_image(mode: str, width: int, height: int) -> Image.Image:
  return _make_image(mode, width, height, seed=zlib.crc32(f'{mode}-{width}x{height}'.encode()))


def _odd_cases(modes=MODES, sizes=ODD_SIZES):
  return [pytest.param(m, w, h, id=f'{m}-{w}x{h}') for m in modes for (w, h) in sizes]


@functools.lru_cache(maxsize=1)
def _real_paths() -> tuple[str, ...]:
  root = require_data()
  paths = sorted(p for p in root.glob('*/*/*') if p.suffix.lower() in ('.jpg', '.jpeg'))
  chosen = [p for i, p in enumerate(paths) if i % 40 == 0 or p.name in REAL_ODD_NAMES]
  return tuple(str(p) for p in chosen)


def _real_images():
  for path in _real_paths():
    with open(path, 'rb') as f:
      yield path, Image.open(f).convert('RGB')


def _some_real_images(n: int) -> list[Image.Image]:
  """Up to `n` real images, none when the data set is absent."""
  try:
    return [img for _, img in itertools.islice(_real_images(), n)]
  except pytest.skip.Exception:
    return []


def assert_same_pil(ours: Image.Image, ref: Image.Image):
  assert ours.mode == ref.mode
  assert ours.size == ref.size
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
  if ref.mode == 'P':
    assert ours.getpalette() == ref.getpalette()


def max_diff_vs_chw(ours_hwc: np.ndarray, ref_chw) -> float:
  ref_hwc = ref_chw.permute(1, 2, 0).numpy()
  assert ours_hwc.dtype == np.float32
  assert ours_hwc.shape == ref_hwc.shape
  return float(np.max(np.abs(ours_hwc - ref_hwc)))


def _channel_stats(num_channels: int):
  mean = tuple((T.IMAGENET_MEAN * 2)[:num_channels])
  std = tuple((T.IMAGENET_STD * 2)[:num_channels])
  return mean, std


# ---------------------------------------------------------------- deterministic ops, generated images

def test_resized_size_matches_torchvision(tvf):
  for height in range(1, 40):
    for width in range(1, 40):
      for size in (1, 7, 32, 224, 256, (5, 9)):
        expected = tvf._compute_resized_output_size((height, width), [size] if isinstance(size, int) else list(size))
        assert list(T.resized_size(height, width, size)) == expected, (height, width, size)


@pytest.mark.parametrize('mode,width,height', _odd_cases())
def test_resize_matches_torchvision(tvf, mode, width, height):
  img = _odd_image(mode, width, height)
  sizes = [1, 7, 33, (5, 9), (300, 2)]
  if max(width, height) < 10 * min(width, height):  # 256 on a 1000x7 image makes 36571x256 pixels
    sizes.append(256)
  for size in sizes:
    ref = tvf.resize(img, size if isinstance(size, int) else list(size))
    assert_same_pil(T.resize(img, size), ref)


@pytest.mark.parametrize('interpolation', [Image.NEAREST, Image.BILINEAR, Image.BICUBIC, Image.LANCZOS])
def test_resize_interpolations_match_torchvision(tvf, interpolation):
  img = _odd_image('RGB', 301, 200)
  for size in (17, 256):
    assert_same_pil(T.resize(img, size, interpolation), tvf.resize(img, size, interpolation))


@pytest.mark.parametrize('mode,width,height', _odd_cases())
def test_center_crop_matches_torchvision(tvf, mode, width, height):
  img = _odd_image(mode, width, height)
  # Smaller and larger than the image in one or both sides, odd and even margins.
  for size in (1, 2, 3, 224, (224, 5), (2, 300), (257, 256), (6, 1001), 1001):
    ref = tvf.center_crop(img, size if isinstance(size, int) else list(size))
    assert_same_pil(T.center_crop(img, size), ref)


@pytest.mark.parametrize('mode,width,height', _odd_cases())
def test_resized_crop_matches_torchvision(tvf, mode, width, height):
  img = _odd_image(mode, width, height)
  rng = np.random.default_rng(width * 1000 + height)
  boxes = [T.sample_resized_crop(rng, height, width) for _ in range(4)]
  boxes += [T.CropParams(0, 0, height, width), T.CropParams(-2, -3, height + 5, width + 1)]  # whole, overhanging
  for params in boxes:
    for size in (224, (32, 48), 1):
      ref = tvf.resized_crop(img, params.top, params.left, params.height, params.width, list(T._pair(size)))
      assert_same_pil(T.resized_crop(img, params, size), ref)


@pytest.mark.parametrize('mode,width,height', _odd_cases())
def test_hflip_matches_torchvision(tvf, mode, width, height):
  img = _odd_image(mode, width, height)
  assert_same_pil(T.hflip(img), tvf.hflip(img))


@pytest.mark.parametrize('mode,width,height', _odd_cases(sizes=[(1, 1), (3, 5), (1000, 7), (97, 61)]))
def test_to_normalized_array_matches_torchvision(tvf, mode, width, height):
  img = _odd_image(mode, width, height)
  mean, std = _channel_stats(len(img.getbands()))
  ref = tvf.normalize(tvf.to_tensor(img), list(mean), list(std))
  assert within(max_diff_vs_chw(T.to_normalized_array(img, mean, std), ref),
                'pixel_abs', 'ToTensor+Normalize, generated images')
  # One mean/std for all channels broadcasts, as in torch.
  ref = tvf.normalize(tvf.to_tensor(img), [0.5], [0.25])
  assert within(max_diff_vs_chw(T.to_normalized_array(img, (0.5,), (0.25,)), ref),
                'pixel_abs', 'ToTensor+Normalize, generated images')


def test_to_normalized_array_refuses_what_torchvision_refuses(tvf, torch):
  int_img = Image.fromarray(np.arange(12, dtype=np.int32).reshape(3, 4) * 1000)
  assert int_img.mode == 'I'
  with pytest.raises(TypeError):
    tvf.normalize(tvf.to_tensor(int_img), [0.5], [0.25])
  with pytest.raises(TypeError, match='convert'):
    T.to_normalized_array(int_img, (0.5,), (0.25,))
  gray = _odd_image('L', 5, 3)
  with pytest.raises(RuntimeError):  # torch cannot broadcast 3 means onto 1 channel in place
    tvf.normalize(tvf.to_tensor(gray), list(T.IMAGENET_MEAN), list(T.IMAGENET_STD))
  with pytest.raises(ValueError, match='3 values but the image has 1 channels'):
    T.to_normalized_array(gray)


@pytest.mark.parametrize('mode,width,height', _odd_cases(modes=['RGB', 'P', 'CMYK']))
def test_eval_transform_matches_torchvision_on_generated_images(tvt, mode, width, height):
  img = _odd_image(mode, width, height).convert('RGB')
  reference = tvt.Compose([tvt.Resize(256), tvt.CenterCrop(224), tvt.ToTensor(),
                           tvt.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
  assert within(max_diff_vs_chw(T.EvalTransform()(img), reference(img)), 'pixel_abs', 'val pipeline, generated images')


def _torchvision_train_output(tvf, img, params: T.TrainParams, size, mean, std):
  crop = params.crop
  out = tvf.resized_crop(img, crop.top, crop.left, crop.height, crop.width, [size, size])
  if params.flip:
    out = tvf.hflip(out)
  return tvf.normalize(tvf.to_tensor(out), list(mean), list(std))


@pytest.mark.parametrize('mode,width,height', _odd_cases(modes=['RGB', 'P']))
def test_train_transform_matches_torchvision_on_generated_images(tvf, mode, width, height):
  img = _odd_image(mode, width, height).convert('RGB')
  transform = T.TrainTransform()
  rng = np.random.default_rng(7)
  for _ in range(2):
    params = transform.sample(rng, img.width, img.height)
    ref = _torchvision_train_output(tvf, img, params, 224, T.IMAGENET_MEAN, T.IMAGENET_STD)
    assert within(max_diff_vs_chw(transform.apply(img, params), ref), 'pixel_abs', 'train pipeline (same params)')
  for flip in (False, True):  # both branches whatever the draws were
    params = T.TrainParams(T.sample_resized_crop(rng, img.height, img.width), flip)
    ref = _torchvision_train_output(tvf, img, params, 224, T.IMAGENET_MEAN, T.IMAGENET_STD)
    assert within(max_diff_vs_chw(transform.apply(img, params), ref), 'pixel_abs', 'train pipeline (same params)')


# ---------------------------------------------------------------- real images

def test_ops_and_pipelines_match_torchvision_on_real_images(tvf, tvt):
  eval_reference = tvt.Compose([tvt.Resize(256), tvt.CenterCrop(224), tvt.ToTensor(),
                                tvt.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
  train = T.TrainTransform()
  rng = np.random.default_rng(0)
  count = 0
  for path, img in _real_images():
    resized = T.resize(img, 256)
    assert_same_pil(resized, tvf.resize(img, 256))
    assert_same_pil(T.center_crop(resized, 224), tvf.center_crop(resized, 224))
    assert_same_pil(T.hflip(img), tvf.hflip(img))
    params = train.sample(rng, img.width, img.height)
    c = params.crop
    assert_same_pil(T.resized_crop(img, c, 224), tvf.resized_crop(img, c.top, c.left, c.height, c.width, [224, 224]))
    ref = tvf.normalize(tvf.to_tensor(img), list(T.IMAGENET_MEAN), list(T.IMAGENET_STD))
    assert within(max_diff_vs_chw(T.to_normalized_array(img), ref),
                  'pixel_abs', 'ToTensor+Normalize, real images'), path
    assert within(max_diff_vs_chw(T.EvalTransform()(img), eval_reference(img)),
                  'pixel_abs', 'val pipeline, real images'), path
    ref = _torchvision_train_output(tvf, img, params, 224, T.IMAGENET_MEAN, T.IMAGENET_STD)
    assert within(max_diff_vs_chw(train.apply(img, params), ref),
                  'pixel_abs', 'train pipeline (same params), real images'), path
    count += 1
  assert count >= 15


def test_train_transform_replays_torchvision_random_pipeline(torch, tvt):
  """Fed torch's random numbers, TrainTransform makes torchvision's training pipeline's output."""
  reference = tvt.Compose([tvt.RandomResizedCrop(224), tvt.RandomHorizontalFlip(), tvt.ToTensor(),
                           tvt.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
  transform = T.TrainTransform()
  images = [_odd_image('RGB', w, h) for (w, h) in [(301, 200), (1000, 7), (3, 5), (255, 257)]]
  images += _some_real_images(6)
  flips = set()
  for index, img in enumerate(images):
    for draw in range(3):
      torch.manual_seed(1000 * index + draw)
      expected = reference(img)
      torch.manual_seed(1000 * index + draw)
      params = transform.sample(TorchDraws(torch), img.width, img.height)
      flips.add(params.flip)
      assert within(max_diff_vs_chw(transform.apply(img, params), expected),
                    'pixel_abs', 'train pipeline (same params)')
  assert flips == {False, True}


# ---------------------------------------------------------------- the RandomResizedCrop sampler

SAMPLER_SHAPES = [(375, 500), (60, 20), (5, 7)]  # (height, width)


def _draw_ours(height, width, n, seed, sampler=T.sample_resized_crop, **kwargs):
  rng = np.random.default_rng(seed)
  return [sampler(rng, height, width, **kwargs) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _draw_torchvision(torch, tvt, height, width, n, seed, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
  torch.manual_seed(seed)
  img = Image.new('L', (width, height))
  return tuple(T.CropParams(*tvt.RandomResizedCrop.get_params(img, list(scale), list(ratio))) for _ in range(n))


def _crop_statistics(boxes, height, width) -> dict[str, np.ndarray]:
  h = np.array([b.height for b in boxes], np.float64)
  w = np.array([b.width for b in boxes], np.float64)
  top = np.array([b.top for b in boxes], np.float64)
  left = np.array([b.left for b in boxes], np.float64)
  return {
      'area_fraction': h * w / (height * width),
      'aspect_ratio': w / h,
      'center_y': (top + h / 2) / height,
      'center_x': (left + w / 2) / width,
  }


def same_distribution_pvalue(boxes_a, boxes_b, height, width) -> float:
  """Smallest two-sample KS p-value over the crop statistics (area fraction, aspect ratio, centre)."""
  stats = pytest.importorskip('scipy.stats')
  a = _crop_statistics(boxes_a, height, width)
  b = _crop_statistics(boxes_b, height, width)
  return min(stats.ks_2samp(a[k], b[k]).pvalue for k in a)


def _uniform_ratio_sampler(rng, height, width, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
  """A plausible mistake: aspect ratio uniform instead of log-uniform."""
  area = height * width
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = rng.uniform(ratio[0], ratio[1])
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      return T.CropParams(int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
  return T.CropParams(0, 0, height, width)


@pytest.mark.parametrize('height,width', SAMPLER_SHAPES)
def test_sampler_distribution_matches_torchvision(torch, tvt, height, width):
  n = 20000
  ours = _draw_ours(height, width, n, seed=1)
  theirs = _draw_torchvision(torch, tvt, height, width, n, seed=2)
  assert same_distribution_pvalue(ours, theirs, height, width) > 1e-3


def test_distribution_check_rejects_a_wrong_sampler(torch, tvt):
  height, width = 375, 500
  n = 20000
  wrong = _draw_ours(height, width, n, seed=1, sampler=_uniform_ratio_sampler)
  theirs = _draw_torchvision(torch, tvt, height, width, n, seed=2)
  assert same_distribution_pvalue(wrong, theirs, height, width) < 1e-3


@pytest.mark.parametrize('height,width', SAMPLER_SHAPES + [(224, 224), (7, 1000), (1, 1)])
def test_sampler_replays_torchvision_draw_for_draw(torch, tvt, height, width):
  """With torch's random numbers, our sampler returns exactly get_params's boxes."""
  for seed in range(500):
    torch.manual_seed(seed)
    expected = T.CropParams(*tvt.RandomResizedCrop.get_params(Image.new('L', (width, height)),
                                                              [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0]))
    torch.manual_seed(seed)
    assert T.sample_resized_crop(TorchDraws(torch), height, width) == expected, seed


CONSTRAINT_CASES = [
    # (height, width, scale, ratio)
    (1, 1, (0.08, 1.0), (3 / 4, 4 / 3)),
    (5, 3, (0.08, 1.0), (3 / 4, 4 / 3)),
    (7, 1000, (0.08, 1.0), (3 / 4, 4 / 3)),   # every try too tall: fallback, ratio clamped
    (1000, 7, (0.08, 1.0), (3 / 4, 4 / 3)),   # every try too wide: fallback
    (5, 1000, (0.08, 1.0), (0.4, 2.5)),       # fallback width round(12.5) = 12 (half to even)
    (64, 64, (2.0, 3.0), (3 / 4, 4 / 3)),     # area larger than the image: whole image
    (300, 200, (0.5, 0.5), (1.0, 1.0)),       # degenerate ranges
    (375, 500, (0.08, 1.0), (3 / 4, 4 / 3)),
]


@pytest.mark.parametrize('height,width,scale,ratio', CONSTRAINT_CASES)
def test_sampled_boxes_lie_inside_the_image(height, width, scale, ratio):
  rng = np.random.default_rng(3)
  for _ in range(500):
    box = T.sample_resized_crop(rng, height, width, scale, ratio)
    assert 0 < box.height <= height and 0 < box.width <= width
    assert 0 <= box.top <= height - box.height and 0 <= box.left <= width - box.width


@pytest.mark.parametrize('height,width,scale,ratio', [CONSTRAINT_CASES[i] for i in (0, 2, 3, 4, 5)])
def test_sampler_fallback_equals_torchvision(torch, tvt, height, width, scale, ratio):
  """Where no try can fit (or every box is the whole image) the result is deterministic."""
  rng = np.random.default_rng(4)
  ours = {T.sample_resized_crop(rng, height, width, scale, ratio) for _ in range(50)}
  theirs = set(_draw_torchvision(torch, tvt, height, width, 50, seed=5, scale=scale, ratio=ratio))
  assert len(theirs) == 1
  assert ours == theirs


def test_same_seed_same_params():
  transform = T.TrainTransform()
  draws_a = [transform.sample(np.random.default_rng(11), 500, 375) for _ in range(3)]
  draws_b = [transform.sample(np.random.default_rng(11), 500, 375) for _ in range(3)]
  assert draws_a == draws_b
  rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(12)
  seq_a = [transform.sample(rng_a, 500, 375) for _ in range(20)]
  seq_b = [transform.sample(rng_b, 500, 375) for _ in range(20)]
  assert seq_a != seq_b
  img = _odd_image('RGB', 301, 200)
  out_call = transform(img, np.random.default_rng(5))
  out_apply = transform.apply(img, transform.sample(np.random.default_rng(5), img.width, img.height))
  np.testing.assert_array_equal(out_call, out_apply)


@pytest.mark.parametrize('p', [0.0, 0.3, 0.5, 1.0])
def test_hflip_frequency(p):
  n = 20000
  rng = np.random.default_rng(int(p * 10))
  frequency = np.mean([T.sample_hflip(rng, p) for _ in range(n)])
  assert abs(frequency - p) <= 5 * math.sqrt(p * (1 - p) / n)
