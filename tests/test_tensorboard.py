"""The TensorBoard callback: a run of the real loop writes event files under <workdir>/tb/ that read back
(TFRecord framing and tensorboardX's Event protos, no TensorFlow) to the run's own history."""

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import compilation_cache, head_only_values, two_class_folder  # noqa: F401 (a fixture)
from tl_jax.config import validate
from tl_jax.training import train_and_evaluate
from tl_jax.training.tensorboard import TensorBoard

pytestmark = pytest.mark.usefixtures('compilation_cache')
event_pb2 = pytest.importorskip('tensorboardX.proto.event_pb2')


def read_events(logdir: Path) -> tuple[dict, dict]:
  """({tag: [(step, value)]}, {tag: [(step, HxWx3 image)]}) of every event file under `logdir`."""
  scalars, images = {}, {}
  for path in sorted(logdir.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      length, = struct.unpack('<Q', data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]   # after the length and its CRC
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField('image'):
          pixels = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert('RGB'))
          images.setdefault(value.tag, []).append((event.step, pixels))
        else:
          scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars, images


def test_a_run_logs_its_epochs_steps_train_batch_and_confusion_matrix(tmp_path):
  data = two_class_folder(tmp_path / 'data')
  config = validate(head_only_values(data, [{'name': 'head', 'epochs': 2}]))
  result = train_and_evaluate(config, tmp_path / 'run', log=lambda _: None, callbacks=[TensorBoard(every=2)],
                              progress=False, plots=False, report=True)
  scalars, images = read_events(tmp_path / 'run' / 'tb')
  for tag, key in (('loss/train', 'train_loss'), ('loss/val', 'val_loss'), ('accuracy/train', 'train_acc'),
                   ('accuracy/val', 'val_acc'), ('lr', 'lr')):
    assert [step for step, _ in scalars[tag]] == [0, 1], tag
    np.testing.assert_allclose([v for _, v in scalars[tag]], [r[key] for r in result.history], rtol=1e-6)
  # 3 train steps an epoch: run steps 0..5, every second one.
  assert [step for step, _ in scalars['step/loss']] == [0, 2, 4]
  assert [step for step, _ in scalars['step/lr']] == [0, 2, 4]
  # The train batch, de-normalised: the grid's pixels span the images' range, not Normalize's output.
  (step, grid), = images['train_batch']
  assert step == 0 and grid.shape[-1] == 3 and grid.max() > 150
  (step, confusion), = images['confusion_matrix']
  assert step == result.best_epoch
  np.testing.assert_array_equal(confusion, np.asarray(Image.open(tmp_path / 'run' / 'confusion.png').convert('RGB')))


def test_train_py_flags():
  from tl_jax.commands import train
  assert train.parse_args([]).tensorboard and train.parse_args([]).tb_every == 10
  assert not train.parse_args(['--no-tensorboard']).tensorboard
  with pytest.raises(ValueError, match='every must be >= 0'):
    TensorBoard(every=-1)
