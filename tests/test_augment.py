"""Transforms by torchvision name against torchvision: each op, whole pipelines, samplers, spec errors."""

from __future__ import annotations

import functools
import json
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import TorchDraws, data_root, require_data, within
from tl_jax.data import augment as A
from tl_jax.data import transforms as T
# The material's augmentation list and its val list.
from benchmarks.loader import MATERIAL_TRAIN as FULL_TRAIN, MATERIAL_VAL as FULL_VAL
from tl_jax.data.folder import ImageFolder
from tl_jax.data.loader import Loader
from tl_jax.weights import Preprocessing

TAIL = [{'ToTensor': {}}, {'Normalize': {'mean': [0.5], 'std': [0.25]}}]

SIZES = [(301, 200), (97, 61), (255, 257), (40, 1000), (7, 9)]  # PIL (width, height)


def _make_image(width: int, height: int, seed: int, mode: str = 'RGB') -> Image.Image:
  """Smooth gradients plus noise, saturated enough that colour ops show."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([(xx * (37 + 11 * c) + yy * (53 - 7 * c)) % 256 for c in range(3)], -1)
  array = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
  img = Image.fromarray(array)
  return img if mode == 'RGB' else img.convert(mode)


@functools.lru_cache(maxsize=None)
def _generated(width: int, height: int, mode: str = 'RGB') -> Image.Image:
  return _make_image(width, height, zlib.crc32(f'{width}x{height}'.encode()), mode)


@functools.lru_cache(maxsize=1)
def _real() -> tuple[Image.Image, ...]:
  root = data_root()
  paths = sorted(p for p in root.glob('*/*/*') if p.suffix.lower() in ('.jpg', '.jpeg'))[::50]
  out = []
  for path in paths:
    with open(path, 'rb') as f:
      out.append(Image.open(f).convert('RGB'))
  return tuple(out)


def _images(modes=('RGB',)) -> list[tuple[str, Image.Image]]:
  images = [(f'generated {m}', _generated(w, h, m)) for m in modes for (w, h) in SIZES]
  return images + [('real', img) for img in _real()]


def _levels(ours: Image.Image, ref: Image.Image) -> float:
  """Max |ours - ref| in 8-bit levels; inf when the mode or size differs."""
  if ours.mode != ref.mode or ours.size != ref.size:
    return float('inf')
  return float(np.max(np.abs(np.asarray(ours, np.int32) - np.asarray(ref, np.int32)), initial=0))


def _tv_kwargs(tvt, kwargs: dict) -> dict:
  out = dict(kwargs)
  if 'interpolation' in out:
    out['interpolation'] = tvt.InterpolationMode(out['interpolation'])
  return out


# (name, kwargs): every op, with its arguments varied.
OP_CASES = [
    ('Resize', {'size': 64}),
    ('Resize', {'size': [50, 33], 'interpolation': 'bicubic'}),
    ('Resize', {'size': 40, 'max_size': 60, 'interpolation': 'nearest'}),
    ('Resize', {'size': [31, 47], 'interpolation': 'lanczos'}),
    ('CenterCrop', {'size': 33}),
    ('CenterCrop', {'size': [300, 20]}),
    ('RandomCrop', {'size': 5}),
    ('RandomCrop', {'size': [6, 4], 'padding': 3}),
    ('RandomCrop', {'size': [50, 60], 'padding': [2, 5], 'pad_if_needed': True, 'fill': [10, 200, 30]}),
    ('RandomCrop', {'size': 64, 'padding': [1, 2, 3, 4], 'pad_if_needed': True, 'padding_mode': 'reflect'}),
    ('RandomCrop', {'size': 70, 'pad_if_needed': True, 'padding_mode': 'edge'}),
    ('RandomCrop', {'size': 9, 'padding': 4, 'padding_mode': 'symmetric'}),
    ('RandomResizedCrop', {'size': 32}),
    ('RandomResizedCrop', {'size': [24, 40], 'scale': [0.5, 0.9], 'ratio': [0.5, 2.0], 'interpolation': 'bicubic'}),
    ('RandomHorizontalFlip', {}),
    ('RandomVerticalFlip', {'p': 0.7}),
    ('RandomRotation', {'degrees': 30}),
    ('RandomRotation', {'degrees': [-170, 170], 'interpolation': 'bilinear', 'expand': True, 'fill': [255, 0, 9]}),
    ('RandomRotation', {'degrees': [80, 100], 'center': [3, 4.5], 'fill': 128}),
    ('RandomRotation', {'degrees': 0.2}),
    ('ColorJitter', {'brightness': 0.5}),
    ('ColorJitter', {'contrast': 0.5}),
    ('ColorJitter', {'saturation': 0.5}),
    ('ColorJitter', {'hue': 0.5}),
    ('ColorJitter', {'brightness': [0.2, 1.8], 'contrast': 0.9, 'saturation': [0, 3], 'hue': [-0.2, 0.4]}),
    ('RandomGrayscale', {'p': 0.5}),
    ('Grayscale', {}),
    ('Grayscale', {'num_output_channels': 3}),
]


@pytest.mark.parametrize('name,kwargs', OP_CASES, ids=[f'{n}-{i}' for i, (n, _) in enumerate(OP_CASES)])
def test_op_replays_torchvision(torch, tvt, name, kwargs):
  """Fed torch's random numbers, our sample + apply gives torchvision's output pixel for pixel."""
  op = A.build_pipeline([{name: kwargs}] + TAIL).ops[0]
  reference = getattr(tvt, name)(**_tv_kwargs(tvt, kwargs))
  three_fills = isinstance(kwargs.get('fill'), list)  # one fill per channel: RGB only
  images = _images() if three_fills else _images(modes=('RGB', 'L'))
  for index, (what, img) in enumerate(images):
    for draw in range(3):
      torch.manual_seed(100 * index + draw)
      expected = reference(img)
      torch.manual_seed(100 * index + draw)
      params = op.sample(TorchDraws(torch), img.width, img.height)
      out = op.apply(img, params)
      assert within(_levels(out, expected), 'pil_levels', f'{name}, {what} images (torch draws)'), (what, params)
      assert op.size_after(img.width, img.height, params) == out.size


def test_gaussian_blur_matches_torchvision_within_a_level(torch, tvt, tvf):
  for kwargs in ({'kernel_size': 5}, {'kernel_size': [3, 7], 'sigma': [0.5, 3.0]}, {'kernel_size': 9, 'sigma': 1.3}):
    op = A.build_pipeline([{'GaussianBlur': kwargs}] + TAIL).ops[0]
    reference = tvt.GaussianBlur(**kwargs)
    for index, (what, img) in enumerate(_images(modes=('RGB', 'L'))[:12]):
      if img.width <= 5 or img.height <= 5:
        continue  # reflect padding needs the image larger than half the kernel, in torch too
      torch.manual_seed(index)
      expected = reference(img)
      torch.manual_seed(index)
      sigma = op.sample(TorchDraws(torch), img.width, img.height)
      out = op.apply(img, sigma)
      # And with the same sigma through torchvision's functional op.
      assert _levels(tvf.gaussian_blur(img, list(A.F._pair(op.kernel_size)), [sigma, sigma]), expected) == 0
      assert within(_levels(out, expected), 'blur_levels', f'GaussianBlur, {what} images')
      differing = np.mean(np.asarray(out) != np.asarray(expected))
      assert within(differing, 'blur_fraction', f'GaussianBlur, fraction of pixels off by one, {what} images')


def test_ops_match_torchvision_functional_with_our_params(tvf):
  """The same parameters through torchvision.transforms.functional (no torch RNG involved)."""
  rng = np.random.default_rng(0)
  jitter = A.build_pipeline([{'ColorJitter': {'brightness': 0.9, 'contrast': 0.9, 'saturation': 0.9,
                                              'hue': 0.5}}] + TAIL).ops[0]
  rotation = A.build_pipeline([{'RandomRotation': {'degrees': 180, 'expand': True, 'fill': 7}}] + TAIL).ops[0]
  crop = A.build_pipeline([{'RandomCrop': {'size': 50, 'padding': [3, 1], 'pad_if_needed': True,
                                           'padding_mode': 'symmetric'}}] + TAIL).ops[0]
  for what, img in _images():
    for _ in range(3):
      p = jitter.sample(rng, img.width, img.height)
      expected = img
      adjust = {0: (tvf.adjust_brightness, p.brightness), 1: (tvf.adjust_contrast, p.contrast),
                2: (tvf.adjust_saturation, p.saturation), 3: (tvf.adjust_hue, p.hue)}
      for index in p.order:
        fn, factor = adjust[index]
        expected = fn(expected, factor)
      assert within(_levels(jitter.apply(img, p), expected), 'pil_levels', f'ColorJitter, {what} images (our draws)')
      angle = rotation.sample(rng, img.width, img.height)
      assert within(_levels(rotation.apply(img, angle), tvf.rotate(img, angle, expand=True, fill=7)),
                    'pil_levels', f'RandomRotation expand, {what} images (our draws)')
      box = crop.sample(rng, img.width, img.height)
      padded = tvf.pad(img, [3, 1], padding_mode='symmetric')
      if padded.width < 50:
        padded = tvf.pad(padded, [50 - padded.width, 0], padding_mode='symmetric')
      if padded.height < 50:
        padded = tvf.pad(padded, [0, 50 - padded.height], padding_mode='symmetric')
      expected = tvf.crop(padded, box.top, box.left, box.height, box.width)
      assert within(_levels(crop.apply(img, box), expected), 'pil_levels', f'RandomCrop padded, {what} images')


def test_hue_lookup_table_equals_torchvision_numpy_shift(tvf):
  img = _generated(97, 61)
  for factor in np.linspace(-0.5, 0.5, 41):
    assert _levels(T.adjust_hue(img, float(factor)), tvf.adjust_hue(img, float(factor))) == 0


def _max_abs_vs_chw(ours_hwc, ref_chw) -> float:
  return float(np.max(np.abs(ours_hwc - np.transpose(ref_chw.numpy(), (1, 2, 0)))))


@pytest.mark.parametrize('spec', [FULL_TRAIN, FULL_VAL], ids=['material-train', 'material-val'])
def test_material_pipelines_replay_torchvision(torch, tvt, spec):
  """The material's lists, random draws included, give torchvision's Compose output."""
  pipeline = A.build_pipeline(spec)
  reference = tvt.Compose([getattr(tvt, next(iter(e)))(**_tv_kwargs(tvt, next(iter(e.values())))) for e in spec])
  grays = set()
  for index, (what, img) in enumerate(_images()):
    for draw in range(4):
      torch.manual_seed(1000 * index + draw)
      expected = reference(img)
      torch.manual_seed(1000 * index + draw)
      params = pipeline.sample(TorchDraws(torch), img.width, img.height)
      out = pipeline.apply(img, params)
      assert out.shape == tuple(expected.shape[1:]) + (3,) and out.shape[:2] == pipeline.output_size
      assert within(_max_abs_vs_chw(out, expected), 'pixel_abs', f'material pipeline, {what} images (torch draws)')
      if not pipeline.deterministic:
        grays.add(params[-1])
  assert pipeline.deterministic or grays == {False, True}


@pytest.mark.parametrize('pre', [Preprocessing(), Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4),
                                                                resize_size=80, crop_size=64)])
def test_tutorial_specs_equal_train_and_eval_transform(pre):
  train = A.build_pipeline(A.tutorial_train_spec(pre))
  val = A.build_pipeline(A.tutorial_val_spec(pre), where='data.val_transforms')
  old_train = T.TrainTransform(crop_size=pre.crop_size, mean=pre.mean, std=pre.std)
  old_val = T.EvalTransform(resize_size=pre.resize_size, crop_size=pre.crop_size, mean=pre.mean, std=pre.std)
  assert val.deterministic and not train.deterministic
  assert train.output_size == val.output_size == (pre.crop_size, pre.crop_size)
  for seed, (_, img) in enumerate(_images()):
    np.testing.assert_array_equal(train(img, np.random.default_rng([seed, 3])),
                                  old_train(img, np.random.default_rng([seed, 3])))
    np.testing.assert_array_equal(val(img, None), old_val(img))


def test_sample_then_apply_is_call_and_reproducible():
  pipeline = A.build_pipeline(FULL_TRAIN)
  img = _generated(301, 200)
  draws = [pipeline.sample(np.random.default_rng([0, 1, 2]), img.width, img.height) for _ in range(2)]
  assert draws[0] == draws[1]
  np.testing.assert_array_equal(pipeline(img, np.random.default_rng([0, 1, 2])), pipeline.apply(img, draws[0]))
  assert pipeline.sample(np.random.default_rng([0, 1, 3]), img.width, img.height) != draws[0]
  with pytest.raises(ValueError, match='needs a numpy Generator'):
    pipeline(img, None)


def test_loader_batches_through_pipelines():
  samples = ImageFolder(require_data() / 'val').samples[::40]
  train = Loader(samples, A.build_pipeline(FULL_TRAIN), 4, shuffle=True, seed=3, workers=2)
  first = [batch.images for batch in train.epoch(1)]
  again = [batch.images for batch in train.epoch(1)]
  assert first[0].shape == (4, 192, 192, 3)
  for a, b in zip(first, again, strict=True):  # the same draws whatever the thread timing
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], next(iter(train.epoch(2))).images)
  val = Loader(samples, A.build_pipeline(FULL_VAL, where='data.val_transforms'), 4, shuffle=False, workers=0)
  assert next(iter(val.epoch(0))).images.shape == (4, 96, 96, 3)


def test_apply_uint8_then_finish_equals_apply():
  pipeline = A.build_pipeline(FULL_TRAIN)
  rng = np.random.default_rng(0)
  for _, img in _images():
    params = pipeline.sample(rng, img.width, img.height)
    images_uint8 = pipeline.apply_uint8(img, params)
    assert images_uint8.dtype == np.uint8 and images_uint8.shape == (192, 192, 3)
    np.testing.assert_array_equal(pipeline.finish_uint8(images_uint8[None])[0], pipeline.apply(img, params))
  rgba = _generated(30, 20, 'RGBA')
  with pytest.raises(ValueError, match='mode'):
    pipeline.apply_uint8(rgba, pipeline.sample(rng, 30, 20))


def test_to_spec_round_trips_through_json():
  for spec in (FULL_TRAIN, FULL_VAL, [{name: kwargs} for name, kwargs in OP_CASES] + TAIL):
    pipeline = A.build_pipeline(spec)
    saved = json.loads(json.dumps(pipeline.to_spec()))
    assert A.build_pipeline(saved) == pipeline
  assert A.build_pipeline(FULL_VAL).mean == (0.5, 0.5, 0.5)


def test_output_size():
  assert A.build_pipeline(FULL_TRAIN).output_size == (192, 192)
  assert A.build_pipeline(FULL_VAL).output_size == (96, 96)
  assert A.build_pipeline([{'Resize': {'size': 64}}] + TAIL).output_size is None
  assert A.build_pipeline([{'Resize': {'size': 64}}, {'CenterCrop': {'size': [3, 4]}}] + TAIL).output_size == (3, 4)
  assert A.build_pipeline([{'CenterCrop': {'size': 9}}, {'RandomRotation': {'degrees': 9, 'expand': True}}]
                          + TAIL).output_size is None


def test_rotated_size_is_pils():
  rng = np.random.default_rng(0)
  for angle in list(rng.uniform(-360, 360, 200)) + [0, 90, 180, 270, -90, 45, 360]:
    for (w, h), center in (((31, 17), None), ((8, 8), None), ((40, 13), (3, 4.5))):
      img = Image.new('L', (w, h))
      assert T.rotated_size(w, h, float(angle), True, center) == img.rotate(float(angle), expand=True,
                                                                            center=center).size


# ---------------------------------------------------------------- samplers follow torchvision's distributions

N_DRAWS = 20000


def _ours(op_spec, n=N_DRAWS, size=(300, 200), sampler=None):
  op = A.build_pipeline([op_spec] + TAIL).ops[0]
  sample = sampler or op.sample
  rng = np.random.default_rng(123)
  return [sample(rng, *size) for _ in range(n)]


def _chi2_same(a, b) -> float:
  """p-value that two samples of categories come from one distribution (contingency chi-square)."""
  stats = pytest.importorskip('scipy.stats')
  categories = sorted(set(a) | set(b))
  table = np.array([[a.count(c) for c in categories], [b.count(c) for c in categories]])
  return float(stats.chi2_contingency(table).pvalue)


def _ks_same(a, b) -> float:
  stats = pytest.importorskip('scipy.stats')
  return float(stats.ks_2samp(np.asarray(a, np.float64), np.asarray(b, np.float64)).pvalue)


@functools.lru_cache(maxsize=None)
def _torch_jitter(torch, tvt, n=N_DRAWS):
  torch.manual_seed(5)
  ranges = [(0.5, 1.5), (0.1, 1.9), (0.0, 2.0), (-0.5, 0.5)]
  return [tvt.ColorJitter.get_params(*ranges) for _ in range(n)]


def test_color_jitter_sampler_follows_torchvision(torch, tvt):
  theirs = _torch_jitter(torch, tvt)
  spec = {'ColorJitter': {'brightness': 0.5, 'contrast': 0.9, 'saturation': 1.0, 'hue': 0.5}}
  ours = _ours(spec)
  their_orders = [tuple(t[0].tolist()) for t in theirs]
  assert len(set(their_orders)) == 24
  assert _chi2_same([p.order for p in ours], their_orders) > 1e-3
  for k, name in enumerate(('brightness', 'contrast', 'saturation', 'hue')):
    assert _ks_same([getattr(p, name) for p in ours], [t[k + 1] for t in theirs]) > 1e-3, name

  def cyclic_order(rng, width, height):
    """A plausible mistake: a random starting point in the fixed order (4 orders, not 24)."""
    start = int(rng.integers(0, 4))
    factors = [float(rng.uniform(lo, hi)) for lo, hi in ((0.5, 1.5), (0.1, 1.9), (0.0, 2.0), (-0.5, 0.5))]
    return A.JitterParams(tuple((start + i) % 4 for i in range(4)), *factors)

  wrong = _ours(spec, sampler=cyclic_order)
  assert _chi2_same([p.order for p in wrong], their_orders) < 1e-3


def test_rotation_sampler_follows_torchvision(torch, tvt):
  torch.manual_seed(6)
  theirs = [tvt.RandomRotation.get_params([-0.2, 0.2]) for _ in range(N_DRAWS)]
  assert _ks_same(_ours({'RandomRotation': {'degrees': 0.2}}), theirs) > 1e-3
  wrong = _ours({'RandomRotation': {'degrees': 0.2}}, sampler=lambda rng, w, h: float(rng.uniform(0, 0.2)))
  assert _ks_same(wrong, theirs) < 1e-3
  torch.manual_seed(7)
  theirs = [tvt.RandomRotation.get_params([10.0, 50.0]) for _ in range(N_DRAWS)]
  assert _ks_same(_ours({'RandomRotation': {'degrees': [10, 50]}}), theirs) > 1e-3


def test_random_crop_offsets_follow_torchvision(torch, tvt):
  size = (13, 9)  # PIL (width, height): offsets 0..4 in x, 0..3 in y
  img = Image.new('L', size)
  torch.manual_seed(8)
  theirs = [tuple(tvt.RandomCrop.get_params(img, (6, 9))[:2]) for _ in range(N_DRAWS)]
  ours = [(c.top, c.left) for c in _ours({'RandomCrop': {'size': [6, 9]}}, size=size)]
  assert _chi2_same(ours, theirs) > 1e-3

  def off_by_one(rng, width, height):
    return T.CropParams(int(rng.integers(0, height - 6)), int(rng.integers(0, width - 9)), 6, 9)

  wrong = [(c.top, c.left) for c in _ours({'RandomCrop': {'size': [6, 9]}}, size=size, sampler=off_by_one)]
  assert _chi2_same(wrong, theirs) < 1e-3


@pytest.mark.parametrize('name', ['RandomGrayscale', 'RandomHorizontalFlip', 'RandomVerticalFlip'])
def test_coin_ops_follow_p(name):
  stats = pytest.importorskip('scipy.stats')
  for p in (0.0, 0.2, 0.5, 1.0):
    hits = sum(_ours({name: {'p': p}}))
    assert stats.binomtest(hits, N_DRAWS, p).pvalue > 1e-3 if 0 < p < 1 else hits == p * N_DRAWS
  wrong = sum(_ours({name: {'p': 0.2}}, sampler=lambda rng, w, h: bool(rng.random() > 0.2)))
  assert stats.binomtest(wrong, N_DRAWS, 0.2).pvalue < 1e-3


def test_gaussian_blur_sigma_follows_torchvision(torch, tvt):
  torch.manual_seed(9)
  theirs = [tvt.GaussianBlur.get_params(0.1, 2.0) for _ in range(N_DRAWS)]
  assert _ks_same(_ours({'GaussianBlur': {'kernel_size': 3}}), theirs) > 1e-3
  wrong = _ours({'GaussianBlur': {'kernel_size': 3}}, sampler=lambda rng, w, h: float(rng.uniform(0.1, 2.1)))
  assert _ks_same(wrong, theirs) < 1e-3


# ---------------------------------------------------------------- bad specs

# (spec entry, whether torchvision refuses it too (False: we refuse on purpose), words the message must contain)
BAD_ARGS = [
    ({'ColorJitter': {'brightness': -0.5}}, True, ['[0].ColorJitter.brightness', '-0.5', 'non-negative']),
    ({'ColorJitter': {'hue': 0.7}}, True, ['[0].ColorJitter.hue', '0.7', '[-0.5, 0.5]']),
    ({'ColorJitter': {'contrast': [1.5, 0.5]}}, True, ['ColorJitter.contrast', 'ordered']),
    ({'RandomRotation': {'degrees': -3}}, True, ['[0].RandomRotation.degrees', '-3', 'non-negative']),
    ({'RandomRotation': {'degrees': [1, 2, 3]}}, True, ['RandomRotation.degrees', '[min, max]']),
    ({'RandomRotation': {'degrees': 5, 'center': [1]}}, True, ['RandomRotation.center', '[x, y]']),
    ({'GaussianBlur': {'kernel_size': 4}}, True, ['[0].GaussianBlur.kernel_size', '4', 'odd']),
    ({'GaussianBlur': {'kernel_size': 3, 'sigma': -1.0}}, True, ['GaussianBlur.sigma', 'positive']),
    ({'GaussianBlur': {'kernel_size': 3, 'sigma': [2.0, 1.0]}}, True, ['GaussianBlur.sigma', '0 < min <= max']),
    ({'Grayscale': {'num_output_channels': 2}}, True, ['Grayscale.num_output_channels', '2', 'allowed: 1, 3']),
    ({'Resize': {'size': [1, 2, 3]}}, True, ['[0].Resize.size', '1 or 2 values']),
    ({'Resize': {'size': [10, 20], 'max_size': 30}}, True, ['Resize.max_size', 'an int']),
    ({'Resize': {'size': 10, 'max_size': 10}}, True, ['Resize.max_size', 'greater than size 10']),
    ({'Resize': {'size': 10, 'interpolation': 'cubic'}}, True, ['Resize.interpolation', "'cubic'", 'bicubic']),
    ({'RandomCrop': {'size': 4, 'padding': 1, 'padding_mode': 'wrap'}}, True, ['RandomCrop.padding_mode', 'reflect']),
    ({'RandomCrop': {'size': 4, 'padding': [1, 2, 3]}}, True, ['RandomCrop.padding', '1, 2 or 4']),
    ({'RandomResizedCrop': {'size': 4, 'scale': [1.0, 0.5]}}, True, ['RandomResizedCrop.scale', 'min <= max']),
    ({'RandomGrayscale': {'p': 1.5}}, False, ['[0].RandomGrayscale.p', '1.5', '[0, 1]']),
    ({'RandomHorizontalFlip': {'p': -0.1}}, False, ['RandomHorizontalFlip.p', '[0, 1]']),
    ({'RandomCrop': {'size': 0}}, False, ['RandomCrop.size', 'positive']),  # torchvision returns an empty image
]


@pytest.mark.filterwarnings('ignore:Scale and ratio should be:UserWarning')
@pytest.mark.parametrize('entry,torchvision_refuses,words', BAD_ARGS,
                         ids=[f'{next(iter(e))}-{i}' for i, (e, _, _) in enumerate(BAD_ARGS)])
def test_bad_arguments_name_key_value_and_rule(torch, tvt, entry, torchvision_refuses, words):
  with pytest.raises(A.TransformSpecError) as error:
    A.build_pipeline([entry] + TAIL)
  message = str(error.value)
  assert '\n' not in message and message.startswith('data.train_transforms[0].')
  for word in words:
    assert word in message
  if torchvision_refuses:  # at construction or on the first image, as torchvision checks late
    (name, kwargs), = entry.items()
    with pytest.raises((ValueError, TypeError, RuntimeError, KeyError)):
      getattr(tvt, name)(**_tv_kwargs(tvt, kwargs) if 'interpolation' not in kwargs else kwargs)(
          _generated(40, 30))


BAD_SPECS = [
    ([{'Flip': {}}] + TAIL, ['[0]', "'Flip'", 'unknown transform', 'RandomHorizontalFlip']),
    ([{'RandomCrop': {'size': 4, 'pading': 2}}] + TAIL, ['[0].RandomCrop.pading', 'allowed: size, padding']),
    ([{'RandomCrop': {'size': 'big'}}] + TAIL, ['[0].RandomCrop.size', "'big'", 'an int or [height, width]']),
    ([{'RandomCrop': {'size': True}}] + TAIL, ['[0].RandomCrop.size', 'True']),
    ([{'RandomCrop': {}}] + TAIL, ['[0].RandomCrop.size', 'missing']),
    ([{'RandomCrop': 4}] + TAIL, ['[0].RandomCrop', 'mapping']),
    ([{'Resize': {'size': 4}, 'ToTensor': {}}] + TAIL, ['[0]', 'one-key']),
    ([{'Resize': {'size': 4}}], ['no ToTensor', 'normalised float tensor']),
    ([{'Resize': {'size': 4}}, {'ToTensor': {}}], ['no Normalize', 'normalised float tensor']),
    ([{'Normalize': {'mean': [0.5], 'std': [0.5]}}] + TAIL, ['[0]', 'put ToTensor before']),
    ([{'ToTensor': {}}, {'Resize': {'size': 4}}, {'Normalize': {'mean': 0.5, 'std': 0.5}}],
     ['[1]', 'Resize', 'after ToTensor', '[0]']),
    (TAIL + [{'Normalize': {'mean': 0.5, 'std': 0.5}}], ['[2]', 'second Normalize']),
    ([{'ToTensor': {}}, {'Normalize': {'mean': [0.5], 'std': [0.0]}}], ['[1].Normalize.std', 'zero']),
    ([{'ToTensor': {}}, {'Normalize': {'mean': [0.5, 0.5], 'std': [0.2, 0.2, 0.2]}}], ['[1].Normalize.std', 'as many']),
    ('Resize', ['expected a list']),
]


@pytest.mark.parametrize('spec,words', BAD_SPECS, ids=[str(i) for i in range(len(BAD_SPECS))])
def test_bad_specs_are_one_line_naming_the_key(spec, words):
  with pytest.raises(A.TransformSpecError) as error:
    A.build_pipeline(spec, where='data.val_transforms')
  message = str(error.value)
  assert '\n' not in message and message.startswith('data.val_transforms')
  assert isinstance(error.value, ValueError)
  for word in words:
    assert word in message


def test_yaml_null_arguments_mean_none():
  """`- ToTensor:` in YAML gives None."""
  pipeline = A.build_pipeline([{'Resize': {'size': 8}}, {'ToTensor': None}, {'Normalize': {'mean': 0, 'std': 1}}])
  assert pipeline.deterministic


def test_random_crop_larger_than_image_says_what_to_do():
  pipeline = A.build_pipeline([{'RandomCrop': {'size': 50}}] + TAIL)
  with pytest.raises(ValueError, match='pad_if_needed'):
    pipeline.sample(np.random.default_rng(0), 40, 60)


def test_transforms_table_lists_every_op():
  assert set(A.TRANSFORMS) == {
      'Resize', 'CenterCrop', 'RandomCrop', 'RandomResizedCrop', 'RandomHorizontalFlip', 'RandomVerticalFlip',
      'RandomRotation', 'ColorJitter', 'RandomGrayscale', 'Grayscale', 'GaussianBlur', 'ToTensor', 'Normalize',
      # issue 24's, from tl_jax.data.policies (tests/test_policies.py)
      'TrivialAugmentWide', 'RandAugment', 'AutoAugment', 'AugMix', 'RandomErasing', 'RandomAffine',
      'RandomPerspective', 'RandomAutocontrast', 'RandomEqualize', 'RandomPosterize', 'RandomSolarize',
      'RandomAdjustSharpness'}


def test_importable_from_transforms_module():
  from tl_jax.data.augment import TransformSpecError, build_pipeline
  assert build_pipeline is A.build_pipeline and TransformSpecError is A.TransformSpecError
