"""TensorFlow Datasets sets as (key, label) samples and a key -> PIL image loader, without TensorFlow.

- Reading: `builder.as_data_source` gives random access to prepared `array_record` and `parquet`
  sets with no TensorFlow. A set prepared by a builder this program cannot import (a user's own)
  is opened from its `dataset_info.json` (TFDS's read-only builder). A `tfrecord`-only set needs
  TensorFlow: it is read with it when it imports, else refused with what to do.
- Pixels: images are read as their original encoded bytes (`SkipDecoding`) and decoded by PIL,
  exactly as the folder path decodes files; TensorFlow's JPEG decoder differs from PIL's by a
  few levels, which would break parity with torchvision.
- Keys name a record by its split and index in that split (`tfds:NAME train[17]`), whatever
  slicing selected it, so an unreadable record is named the same way in every message.
- Nothing is downloaded unless asked (`download=True`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Optional, Sequence

from PIL import Image

from tl_jax.data.folder import DataError, load_image_bytes

PREFIX = 'tfds:'
RANDOM_ACCESS_FORMATS = ('array_record', 'parquet')


class TfdsError(DataError):
  """The TFDS set cannot be found, read or used as an image classification set."""


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise TfdsError('reading a tfds: data set needs tensorflow-datasets: pip install "tl_jax[tfds]" '
                    '(TensorFlow is not needed)') from e
  return tfds


def default_data_dir(data_dir: Optional[str] = None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else TFDS's default (~/tensorflow_datasets)."""
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


@dataclasses.dataclass
class TfdsSplit:
  """One phase's records: `samples` (key, label), `classes`, as `ImageFolder` has them."""
  root: str  # 'tfds:NAME SPLIT', for messages
  classes: list[str]
  samples: list[tuple[str, int]] = dataclasses.field(repr=False)

  @property
  def class_to_idx(self) -> dict[str, int]:
    return {name: i for i, name in enumerate(self.classes)}

  @property
  def targets(self) -> list[int]:
    return [label for _, label in self.samples]

  def __len__(self) -> int:
    return len(self.samples)

  def with_samples(self, samples: Sequence[tuple[str, int]]) -> TfdsSplit:
    return dataclasses.replace(self, samples=list(samples))


@dataclasses.dataclass
class TfdsSource:
  """A prepared TFDS set opened for reading; `split(spec)` selects records, `load(key)` decodes one."""
  spec: str
  builder: Any
  data_dir: str
  image_key: str
  label_key: str
  classes: list[str]
  records: dict[str, Any]  # base split name -> indexable records (a data source, or a list)

  def describe(self) -> dict:
    info = self.builder.info
    return {'name': info.name, 'config': info.config_name or None, 'version': str(info.version),
            'full_name': info.full_name, 'data_dir': self.data_dir, 'file_format': _file_format(info),
            'image_feature': self.image_key, 'label_feature': self.label_key}

  def split(self, spec: str) -> TfdsSplit:
    """The records of a TFDS split string (slicing and '+' allowed, e.g. 'train[:80%]')."""
    tfds = _tfds()
    try:
      instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(self.builder.info.splits)
    except (ValueError, KeyError, AssertionError) as e:
      raise TfdsError(f'{PREFIX}{self.spec}: cannot read split {spec!r} ({_first_line(e)}). Its splits are '
                      f'{_split_sizes(self.builder.info)}; slices look like train[:80%] or train[100:200].') from e
    samples = []
    for ins in instructions:
      size = self.builder.info.splits[ins.splitname].num_examples
      start, stop, _ = slice(ins.from_, ins.to).indices(size)  # open or negative bounds
      labels = _labels(self._records(ins.splitname), start, stop, self.label_key)
      samples += [(f'{PREFIX}{self.spec} {ins.splitname}[{i}]', label)
                  for i, label in zip(range(start, stop), labels)]
    if not samples:
      raise TfdsError(f'{PREFIX}{self.spec}: split {spec!r} selects no records; its splits are '
                      f'{_split_sizes(self.builder.info)}')
    return TfdsSplit(f'{PREFIX}{self.spec} {spec}', list(self.classes), samples)

  def load(self, key: str) -> Image.Image:
    """The RGB image of the record `key` ('tfds:NAME split[index]'), decoded by PIL."""
    name = key.rpartition(' ')[2]
    split, _, index = name[:-1].partition('[')
    data = self._records(split)[int(index)][self.image_key]
    return load_image_bytes(data, key)

  def _records(self, split: str):
    if split not in self.records:
      self.records[split] = _open_split(self.builder, split, self.image_key, self.label_key)
    return self.records[split]


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _split_sizes(info) -> str:
  return ', '.join(f'{name} ({split.num_examples})' for name, split in sorted(info.splits.items())) or 'none'


def _file_format(info) -> str:
  fmt = info.file_format
  return getattr(fmt, 'value', str(fmt)) if fmt is not None else 'unknown'


def _labels(records, start: int, stop: int, label_key: str, chunk: int = 1024) -> list[int]:
  labels = []
  for s in range(start, stop, chunk):
    keys = list(range(s, min(s + chunk, stop)))
    rows = records.__getitems__(keys) if hasattr(records, '__getitems__') else [records[k] for k in keys]
    labels += [int(row[label_key]) for row in rows]
  return labels


def _open_split(builder, split: str, image_key: str, label_key: str):
  """Random-access records of one base split; through TensorFlow (into memory) for tfrecord sets."""
  tfds = _tfds()
  decoders = {image_key: tfds.decode.SkipDecoding()}
  formats = {getattr(f, 'value', str(f)) for f in builder.info.available_file_formats()}
  if formats & set(RANDOM_ACCESS_FORMATS):
    return builder.as_data_source(split=split, decoders=decoders)
  # A tfrecord set: sequential reading needs TensorFlow. Records are read once, in file order
  # (the order of their indices), and kept encoded in memory.
  ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  return [{image_key: row[image_key], label_key: int(row[label_key])} for row in tfds.as_numpy(ds)]


def _tensorflow_imports() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def _find_features(spec: str, info) -> tuple[str, str, list[str]]:
  """(image feature, label feature, class names): from supervised_keys, else the Image and ClassLabel features."""
  tfds = _tfds()
  features = info.features
  is_image = lambda k: isinstance(features[k], tfds.features.Image)
  is_label = lambda k: isinstance(features[k], tfds.features.ClassLabel)
  keys = list(features.keys())
  image_key = label_key = None
  supervised = info.supervised_keys
  if (isinstance(supervised, (tuple, list)) and len(supervised) >= 2
      and all(isinstance(k, str) and k in features for k in supervised[:2])):
    if is_image(supervised[0]) and is_label(supervised[1]):
      image_key, label_key = supervised[0], supervised[1]
  if image_key is None:
    images, labels = [k for k in keys if is_image(k)], [k for k in keys if is_label(k)]
    image_key = 'image' if 'image' in images else (images[0] if len(images) == 1 else None)
    label_key = 'label' if 'label' in labels else (labels[0] if len(labels) == 1 else None)
  if image_key is None or label_key is None:
    listed = ', '.join(f'{k} ({type(features[k]).__name__})' for k in keys)
    wanted = ' and '.join(w for w, k in (('one Image feature', image_key), ('one ClassLabel feature', label_key))
                          if k is None)
    raise TfdsError(f'{PREFIX}{spec} is not an image classification set: it needs {wanted} (or '
                    f'supervised_keys naming them); its features are {listed}')
  return image_key, label_key, list(features[label_key].names)


def _not_prepared_hint(spec: str, data_dir: str) -> str:
  return (f'pass --tfds-download to download and prepare it (needs network), or prepare it once with '
          f'python -c "import tensorflow_datasets as tfds; tfds.builder(\'{spec}\', data_dir=\'{data_dir}\')'
          f'.download_and_prepare(file_format=\'array_record\')"')


def _prepared_versions(data_dir: str, name: str) -> list[str]:
  folder = os.path.join(data_dir, name.split(':')[0])
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    if 'dataset_info.json' in filenames:
      found.append(os.path.relpath(dirpath, data_dir))
  return sorted(found)


def open_tfds(spec: str, data_dir: Optional[str] = None, download: bool = False,
              log: Callable[[str], None] = print) -> TfdsSource:
  """Opens the prepared set `spec` ('NAME[/CONFIG][:VERSION]') in `data_dir` for random access.

  Args:
    spec: what follows 'tfds:' in --data.
    data_dir: where prepared sets live (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    download: download and prepare (as array_record) a set that is not prepared; needs network.
    log: receives a line when a set is being prepared.
  """
  if not spec or spec.startswith(('/', ':')):
    raise TfdsError(f'--data {PREFIX}{spec}: name the set, as tfds:NAME, tfds:NAME/CONFIG or tfds:NAME:VERSION')
  tfds = _tfds()
  data_dir = default_data_dir(data_dir)
  try:
    builder = tfds.builder(spec, data_dir=data_dir)
  except (ValueError, AssertionError) as e:  # unknown name; unknown version or config of a known builder
    name = spec.split('/')[0].split(':')[0]
    found = _prepared_versions(data_dir, name)
    where = f'{data_dir} holds {", ".join(found)}' if found else f'nothing named {name} is prepared in {data_dir}'
    # TFDS prefixes 'Failed to construct dataset "x", builder_kwargs "{...}": '; the reason follows.
    why = ('TFDS has no builder of that name' if isinstance(e, tfds.core.registered.DatasetNotFoundError)
           else _first_line(e).rpartition('}": ')[2].split('. ')[0].rstrip('.'))
    raise TfdsError(f'{PREFIX}{spec}: {why} and {where}. Check the name and version, or pass '
                    '--tfds-data-dir (or set TFDS_DATA_DIR) where the set is prepared.') from e
  if not builder.is_prepared():
    if not download:
      found = _prepared_versions(data_dir, spec.split('/')[0].split(':')[0])
      other = f' ({data_dir} holds {", ".join(found)}: name it with its version)' if found else ''
      raise TfdsError(f'{PREFIX}{spec} is not prepared in {data_dir} (looked for {builder.data_dir}){other}; '
                      + _not_prepared_hint(spec, data_dir))
    log(f'downloading and preparing {PREFIX}{spec} in {data_dir} (array_record)')
    builder.download_and_prepare(file_format='array_record')
  info = builder.info
  formats = {getattr(f, 'value', str(f)) for f in info.available_file_formats()}
  if not formats & set(RANDOM_ACCESS_FORMATS) and not _tensorflow_imports():
    raise TfdsError(
        f'{PREFIX}{spec} in {builder.data_dir} is prepared as {_file_format(info)}, which needs TensorFlow '
        f'to read; install tensorflow-cpu, or prepare it again as array_record in another data dir: '
        + _not_prepared_hint(spec, '<new dir>').split(', or ', 1)[1])
  image_key, label_key, classes = _find_features(spec, info)
  return TfdsSource(spec, builder, data_dir, image_key, label_key, classes, {})


def default_val_split(source: TfdsSource) -> str:
  """'validation', else 'test'; a set with neither needs data.val_split (e.g. train[80%:])."""
  splits = source.builder.info.splits
  for name in ('validation', 'test'):
    if name in splits:
      return name
  raise TfdsError(f'{PREFIX}{source.spec} has no validation or test split (its splits: '
                  f'{_split_sizes(source.builder.info)}); set data.val_split and data.train_split, e.g. '
                  'train[80%:] and train[:80%]')
