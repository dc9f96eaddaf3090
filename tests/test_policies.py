"""The policy augmentations and issue 24's other transforms against torchvision: pixels given the same
parameters, samplers replaying torch's draws and following torchvision's distributions, and bad arguments."""

from __future__ import annotations

import collections
import functools
import json
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import TorchDraws, within
from tl_jax.data import augment as A
from tl_jax.data import policies as P

TAIL = [{'ToTensor': {}}, {'Normalize': {'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}}]
SIZES = [(97, 61), (64, 64), (255, 131), (33, 200)]  # PIL (width, height): odd sizes and a square


@functools.lru_cache(maxsize=None)
def _image(width: int, height: int, mode: str = 'RGB') -> Image.Image:
  """Smooth gradients plus noise: photometric ops see a real histogram, geometric ops see edges."""
  rng = np.random.default_rng(zlib.crc32(f'{width}x{height}'.encode()))
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([(xx * (37 + 11 * c) + yy * (53 - 7 * c)) % 256 for c in range(3)], -1)
  blob = 80 * np.exp(-((xx - width / 3) ** 2 + (yy - height / 2) ** 2) / (0.1 * width * height))[..., None]
  array = np.clip(0.6 * base + blob + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
  img = Image.fromarray(array)
  return img if mode == 'RGB' else img.convert(mode)


def _images(modes=('RGB', 'L')):
  return [(f'{mode} {w}x{h}', _image(w, h, mode)) for mode in modes for (w, h) in SIZES]


def _levels(ours: Image.Image, ref: Image.Image) -> float:
  """Max |ours - ref| in 8-bit levels; inf when the mode or size differs."""
  if ours.mode != ref.mode or ours.size != ref.size:
    return float('inf')
  return float(np.max(np.abs(np.asarray(ours, np.int32) - np.asarray(ref, np.int32)), initial=0))


def _op(name, kwargs=None):
  return A.build_pipeline([{name: kwargs or {}}] + TAIL).ops[0]


def _tv(tvt, name, kwargs):
  """torchvision's transform built with our spec's arguments (enums for interpolation and policy)."""
  kwargs = dict(kwargs)
  if 'interpolation' in kwargs:
    kwargs['interpolation'] = tvt.InterpolationMode(kwargs['interpolation'])
  if 'policy' in kwargs:
    kwargs['policy'] = tvt.AutoAugmentPolicy(kwargs['policy'])
  return getattr(tvt, name)(**kwargs)


# ---------------------------------------------------------------- the building blocks equal torchvision's

def test_magnitude_bins_equal_torchvision(torch, tvt):
  """Every policy's op table, magnitudes and sign flags, for several bin counts and image sizes."""
  from torchvision.transforms import autoaugment as taa

  def same(ours, theirs):
    assert list(ours) == list(theirs)
    for name, (magnitudes, signed) in theirs.items():
      assert ours[name][1] == signed, name
      if magnitudes.ndim == 0:
        assert ours[name][0] is None, name
      else:
        np.testing.assert_array_equal(ours[name][0], magnitudes.numpy(), err_msg=name)

  for height, width in ((224, 224), (61, 97), (331, 500)):
    same(P.autoaugment_space(10, height, width), taa.AutoAugment()._augmentation_space(10, (height, width)))
    same(P.augmix_space(10, height, width, True), taa.AugMix()._augmentation_space(10, (height, width)))
    same(P.augmix_space(10, height, width, False),
         taa.AugMix(all_ops=False)._augmentation_space(10, (height, width)))
    for bins in (2, 3, 10, 17, 31, 64, 101):
      same(P.randaugment_space(bins, height, width),
           taa.RandAugment(num_magnitude_bins=bins)._augmentation_space(bins, (height, width)))
      same(P.trivialaugment_space(bins), taa.TrivialAugmentWide(num_magnitude_bins=bins)._augmentation_space(bins))
  for policy, table in P.AUTOAUGMENT_POLICIES.items():
    assert table == [tuple(tuple(op) for op in sub)
                     for sub in taa.AutoAugment(taa.AutoAugmentPolicy(policy)).policies], policy


def test_linspace32_is_torchs(torch):
  rng = np.random.default_rng(0)
  for steps in list(range(1, 80)) + [101, 255, 1000]:
    for start, end in ((0.0, 0.3), (0.0, 0.99), (255.0, 0.0), (0.0, 150 / 331 * 97), (float(rng.uniform(-9, 9)),
                                                                                      float(rng.uniform(-9, 9)))):
      np.testing.assert_array_equal(P.linspace32(start, end, steps), torch.linspace(start, end, steps).numpy())


def test_affine_matrix_and_perspective_coefficients(torch, tvf):
  from torchvision.transforms import functional as tf
  rng = np.random.default_rng(1)
  for _ in range(200):
    center = [float(c) for c in rng.uniform(-50, 300, 2)]
    angle, scale = float(rng.uniform(-360, 360)), float(rng.uniform(0.2, 3))
    translate = [int(t) for t in rng.integers(-40, 41, 2)]
    shear = [float(s) for s in rng.uniform(-60, 60, 2)]
    assert P.inverse_affine_matrix(center, angle, translate, scale, shear) == tf._get_inverse_affine_matrix(
        center, angle, translate, scale, shear)
  op = _op('RandomPerspective', {'p': 1.0, 'distortion_scale': 0.9})
  worst = 0.0
  for _ in range(300):
    width, height = (int(v) for v in rng.integers(5, 400, 2))
    params = op.sample(rng, width, height)
    ours = np.asarray(P.perspective_coeffs(params.startpoints, params.endpoints), np.float64)
    theirs = np.asarray(tf._get_perspective_coeffs([list(p) for p in params.startpoints],
                                                   [list(p) for p in params.endpoints]), np.float64)
    worst = max(worst, _mapped_distance(ours, theirs, width, height))
  # Where the image's corners go, in pixels: float32 roundings of two float64 solves.
  assert within(worst, 'pixel_abs', 'RandomPerspective coefficients, mapped corners (pixels)')


def _mapped_distance(coeffs_a, coeffs_b, width: int, height: int) -> float:
  """Max distance between where two perspective coefficient sets send the image's corners."""
  def mapped(c):
    xy = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
    denominator = c[6] * xy[:, 0] + c[7] * xy[:, 1] + 1
    return np.stack([(c[0] * xy[:, 0] + c[1] * xy[:, 1] + c[2]) / denominator,
                     (c[3] * xy[:, 0] + c[4] * xy[:, 1] + c[5]) / denominator], -1)
  return float(np.max(np.abs(mapped(coeffs_a) - mapped(coeffs_b))))


POLICY_MAGNITUDES = {
    'Identity': [0.0], 'ShearX': [-0.99, -0.3, 0.1, 0.5], 'ShearY': [-0.5, 0.2, 0.99],
    'TranslateX': [-32.0, -7.7, 3.9, 20.0], 'TranslateY': [-20.0, 5.5, 32.0], 'Rotate': [-135.0, -13.3, 30.0, 90.0],
    'Brightness': [-0.99, -0.33, 0.5, 0.9], 'Color': [-0.9, -0.1, 0.7], 'Contrast': [-0.99, 0.33, 0.9],
    'Sharpness': [-0.9, -0.2, 0.6, 0.99], 'Posterize': [1.0, 4.0, 6.0, 8.0], 'Solarize': [0.0, 37.5, 128.0, 255.0],
    'AutoContrast': [0.0], 'Equalize': [0.0], 'Invert': [0.0],
}


@pytest.mark.parametrize('interpolation,fill', [('nearest', None), ('bilinear', [10, 200, 30]), ('bicubic', 128)])
def test_every_policy_op_equals_torchvisions_apply_op(tvt, interpolation, fill):
  """torchvision's `_apply_op` on PIL images, every op at several magnitudes, pixel for pixel."""
  from torchvision.transforms import autoaugment as taa
  mode = tvt.InterpolationMode(interpolation)
  pil_filter = A.F.INTERPOLATIONS[interpolation]
  modes = ('RGB',) if isinstance(fill, list) else ('RGB', 'L')
  for name, magnitudes in POLICY_MAGNITUDES.items():
    for what, img in _images(modes):
      for magnitude in magnitudes:
        expected = taa._apply_op(img, name, magnitude, interpolation=mode, fill=fill)
        out = P.apply_op(img, name, magnitude, pil_filter, fill)
        assert within(_levels(out, expected), 'pil_levels', f'policy op {name} (torchvision _apply_op)'), (
            name, magnitude, what)


# ---------------------------------------------------------------- each transform replays torchvision's draws

# (name, kwargs, draws per image): our sampler fed torch's random numbers, then our apply, must give
# torchvision's transform output on the same seed.
REPLAY_CASES = [
    ('TrivialAugmentWide', {}, 12),
    ('TrivialAugmentWide', {'num_magnitude_bins': 8, 'interpolation': 'bilinear', 'fill': [5, 250, 60]}, 6),
    ('RandAugment', {}, 6),
    ('RandAugment', {'num_ops': 3, 'magnitude': 4, 'num_magnitude_bins': 7, 'fill': 90}, 4),
    ('AutoAugment', {}, 10),
    ('AutoAugment', {'policy': 'cifar10', 'interpolation': 'bilinear'}, 4),
    ('AutoAugment', {'policy': 'svhn', 'fill': [255, 0, 0]}, 4),
    ('RandomAffine', {'degrees': 30}, 2),
    ('RandomAffine', {'degrees': [-10, 40], 'translate': [0.1, 0.3], 'scale': [0.7, 1.3], 'shear': 12,
                      'interpolation': 'bilinear', 'fill': [9, 99, 199]}, 3),
    ('RandomAffine', {'degrees': 0, 'shear': [-5, 10, -20, 3], 'center': [3, 10.5], 'fill': 255}, 2),
    ('RandomAutocontrast', {}, 2),
    ('RandomEqualize', {'p': 0.7}, 2),
    ('RandomPosterize', {'bits': 3}, 2),
    ('RandomPosterize', {'bits': 1, 'p': 1.0}, 1),
    ('RandomSolarize', {'threshold': 100.5}, 2),
    ('RandomAdjustSharpness', {'sharpness_factor': 2.5}, 2),
    ('RandomAdjustSharpness', {'sharpness_factor': 0.0, 'p': 0.8}, 2),
]
REPLAY_IDS = [f'{name}-{i}' for i, (name, _, _) in enumerate(REPLAY_CASES)]


@pytest.mark.parametrize('name,kwargs,draws', REPLAY_CASES, ids=REPLAY_IDS)
def test_op_replays_torchvision(torch, tvt, name, kwargs, draws):
  op = _op(name, kwargs)
  reference = _tv(tvt, name, kwargs)
  modes = ('RGB',) if isinstance(kwargs.get('fill'), list) else ('RGB', 'L')
  for index, (what, img) in enumerate(_images(modes)):
    for draw in range(draws):
      torch.manual_seed(100 * index + draw)
      expected = reference(img)
      torch.manual_seed(100 * index + draw)
      params = op.sample(TorchDraws(torch), img.width, img.height)
      out = op.apply(img, params)
      assert within(_levels(out, expected), 'pil_levels', f'{name} (torch draws)'), (what, params)
      assert op.size_after(img.width, img.height, params) == out.size


def test_random_perspective_replays_torchvision(torch, tvt, tvf):
  """Given torchvision's coefficients the pixels are equal; end to end a coefficient may round the other way."""
  from torchvision.transforms import functional as tf
  for kwargs in ({'p': 1.0}, {'distortion_scale': 0.8, 'p': 0.6, 'interpolation': 'nearest', 'fill': 200}):
    op = _op('RandomPerspective', kwargs)
    reference = _tv(tvt, 'RandomPerspective', kwargs)
    for index, (what, img) in enumerate(_images()):
      for draw in range(3):
        torch.manual_seed(10 * index + draw)
        expected = reference(img)
        torch.manual_seed(10 * index + draw)
        params = op.sample(TorchDraws(torch), img.width, img.height)
        if params is None:
          assert _levels(op.apply(img, params), expected) == 0
          continue
        coeffs = tf._get_perspective_coeffs([list(p) for p in params.startpoints],
                                            [list(p) for p in params.endpoints])
        given = P.perspective(img, coeffs, A.F.INTERPOLATIONS[op.interpolation], op.fill)
        assert within(_levels(given, expected), 'pil_levels', 'RandomPerspective given torch coefficients'), what
        differing = float(np.mean(np.asarray(op.apply(img, params)) != np.asarray(expected)))
        assert within(differing, 'perspective_fraction', 'RandomPerspective end to end, fraction of pixels')


def _erasing_specs():
  normalize = TAIL[1]
  return [
      [{'ToTensor': {}}, normalize, {'RandomErasing': {}}],
      [{'ToTensor': {}}, normalize, {'RandomErasing': {'p': 0.9, 'scale': [0.1, 0.6], 'ratio': [0.5, 2.0],
                                                       'value': 'random'}}],
      [{'ToTensor': {}}, normalize, {'RandomErasing': {'p': 1.0, 'value': [1.5, -2.0, 0.25]}}],
      [{'RandomAutocontrast': {}}, {'ToTensor': {}}, {'RandomErasing': {'p': 1.0, 'value': 0.5}}, normalize,
       {'RandomErasing': {'p': 0.5, 'value': 'random', 'scale': [0.3, 0.9]}}],
  ]


@pytest.mark.parametrize('spec', _erasing_specs(), ids=['default', 'random', 'per-channel', 'twice'])
def test_random_erasing_pipeline_replays_torchvision(torch, tvt, spec):
  """RandomErasing after (or before) Normalize on the float array: torchvision's Compose output exactly."""
  pipeline = A.build_pipeline(spec)
  assert not pipeline.supports_uint8
  reference = tvt.Compose([_tv(tvt, next(iter(e)), next(iter(e.values()))) for e in spec])
  erased = 0
  for index, (what, img) in enumerate(_images(('RGB',))):
    for draw in range(6):
      torch.manual_seed(1000 * index + draw)
      expected = np.transpose(reference(img).numpy(), (1, 2, 0))
      torch.manual_seed(1000 * index + draw)
      params = pipeline.sample(TorchDraws(torch), img.width, img.height)
      out = pipeline(img, None) if pipeline.deterministic else pipeline.apply(img, params)
      assert out.shape == expected.shape and out.dtype == np.float32
      assert within(float(np.max(np.abs(out - expected))), 'pixel_abs', 'RandomErasing pipeline (torch draws)')
      erased += params[-1] is not None
  assert erased > 0
  with pytest.raises(ValueError, match='RandomErasing'):
    pipeline.apply_uint8(_image(64, 64), params)


def test_random_erasing_on_a_gray_image_draws_one_channel(torch, tvt):
  spec = [{'Grayscale': {}}, {'ToTensor': {}}, {'Normalize': {'mean': 0.5, 'std': 0.2}},
          {'RandomErasing': {'p': 1.0, 'value': 'random'}}]
  pipeline = A.build_pipeline(spec)
  reference = tvt.Compose([_tv(tvt, next(iter(e)), next(iter(e.values()))) for e in spec])
  img = _image(97, 61)
  for seed in range(5):
    torch.manual_seed(seed)
    expected = reference(img).numpy()[0]
    torch.manual_seed(seed)
    out = pipeline.apply(img, pipeline.sample(TorchDraws(torch), img.width, img.height))
    assert out.shape == (61, 97, 1)
    assert within(float(np.max(np.abs(out[..., 0] - expected))), 'pixel_abs', 'RandomErasing pipeline, gray')


def test_posterize_to_no_bits_is_torchvisions_tensor_op(torch, tvf):
  """AugMix's severity 9-10 bins posterize to 0 bits, which only torchvision's tensor op (its AugMix path)
  takes: every pixel 0."""
  for what, img in _images():
    expected = tvf.to_pil_image(tvf.posterize(tvf.pil_to_tensor(img), 0))
    assert within(_levels(P.apply_op(img, 'Posterize', 0.0), expected), 'pil_levels', 'Posterize to 0 bits')


def _augmix_with_pil_chains(taa, monkeypatch):
  """torchvision's AugMix with its `_apply_op` running on PIL images (tensor -> PIL -> op -> tensor)."""
  from torchvision.transforms import functional as tf
  real = taa._apply_op

  def pil_apply_op(img, op_name, magnitude, interpolation, fill):
    return tf.pil_to_tensor(real(tf.to_pil_image(img[0]), op_name, magnitude, interpolation, fill))[None]

  monkeypatch.setattr(taa, '_apply_op', pil_apply_op)


AUGMIX_CASES = [{}, {'severity': 7, 'mixture_width': 2, 'chain_depth': 2, 'alpha': 0.5, 'all_ops': False,
                     'interpolation': 'nearest', 'fill': [30, 60, 90]}]


@pytest.mark.parametrize('kwargs', AUGMIX_CASES, ids=['default', 'varied'])
def test_augmix_sampling_and_mixing_replay_torchvision(torch, tvt, monkeypatch, kwargs):
  """With torchvision's chains run on PIL images its AugMix equals ours exactly: the same draws in the same
  order, the same float32 mixing and truncation."""
  from torchvision.transforms import autoaugment as taa
  _augmix_with_pil_chains(taa, monkeypatch)
  op = _op('AugMix', kwargs)
  reference = _tv(tvt, 'AugMix', kwargs)
  modes = ('RGB',) if 'fill' in kwargs else ('RGB', 'L')
  for index, (what, img) in enumerate(_images(modes)):
    for draw in range(3):
      torch.manual_seed(100 * index + draw)
      expected = reference(img)
      torch.manual_seed(100 * index + draw)
      out = op.apply(img, op.sample(TorchDraws(torch), img.width, img.height))
      assert within(_levels(out, expected), 'pil_levels', 'AugMix with PIL chains (torch draws)'), what


def test_augmix_against_torchvisions_tensor_chains(torch, tvt):
  """torchvision's own AugMix (tensor ops in the chains): not bit-equal by construction; measured."""
  _augmix_against_tensor_chains(torch, tvt, _images(('RGB',))[:2], 2)


@pytest.mark.slow
def test_augmix_against_torchvisions_tensor_chains_many(torch, tvt):
  _augmix_against_tensor_chains(torch, tvt, _images(('RGB',)) + [('RGB 224x224', _image(224, 224))], 10)


def _augmix_against_tensor_chains(torch, tvt, images, draws):
  op = _op('AugMix')
  reference = tvt.AugMix()
  worst, means = 0.0, []
  for index, (what, img) in enumerate(images):
    for draw in range(draws):
      torch.manual_seed(100 * index + draw)
      expected = np.asarray(reference(img), np.int32)
      torch.manual_seed(100 * index + draw)
      out = np.asarray(op.apply(img, op.sample(TorchDraws(torch), img.width, img.height)), np.int32)
      worst = max(worst, float(np.max(np.abs(out - expected))))
      means.append(float(np.mean(np.abs(out - expected))))
  assert within(worst, 'augmix_levels', 'AugMix vs torchvision tensor chains, max levels')
  assert within(float(np.mean(means)), 'augmix_mean_levels', 'AugMix vs torchvision tensor chains, mean levels')


def test_policies_inside_a_pipeline_replay_torchvision(torch, tvt):
  """A modern list: crop, flip, TrivialAugmentWide, ToTensor, Normalize, RandomErasing, draws in order."""
  spec = [{'RandomResizedCrop': {'size': 48}}, {'RandomHorizontalFlip': {}}, {'TrivialAugmentWide': {}},
          {'RandomAffine': {'degrees': 10, 'translate': [0.1, 0.1]}}, {'ToTensor': {}}, TAIL[1],
          {'RandomErasing': {'p': 0.5, 'value': 'random'}}]
  pipeline = A.build_pipeline(spec)
  assert pipeline.output_size == (48, 48)
  reference = tvt.Compose([_tv(tvt, next(iter(e)), next(iter(e.values()))) for e in spec])
  for index, (what, img) in enumerate(_images(('RGB',))):
    for draw in range(5):
      torch.manual_seed(77 * index + draw)
      expected = np.transpose(reference(img).numpy(), (1, 2, 0))
      torch.manual_seed(77 * index + draw)
      out = pipeline.apply(img, pipeline.sample(TorchDraws(torch), img.width, img.height))
      assert within(float(np.max(np.abs(out - expected))), 'pixel_abs', 'policy pipeline (torch draws)'), what
  assert np.array_equal(pipeline(img, np.random.default_rng(3)), pipeline(img, np.random.default_rng(3)))


# ---------------------------------------------------------------- samplers follow torchvision's distributions

N_DRAWS = 3000


def _chi2_same(a, b) -> float:
  stats = pytest.importorskip('scipy.stats')
  count_a, count_b = collections.Counter(a), collections.Counter(b)
  categories = sorted(set(count_a) | set(count_b), key=repr)
  table = np.array([[count_a[c] for c in categories], [count_b[c] for c in categories]])
  return float(stats.chi2_contingency(table).pvalue)


def _ks_same(a, b) -> float:
  stats = pytest.importorskip('scipy.stats')
  return float(stats.ks_2samp(np.asarray(a, np.float64), np.asarray(b, np.float64)).pvalue)


def _torchvision_ops(torch, taa, monkeypatch, transform, img, n, seed):
  """The (op, magnitude) lists torchvision's policy applies on n calls: its `_apply_op` recorded, not run."""
  calls = []
  monkeypatch.setattr(taa, '_apply_op', lambda img, name, magnitude, **kw: calls.append((name, magnitude)) or img)
  out = []
  torch.manual_seed(seed)
  for _ in range(n):
    calls.clear()
    transform(img)
    out.append(tuple(calls))
  monkeypatch.undo()
  return out


@pytest.mark.parametrize('name,kwargs', [('TrivialAugmentWide', {}), ('RandAugment', {'num_ops': 1}),
                                         ('AutoAugment', {}), ('AutoAugment', {'policy': 'svhn'})])
def test_policy_samplers_follow_torchvision(torch, tvt, monkeypatch, name, kwargs):
  """Our numpy draws against torchvision's own: which ops (with their magnitudes) are applied, and how many."""
  from torchvision.transforms import autoaugment as taa
  img = _image(64, 64)
  theirs = _torchvision_ops(torch, taa, monkeypatch, _tv(tvt, name, kwargs), img, N_DRAWS, 11)
  op = _op(name, kwargs)
  rng = np.random.default_rng(12)
  ours = [op.sample(rng, 64, 64) for _ in range(N_DRAWS)]
  assert _chi2_same([o[:1] for o in ours], [t[:1] for t in theirs]) > 1e-3
  assert _chi2_same([len(o) for o in ours], [len(t) for t in theirs]) > 1e-3
  if name == 'TrivialAugmentWide':  # a plausible mistake: the sign coin for every op, not only signed ones
    space = P.trivialaugment_space(31)

    def always_signed(rng, width, height):
      name = list(space)[int(rng.integers(0, len(space)))]
      magnitudes = space[name][0]
      m = 0.0 if magnitudes is None else float(magnitudes[int(rng.integers(0, len(magnitudes)))])
      return ((name, -m if rng.integers(0, 2) else m),)

    wrong = [always_signed(rng, 64, 64) for _ in range(N_DRAWS)]
    assert _chi2_same([w[0] for w in wrong], [t[0] for t in theirs]) < 1e-3


def test_augmix_sampler_follows_torchvision(torch, tvt, monkeypatch):
  from torchvision.transforms import autoaugment as taa
  img = _image(48, 48)
  weights = []
  monkeypatch.setattr(taa.AugMix, '_sample_dirichlet', lambda self, params: weights.append(
      torch._sample_dirichlet(params)) or weights[-1])
  theirs = _torchvision_ops(torch, taa, monkeypatch, taa.AugMix(), img, 800, 13)
  their_m = [float(w[0, 0]) for w in weights[0::2]]
  op = _op('AugMix')
  rng = np.random.default_rng(14)
  ours = [op.sample(rng, 48, 48) for _ in range(1600)]
  assert _ks_same([p.original_weight for p in ours], their_m) > 1e-3
  their_chains = [t for t in theirs]
  our_ops = [name for p in ours for chain in p.chains for name, _ in chain]
  their_ops = [name for t in their_chains for name, _ in t]
  assert _chi2_same(our_ops, their_ops) > 1e-3
  assert _chi2_same([sum(len(c) for c in p.chains) for p in ours], [len(t) for t in their_chains]) > 1e-3


def test_affine_perspective_and_erasing_samplers_follow_torchvision(torch, tvt):
  rng = np.random.default_rng(15)
  torch.manual_seed(16)
  theirs = [tvt.RandomAffine.get_params([-20.0, 30.0], [0.2, 0.1], [0.5, 1.5], [-5.0, 5.0, 0.0, 10.0], [80, 50])
            for _ in range(N_DRAWS)]
  op = _op('RandomAffine', {'degrees': [-20, 30], 'translate': [0.2, 0.1], 'scale': [0.5, 1.5],
                            'shear': [-5, 5, 0, 10]})
  ours = [op.sample(rng, 80, 50) for _ in range(N_DRAWS)]
  assert _ks_same([p.angle for p in ours], [t[0] for t in theirs]) > 1e-3
  assert _chi2_same([p.translate for p in ours], [tuple(t[1]) for t in theirs]) > 1e-3
  assert _ks_same([p.scale for p in ours], [t[2] for t in theirs]) > 1e-3
  assert _ks_same([p.shear[1] for p in ours], [t[3][1] for t in theirs]) > 1e-3

  torch.manual_seed(17)
  theirs = [tvt.RandomPerspective.get_params(9, 7, 0.6)[1] for _ in range(N_DRAWS)]
  op = _op('RandomPerspective', {'p': 1.0, 'distortion_scale': 0.6})
  ours = [op.sample(rng, 9, 7).endpoints for _ in range(N_DRAWS)]
  for corner in range(4):
    assert _chi2_same([o[corner] for o in ours], [tuple(t[corner]) for t in theirs]) > 1e-3

  erasing = tvt.RandomErasing(p=1.0, scale=(0.05, 0.5), ratio=(0.4, 2.5))
  tensor = torch.zeros(3, 40, 60)
  torch.manual_seed(18)
  theirs = [erasing.get_params(tensor, erasing.scale, erasing.ratio, [0.0])[:4] for _ in range(N_DRAWS)]
  op = A.build_pipeline([{'ToTensor': {}}, TAIL[1], {'RandomErasing': {'p': 1.0, 'scale': [0.05, 0.5],
                                                                         'ratio': [0.4, 2.5]}}]).ops[-1]
  ours = [op.sample(rng, 60, 40) for _ in range(N_DRAWS)]
  ours = [(0, 0, 40, 60) if p is None else (p.top, p.left, p.height, p.width) for p in ours]
  assert _ks_same([h * w for _, _, h, w in ours], [h * w for _, _, h, w in theirs]) > 1e-3
  assert _ks_same([h / max(w, 1) for _, _, h, w in ours], [h / max(w, 1) for _, _, h, w in theirs]) > 1e-3
  assert _ks_same([t for t, _, _, _ in ours], [t for t, _, _, _ in theirs]) > 1e-3
  swapped = [(t, l, w, h) for t, l, h, w in ours]  # a plausible mistake: h and w as RandomResizedCrop has them
  assert _ks_same([h / max(w, 1) for _, _, h, w in swapped], [h / max(w, 1) for _, _, h, w in theirs]) < 1e-3


@pytest.mark.parametrize('name', ['RandomAutocontrast', 'RandomEqualize', 'RandomPerspective'])
def test_coins_follow_p(name):
  stats = pytest.importorskip('scipy.stats')
  rng = np.random.default_rng(19)
  for p in (0.0, 0.3, 1.0):
    op = _op(name, {'p': p})
    hits = sum(bool(op.sample(rng, 20, 20)) for _ in range(N_DRAWS))
    assert stats.binomtest(hits, N_DRAWS, p).pvalue > 1e-3 if 0 < p < 1 else hits == p * N_DRAWS


# ---------------------------------------------------------------- specs

def test_specs_round_trip_and_registry():
  spec = ([{name: kwargs} for name, kwargs, _ in REPLAY_CASES] + [{'RandomPerspective': {'fill': [1, 2, 3]}}]
          + [{'AugMix': kwargs} for kwargs in AUGMIX_CASES] + _erasing_specs()[3])
  pipeline = A.build_pipeline(spec)
  assert A.build_pipeline(json.loads(json.dumps(pipeline.to_spec()))) == pipeline
  assert set(P.TRANSFORMS) <= set(A.TRANSFORMS)
  assert set(P.TRANSFORMS) == {
      'TrivialAugmentWide', 'RandAugment', 'AutoAugment', 'AugMix', 'RandomErasing', 'RandomAffine',
      'RandomPerspective', 'RandomAutocontrast', 'RandomEqualize', 'RandomPosterize', 'RandomSolarize',
      'RandomAdjustSharpness'}
  assert A.build_pipeline([{'RandomAffine': {'degrees': 5}}] + TAIL).supports_uint8


def test_config_accepts_the_new_names_and_names_a_bad_one():
  from tl_jax import config as C
  values = C.default_values()
  values['data']['train_transforms'] = ([{'RandomResizedCrop': {'size': 32}}, {'TrivialAugmentWide': {}}] + TAIL
                                        + [{'RandomErasing': {'p': 0.25}}])
  C.validate(values)
  values['data']['train_transforms'][1] = {'RandAugment': {'num_ops': -2}}
  with pytest.raises(C.ConfigError, match=r'^data\.train_transforms\[1\]\.RandAugment\.num_ops: .*-2'):
    C.validate(values)


# (entry, words the message must contain); the entry is at index 2 of the list.
BAD_ARGS = [
    ({'RandAugment': {'num_ops': -1}}, ['data.train_transforms[2].RandAugment.num_ops', '-1']),
    ({'RandAugment': {'magnitude': 31}}, ['RandAugment.magnitude', '31', '[0, 30]']),
    ({'RandAugment': {'num_ops': 1.5}}, ['RandAugment.num_ops', '1.5']),
    ({'RandAugment': {'num_magnitude_bins': 1, 'magnitude': 0}}, ['RandAugment.num_magnitude_bins', 'at least 2']),
    ({'TrivialAugmentWide': {'interpolation': 'cubic'}}, ['TrivialAugmentWide.interpolation', 'bicubic']),
    ({'TrivialAugmentWide': {'magnitude': 3}}, ['TrivialAugmentWide.magnitude', 'unknown argument']),
    ({'AutoAugment': {'policy': 'IMAGENET'}}, ['AutoAugment.policy', "'IMAGENET'", "'imagenet'"]),
    ({'AutoAugment': {'fill': [1, 2]}}, ['AutoAugment.fill', 'one per channel']),
    ({'AugMix': {'severity': 11}}, ['AugMix.severity', '11', '[1, 10]']),
    ({'AugMix': {'alpha': 0}}, ['AugMix.alpha', 'positive']),
    ({'AugMix': {'mixture_width': 0}}, ['AugMix.mixture_width', 'at least 1']),
    ({'RandomAffine': {}}, ['RandomAffine.degrees', 'missing']),
    ({'RandomAffine': {'degrees': -4}}, ['RandomAffine.degrees', '-4', 'non-negative']),
    ({'RandomAffine': {'degrees': 4, 'translate': [0.1, 1.5]}}, ['RandomAffine.translate', 'each in [0, 1]']),
    ({'RandomAffine': {'degrees': 4, 'scale': [0, 1]}}, ['RandomAffine.scale', 'positive']),
    ({'RandomAffine': {'degrees': 4, 'shear': [1, 2, 3]}}, ['RandomAffine.shear', '2 or 4']),
    ({'RandomAffine': {'degrees': [5, 1]}}, ['RandomAffine.degrees', 'min <= max']),
    ({'RandomPerspective': {'distortion_scale': 1.5}}, ['RandomPerspective.distortion_scale', '1.5', '[0, 1]']),
    ({'RandomPerspective': {'p': 2}}, ['RandomPerspective.p', '[0, 1]']),
    ({'RandomPosterize': {'bits': 9}}, ['RandomPosterize.bits', '9', '[1, 8]']),
    ({'RandomPosterize': {}}, ['RandomPosterize.bits', 'missing']),
    ({'RandomPosterize': {'bits': 0}}, ['RandomPosterize.bits', '0', '[1, 8]']),
    ({'RandomSolarize': {'threshold': 'x'}}, ['RandomSolarize.threshold', "'x'"]),
    ({'RandomAdjustSharpness': {'sharpness_factor': -1}}, ['RandomAdjustSharpness.sharpness_factor', 'non-negative']),
    ({'RandomAutocontrast': {'p': -0.5}}, ['RandomAutocontrast.p', '-0.5']),
    ({'RandomEqualize': {'q': 1}}, ['RandomEqualize.q', 'allowed: p']),
]


@pytest.mark.parametrize('entry,words', BAD_ARGS, ids=[f'{next(iter(e))}-{i}' for i, (e, _) in enumerate(BAD_ARGS)])
def test_bad_arguments_are_one_line_naming_the_key(entry, words):
  with pytest.raises(A.TransformSpecError) as error:
    A.build_pipeline([{'Resize': {'size': 8}}, {'CenterCrop': {'size': 8}}, entry] + TAIL)
  message = str(error.value)
  assert '\n' not in message and message.startswith('data.train_transforms[2].')
  for word in words:
    assert word in message, message


BAD_ERASING = [
    ({'p': 1.5}, ['RandomErasing.p']),
    ({'scale': [0.5, 0.1]}, ['RandomErasing.scale', 'min <= max']),
    ({'scale': [0.1, 1.5]}, ['RandomErasing.scale', '[0.0, 1.0]']),
    ({'ratio': [0, 2]}, ['RandomErasing.ratio', 'positive']),
    ({'value': 'noise'}, ['RandomErasing.value', "'noise'", "'random'"]),
    ({'value': [1, 2]}, ['RandomErasing.value', 'one per channel']),
]


@pytest.mark.parametrize('kwargs,words', BAD_ERASING, ids=[str(i) for i in range(len(BAD_ERASING))])
def test_bad_random_erasing(kwargs, words):
  with pytest.raises(A.TransformSpecError) as error:
    A.build_pipeline(TAIL + [{'RandomErasing': kwargs}])
  message = str(error.value)
  assert '\n' not in message and message.startswith('data.train_transforms[2].RandomErasing.')
  for word in words:
    assert word in message, message


def test_random_erasing_needs_to_tensor_first():
  with pytest.raises(A.TransformSpecError, match=r'\[0\].*RandomErasing works on the tensor from ToTensor'):
    A.build_pipeline([{'RandomErasing': {}}] + TAIL)
  with pytest.raises(A.TransformSpecError, match=r'\[1\].*after ToTensor.*TrivialAugmentWide'):
    A.build_pipeline([{'ToTensor': {}}, {'TrivialAugmentWide': {}}, TAIL[1]])


# ---------------------------------------------------------------- slow: many more draws and the real images

@pytest.mark.slow
@pytest.mark.parametrize('name,kwargs,draws', REPLAY_CASES, ids=REPLAY_IDS)
def test_op_replays_torchvision_many_draws(torch, tvt, name, kwargs, draws):
  op = _op(name, kwargs)
  reference = _tv(tvt, name, kwargs)
  img = _image(224, 224)
  for seed in range(40 * draws):
    torch.manual_seed(seed)
    expected = reference(img)
    torch.manual_seed(seed)
    out = op.apply(img, op.sample(TorchDraws(torch), img.width, img.height))
    assert within(_levels(out, expected), 'pil_levels', f'{name} (torch draws)'), seed


def per_image_seconds(repeats: int = 20) -> dict[str, float]:
  """Mean seconds per 224x224 RGB image of each new op (sample + apply); for the notes, not a test."""
  img = _image(224, 224)
  cases = {'TrivialAugmentWide': {}, 'RandAugment': {}, 'AutoAugment': {}, 'AugMix': {},
           'RandomAffine': {'degrees': 30, 'translate': [0.1, 0.1], 'scale': [0.8, 1.2], 'shear': 10},
           'RandomPerspective': {'p': 1.0}, 'RandomAutocontrast': {'p': 1.0}, 'RandomEqualize': {'p': 1.0},
           'RandomPosterize': {'bits': 4, 'p': 1.0}, 'RandomSolarize': {'threshold': 128, 'p': 1.0},
           'RandomAdjustSharpness': {'sharpness_factor': 2, 'p': 1.0}}
  out = {}
  rng = np.random.default_rng(0)
  for name, kwargs in cases.items():
    op = _op(name, kwargs)
    start = time.perf_counter()
    for _ in range(repeats):
      op.apply(img, op.sample(rng, 224, 224))
    out[name] = (time.perf_counter() - start) / repeats
  erasing = A.build_pipeline(TAIL + [{'RandomErasing': {'p': 1.0, 'value': 'random'}}])
  array = A.F.to_normalized_array(img)
  op = erasing.ops[-1]
  start = time.perf_counter()
  for _ in range(repeats):
    op.apply_array(array, op.sample(rng, 224, 224, 3))
  out['RandomErasing (random)'] = (time.perf_counter() - start) / repeats
  return out


if __name__ == '__main__':
  for name, seconds in per_image_seconds().items():
    print(f'{name:<24} {seconds * 1e3:7.2f} ms')


def test_uint8_batches_refuse_random_erasing_and_auto_falls_back_to_float_rows(tmp_path):
  """RandomErasing runs after Normalize, on float rows: `uint8_batches: true` refuses it in one line,
  'auto' keeps float batches."""
  from test_train import _small_folder
  from tl_jax.config import validate
  from tl_jax.rundir import RunError
  from tl_jax.training.pipeline import make_pipeline
  from tl_jax.weights import default_preprocessing
  norm = {'Normalize': {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]}}
  data = _small_folder(tmp_path / 'data')

  def config(uint8):
    return validate({'model': {'arch': 'resnet18', 'weights': 'random'},
                     'data': {'path': str(data), 'batch_size': 2, 'workers': 0, 'uint8_batches': uint8,
                              'train_transforms': [{'RandomResizedCrop': {'size': 32}}, {'ToTensor': {}}, norm,
                                                   {'RandomErasing': {'p': 0.5}}],
                              'val_transforms': [{'Resize': {'size': 36}}, {'CenterCrop': {'size': 32}},
                                                 {'ToTensor': {}}, norm]},
                     'stages': [{'name': 'all', 'epochs': 1}]})

  with pytest.raises(RunError, match=r'^data.uint8_batches: true cannot carry .*RandomErasing.*set data.uint8_batches: false$'):
    make_pipeline(config(True), default_preprocessing('resnet18'), log=lambda _: None)
  assert make_pipeline(config('auto'), default_preprocessing('resnet18'), log=lambda _: None).normalization is None
