"""TFDS sets as a data source, read without TensorFlow, with the folder path's pixels.

The sets are prepared here by builders defined in this file (array_record, well under a second,
no network): a few real hymenoptera images when the shared data is present, generated ones
otherwise.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import data_root, within

tfds = pytest.importorskip('tensorflow_datasets')

from tl_jax.data.folder import ImageFolder, ImageReadError  # noqa: E402
from tl_jax.data.loader import Loader  # noqa: E402
from tl_jax.data.sources import load_data  # noqa: E402
from tl_jax.data.tfds import TfdsError  # noqa: E402
from tl_jax.data.transforms import EvalTransform, TrainTransform  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ('ants', 'bees')

# The folder the builders below read; set by `prepare` (builders take no arguments of their own).
_SOURCE: dict = {}


def _examples(split_dir: Path):
  folder = ImageFolder(split_dir)
  for index, (path, label) in enumerate(folder.samples):
    # The file's bytes as they are: TFDS stores an encoded image unchanged.
    yield index, {'image': Path(path).read_bytes(), 'label': label}


class TlJaxTestImages(tfds.core.GeneratorBasedBuilder):
  """train/ and val/ of a folder as 'train' and 'validation', in torchvision's file order."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=list(CLASSES))}),
        supervised_keys=('image', 'label'), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(_SOURCE['root'] / 'train'),
            'validation': self._generate_examples(_SOURCE['root'] / 'val')}

  def _generate_examples(self, split_dir):
    yield from _examples(split_dir)


class TlJaxTestTrainOnly(TlJaxTestImages):
  """Only a train split, as many TFDS sets ship."""

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(_SOURCE['root'] / 'train')}


class TlJaxTestConfigs(TlJaxTestImages):
  """Two configs: 'full' (train/ and val/) and 'val_only' (val/ as both splits)."""
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='full'), tfds.core.BuilderConfig(name='val_only')]

  def _split_generators(self, dl_manager):
    if self.builder_config.name == 'val_only':
      return {'train': self._generate_examples(_SOURCE['root'] / 'val'),
              'validation': self._generate_examples(_SOURCE['root'] / 'val')}
    return super()._split_generators(dl_manager)


class TlJaxTestUnlabelled(tfds.core.GeneratorBasedBuilder):
  """Images with an integer id and no ClassLabel."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='jpeg'),
        'id': tfds.features.Scalar(dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for index, (key, example) in enumerate(_examples(_SOURCE['root'] / 'train')):
      yield key, {'image': example['image'], 'id': index}


def make_folder(root: Path, train_per_class: int = 4, val_per_class: int = 3) -> Path:
  """train/ and val/ with real hymenoptera JPEGs when present, else generated ones of varied sizes."""
  real = data_root()
  rng = np.random.default_rng(0)
  for split, n in (('train', train_per_class), ('val', val_per_class)):
    for label, cls in enumerate(CLASSES):
      out = root / split / cls
      out.mkdir(parents=True)
      if (real / split / cls).is_dir():
        for path in sorted((real / split / cls).glob('*.jpg'))[:n]:
          shutil.copy(path, out / path.name)
      else:
        for i in range(n):
          size = (int(rng.integers(60, 120)), int(rng.integers(60, 120)))
          pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8) // 2 + 60 * label
          Image.fromarray(pixels.astype(np.uint8)).save(out / f'{cls}_{i}.jpg', quality=90)
  return root


def prepare(builder_cls, folder: Path, data_dir: Path, file_format: str = 'array_record', **kwargs):
  _SOURCE['root'] = folder
  builder = builder_cls(data_dir=str(data_dir), file_format=file_format, **kwargs)
  builder.download_and_prepare()
  return builder


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(folder, data dir) with the folder prepared as tl_jax_test_images."""
  base = tmp_path_factory.mktemp('tfds')
  folder = make_folder(base / 'images')
  prepare(TlJaxTestImages, folder, base / 'tfds_data')
  return folder, base / 'tfds_data'


def _load(path, **kwargs):
  defaults = dict(workdir=None, seed=0, skip_bad_images=False, workers=2, log=lambda m: None)
  return load_data(str(path), **{**defaults, **kwargs})


def test_tfds_loader_yields_the_folder_loaders_tensors(prepared):
  folder, data_dir = prepared
  from_tfds = _load('tfds:tl_jax_test_images', tfds_data_dir=str(data_dir))
  from_folder = _load(folder)
  assert from_tfds.train.classes == from_folder.train.classes == list(CLASSES)
  assert [label for _, label in from_tfds.train.samples] == [label for _, label in from_folder.train.samples]
  assert len(from_tfds.val.samples) == len(from_folder.val.samples) == 2 * 3
  assert from_tfds.train.samples[5][0] == 'tfds:tl_jax_test_images train[5]'

  # Decoded images equal torchvision's pil_loader on the same files.
  torchvision = pytest.importorskip('torchvision')
  worst = 0.0
  for (key, _), (path, _) in zip(from_tfds.val.samples, from_folder.val.samples):
    ours = np.asarray(from_tfds.load(key), np.float64)
    ref = np.asarray(torchvision.datasets.folder.pil_loader(path), np.float64)
    assert ours.shape == ref.shape
    worst = max(worst, float(np.max(np.abs(ours - ref))))
  assert within(worst, 'pixel_abs', 'tfds record decode vs torchvision pil_loader (uint8 levels)')

  size = 64  # small crops keep the test fast; the pipeline is the tutorial's
  train_tf = TrainTransform(crop_size=size)
  eval_tf = EvalTransform(resize_size=72, crop_size=size)
  for phase, tf, shuffle in (('train', train_tf, True), ('val', lambda img, _: eval_tf(img), False)):
    a = Loader(getattr(from_tfds, phase).samples, tf, 4, shuffle=shuffle, seed=3, workers=2, load=from_tfds.load)
    b = Loader(getattr(from_folder, phase).samples, tf, 4, shuffle=shuffle, seed=3, workers=2,
               load=from_folder.load)
    for epoch in (0, 1):
      for x, y in zip(a.epoch(epoch), b.epoch(epoch), strict=True):
        err = float(np.max(np.abs(x.images - y.images)))
        assert within(err, 'pixel_abs', f'tfds vs folder loader batches ({phase})')
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_array_equal(x.mask, y.mask)


def test_parquet_set_reads_the_same_images(prepared, tmp_path):
  folder, _ = prepared
  prepare(TlJaxTestImages, folder, tmp_path, file_format='parquet')
  data = _load('tfds:tl_jax_test_images', tfds_data_dir=str(tmp_path))
  assert data.describe()['file_format'] == 'parquet'
  from_folder = _load(folder)
  for phase in ('train', 'val'):
    ours, ref = getattr(data, phase).samples, getattr(from_folder, phase).samples
    assert [label for _, label in ours] == [label for _, label in ref]
    for (key, _), (path, _) in zip(ours, ref):
      np.testing.assert_array_equal(np.asarray(data.load(key)), np.asarray(from_folder.load(path)))


def test_describe_records_the_set_and_its_splits(prepared):
  _, data_dir = prepared
  data = _load('tfds:tl_jax_test_images:1.0.0', tfds_data_dir=str(data_dir))
  described = data.describe()
  json.dumps(described)
  assert described['kind'] == 'tfds' and described['name'] == 'tl_jax_test_images'
  assert described['version'] == '1.0.0' and described['data_dir'] == str(data_dir)
  assert described['splits'] == {'train': 'train', 'val': 'validation'}
  assert described['counts'] == {'train': 8, 'val': 6} and described['file_format'] == 'array_record'


def test_slicing_splits_give_the_right_counts_and_records(prepared):
  _, data_dir = prepared
  data = _load('tfds:tl_jax_test_images', tfds_data_dir=str(data_dir), train_split='train[:75%]',
               val_split='train[75%:]+validation[:1]')
  train_keys = [key for key, _ in data.train.samples]
  val_keys = [key for key, _ in data.val.samples]
  assert train_keys == [f'tfds:tl_jax_test_images train[{i}]' for i in range(6)]
  assert val_keys == ['tfds:tl_jax_test_images train[6]', 'tfds:tl_jax_test_images train[7]',
                      'tfds:tl_jax_test_images validation[0]']
  assert _load('tfds:tl_jax_test_images', tfds_data_dir=str(data_dir), train_split='train[2:5]').describe()[
      'counts']['train'] == 3
  with pytest.raises(TfdsError, match=r"cannot read split 'trian'.*train \(8\), validation \(6\)"):
    _load('tfds:tl_jax_test_images', tfds_data_dir=str(data_dir), train_split='trian')


def test_set_without_validation_or_test_split_asks_for_val_split(prepared, tmp_path):
  folder, _ = prepared
  prepare(TlJaxTestTrainOnly, folder, tmp_path)
  with pytest.raises(TfdsError, match=r'no validation or test split \(its splits: train \(8\)\); set data.val_split'):
    _load('tfds:tl_jax_test_train_only', tfds_data_dir=str(tmp_path))
  data = _load('tfds:tl_jax_test_train_only', tfds_data_dir=str(tmp_path), train_split='train[:80%]',
               val_split='train[80%:]')
  assert data.describe()['counts'] == {'train': 6, 'val': 2}


def test_set_without_a_label_names_its_features(prepared, tmp_path):
  folder, _ = prepared
  prepare(TlJaxTestUnlabelled, folder, tmp_path)
  with pytest.raises(TfdsError, match=r'needs one ClassLabel feature.*image \(Image\), id \(Scalar\)'):
    _load('tfds:tl_jax_test_unlabelled', tfds_data_dir=str(tmp_path))


def test_missing_set_says_where_it_looked_and_how_to_prepare(tmp_path):
  with pytest.raises(TfdsError, match=rf'no builder of that name and nothing named no_such_set is prepared in '
                                      rf'{tmp_path}'):
    _load('tfds:no_such_set', tfds_data_dir=str(tmp_path))
  # A set TFDS knows but that is not prepared: no download without --tfds-download.
  with pytest.raises(TfdsError, match=rf'mnist is not prepared in {tmp_path}.*--tfds-download.*array_record'):
    _load('tfds:mnist', tfds_data_dir=str(tmp_path))
  assert not (tmp_path / 'downloads').exists()
  # Another version is there: the message says so.
  fake = tmp_path / 'mnist' / '1.0.0'
  fake.mkdir(parents=True)
  (fake / 'dataset_info.json').write_text('{}')
  with pytest.raises(TfdsError, match=r'holds mnist/1\.0\.0: name it with its version'):
    _load('tfds:mnist', tfds_data_dir=str(tmp_path))


def test_download_flag_prepares_a_known_set_as_array_record(prepared, tmp_path):
  """This builder generates its records locally, so 'downloading' it touches no network."""
  folder, _ = prepared
  _SOURCE['root'] = folder
  with pytest.raises(TfdsError, match='tl_jax_test_images is not prepared in'):
    _load('tfds:tl_jax_test_images', tfds_data_dir=str(tmp_path))
  lines = []
  data = _load('tfds:tl_jax_test_images', tfds_data_dir=str(tmp_path), tfds_download=True, log=lines.append)
  assert lines == [f'downloading and preparing tfds:tl_jax_test_images in {tmp_path} (array_record)']
  assert data.describe()['file_format'] == 'array_record' and data.describe()['counts'] == {'train': 8, 'val': 6}
  assert list((tmp_path / 'tl_jax_test_images' / '1.0.0').glob('*-train.array_record-*'))


def test_unknown_version_lists_what_is_prepared(prepared):
  _, data_dir = prepared
  with pytest.raises(TfdsError, match=r'holds tl_jax_test_images/1\.0\.0'):
    _load('tfds:tl_jax_test_images:2.0.0', tfds_data_dir=str(data_dir))


def test_data_dir_comes_from_the_environment(prepared, monkeypatch):
  _, data_dir = prepared
  monkeypatch.setenv('TFDS_DATA_DIR', str(data_dir))
  assert _load('tfds:tl_jax_test_images').describe()['data_dir'] == str(data_dir)


def test_tfrecord_only_set_without_tensorflow_says_what_to_do(prepared, tmp_path):
  if __import__('importlib').util.find_spec('tensorflow') is not None:
    pytest.skip('TensorFlow is installed: a tfrecord set is read with it')
  _, data_dir = prepared
  # A tfrecord set cannot be written without TensorFlow; its dataset_info.json is what we read.
  shutil.copytree(data_dir / 'tl_jax_test_images', tmp_path / 'tl_jax_test_images')
  version_dir = tmp_path / 'tl_jax_test_images' / '1.0.0'
  info_path = version_dir / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info))
  for f in version_dir.glob('*.array_record-*'):
    f.rename(f.with_name(f.name.replace('array_record', 'tfrecord')))
  with pytest.raises(TfdsError, match=r'prepared as tfrecord, which needs TensorFlow.*tensorflow-cpu.*array_record'):
    _load('tfds:tl_jax_test_images', tfds_data_dir=str(tmp_path))


def test_unreadable_record_is_named_by_split_and_index_and_can_be_skipped(tmp_path):
  folder = make_folder(tmp_path / 'images', train_per_class=3, val_per_class=2)
  bad = sorted((folder / 'train' / 'bees').iterdir())[1]
  bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
  prepare(TlJaxTestImages, folder, tmp_path / 'data')
  with pytest.raises(ImageReadError, match=r'cannot read image tfds:tl_jax_test_images train\[4\]: .*'
                                           r'--skip-bad-images'):
    _load('tfds:tl_jax_test_images', tfds_data_dir=str(tmp_path / 'data'))
  warnings = []
  data = _load('tfds:tl_jax_test_images', tfds_data_dir=str(tmp_path / 'data'), skip_bad_images=True,
               log=warnings.append)
  assert 'tfds:tl_jax_test_images train[4]' not in [key for key, _ in data.train.samples]
  assert len(data.train.samples) == 5 and data.skipped == 1
  assert any('skipping unreadable image tfds:tl_jax_test_images train[4]' in w for w in warnings)


def test_set_is_read_by_a_process_that_cannot_import_its_builder(prepared, tmp_path):
  """A user's own builder: the program reads the prepared files through dataset_info.json."""
  folder, data_dir = prepared
  prepare(TlJaxTestConfigs, folder, tmp_path, config='val_only')
  code = """if True:
    import json, sys
    import numpy as np
    from tl_jax.data.sources import load_data
    out = []
    for spec, data_dir in json.loads(sys.argv[1]):
      d = load_data(spec, workdir=None, seed=0, skip_bad_images=False, workers=2, tfds_data_dir=data_dir,
                    log=lambda m: None)
      out.append({'describe': d.describe(), 'classes': d.train.classes,
                  'pixels': np.asarray(d.load(d.val.samples[0][0])).tolist()})
    print(json.dumps(out))
  """
  specs = [('tfds:tl_jax_test_images', str(data_dir)), ('tfds:tl_jax_test_configs/val_only:1.0.0', str(tmp_path))]
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  proc = subprocess.run([sys.executable, '-c', code, json.dumps(specs)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  plain, with_config = json.loads(proc.stdout.strip().splitlines()[-1])
  assert plain['classes'] == with_config['classes'] == list(CLASSES)
  assert plain['describe']['counts'] == {'train': 8, 'val': 6}
  assert with_config['describe']['counts'] == {'train': 6, 'val': 6}
  assert with_config['describe']['config'] == 'val_only' and with_config['describe']['version'] == '1.0.0'
  first_val = np.asarray(Image.open(ImageFolder(folder / 'val').samples[0][0]).convert('RGB'))
  for out in (plain, with_config):
    np.testing.assert_array_equal(np.asarray(out['pixels'], np.uint8), first_val)


@pytest.mark.slow
def test_train_script_on_a_tfds_set_then_predict(prepared, tmp_path):
  """scripts/train.py --data tfds:NAME in a process that cannot import the builder; predict on the result."""
  folder, data_dir = prepared
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'PYTHONUNBUFFERED': '1'}
  run = lambda script, *args: subprocess.run([sys.executable, str(REPO / 'scripts' / script), *map(str, args)],
                                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  proc = run('train.py', '--data', 'tfds:tl_jax_test_images', '--tfds-data-dir', data_dir, '--weights', 'random',
             '--arch', 'resnet18', '--epochs', '1', '--batch-size', '4', '--workers', '2', '--workdir',
             tmp_path / 'run', '--no-progress')
  assert proc.returncode == 0, proc.stderr
  history = json.loads((tmp_path / 'run' / 'history.json').read_text())
  assert len(history['epochs']) == 1 and history['class_names'] == list(CLASSES)
  # The checkpoint records what the model was trained on.
  from tl_jax.checkpoint import load_model
  source = load_model(tmp_path / 'run').metadata['data']
  assert (source['kind'], source['name'], source['splits']['train']) == ('tfds', 'tl_jax_test_images', 'train')
  images = sorted((folder / 'val').glob('*/*.jpg'))[:2]
  proc = run('predict.py', '--checkpoint', tmp_path / 'run', '--json', *images)
  assert proc.returncode == 0, proc.stderr
  results = json.loads(proc.stdout)
  assert [r['path'] for r in results] == [str(p) for p in images]
  assert all(r['class_name'] in CLASSES and 'error' not in r for r in results)
