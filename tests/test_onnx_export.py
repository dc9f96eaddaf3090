"""tl_jax.onnx_export and scripts/export_onnx.py: ONNX Runtime's logits against tl_jax's on the same
checkpoint, the dynamic batch axis, the preprocessing in the file's metadata, and bad input."""

import json

import jax
import numpy as np
import pytest

from helpers import rel_err, within
from tl_jax import checkpoint
from tl_jax.models import create_model, family_of, init_variables

pytest.importorskip('torch')
pytest.importorskip('torchvision')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')
pytest.importorskip('onnxscript')

from tl_jax import onnx_export  # noqa: E402  (after the skips: it needs the extras at call time only)
from tl_jax.commands import export_onnx as export_command  # noqa: E402

CLASS_NAMES = ['ants', 'bees', 'wasps']


def _randomised_stats(batch_stats, seed):
  """BatchNorm running statistics away from init's 0 / 1, so a mean/var swap or a missed tensor shows."""
  rng = np.random.default_rng(seed)

  def draw(path, value):
    value = np.asarray(value)
    if path[-1].key == 'var':
      return (value * rng.uniform(0.5, 2.0, value.shape)).astype(value.dtype)
    return (value + 0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
  return jax.tree_util.tree_map_with_path(draw, batch_stats)


def make_checkpoint(root, arch, size, seed=0):
  """A model checkpoint of `arch` with random weights and statistics, validated at `size` px."""
  model = create_model(arch, len(CLASS_NAMES), image_size=size if family_of(arch).sized_by_input else None)
  variables = init_variables(model, jax.random.PRNGKey(seed), size)
  variables = {'params': variables['params'], 'batch_stats': _randomised_stats(variables['batch_stats'], seed)}
  preprocessing = {'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225], 'resize_size': size + size // 7,
                   'crop_size': size, 'interpolation': 'bilinear'}
  path = root / f'{arch}_ckpt'
  checkpoint.save_model(path, variables, checkpoint.make_metadata(arch, len(CLASS_NAMES), preprocessing, CLASS_NAMES))
  return path, model, variables


def _check_against_tl_jax(path, model, variables, size, arch, batches=(3,)):
  for batch in batches:   # not the traced batch (2): the batch axis is dynamic
    images_bhwc = np.random.default_rng(batch).standard_normal((batch, size, size, 3)).astype(np.float32)
    ours = np.asarray(model.apply(variables, images_bhwc, train=False))
    theirs = onnx_export.run_onnx(path, images_bhwc)
    assert theirs.shape == ours.shape == (batch, len(CLASS_NAMES))
    assert within(rel_err(theirs, ours), 'logits_rel', f'{arch} {size}px batch {batch}: ONNX Runtime vs tl_jax')


@pytest.fixture(scope='module')
def resnet18_export(tmp_path_factory):
  root = tmp_path_factory.mktemp('onnx')
  ckpt, model, variables = make_checkpoint(root, 'resnet18', 32)
  out = root / 'resnet18.onnx'
  assert export_command.main(['--checkpoint', str(ckpt), '--out', str(out)]) == 0
  return {'root': root, 'ckpt': ckpt, 'out': out, 'model': model, 'variables': variables}


def test_resnet18_logits_equal_tl_jax_at_any_batch(resnet18_export):
  e = resnet18_export
  _check_against_tl_jax(e['out'], e['model'], e['variables'], 32, 'resnet18')


def test_metadata_records_the_val_preprocessing(resnet18_export):
  props = onnx_export.read_metadata(resnet18_export['out'])
  assert props['tl_jax.arch'] == 'resnet18'
  assert json.loads(props['tl_jax.input_size']) == [32, 32]
  assert props['tl_jax.input_layout'] == 'NCHW'
  assert json.loads(props['tl_jax.mean']) == [0.485, 0.456, 0.406]
  assert json.loads(props['tl_jax.std']) == [0.229, 0.224, 0.225]
  assert json.loads(props['tl_jax.class_names']) == CLASS_NAMES
  assert [next(iter(t)) for t in json.loads(props['tl_jax.val_transforms'])] == [
      'Resize', 'CenterCrop', 'ToTensor', 'Normalize']
  session = ort.InferenceSession(str(resnet18_export['out']), providers=['CPUExecutionProvider'])
  (image_input,) = session.get_inputs()
  assert image_input.name == 'images' and image_input.shape[1:] == [3, 32, 32]
  assert isinstance(image_input.shape[0], str), 'the batch axis is not dynamic'


def test_script_refuses_to_overwrite(resnet18_export):
  e = resnet18_export
  with pytest.raises(onnx_export.OnnxExportError, match='already exists; pass --overwrite'):
    export_command.main(['--checkpoint', str(e['ckpt']), '--out', str(e['out'])])


def test_not_a_checkpoint_is_one_line(tmp_path):
  (tmp_path / 'run').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='holds no tl_jax model checkpoint'):
    onnx_export.export_checkpoint(tmp_path / 'run', tmp_path / 'x.onnx')
  assert not (tmp_path / 'x.onnx').exists()


def test_an_op_onnx_cannot_express_is_named_in_one_line(tmp_path):
  torch = pytest.importorskip('torch')

  class Eigen(torch.nn.Module):
    def forward(self, x):
      gram = x[:, 0, :2, :2] @ x[:, 0, :2, :2].transpose(-1, -2)
      return torch.linalg.eigh(gram)[0]

  with pytest.raises(onnx_export.OnnxExportError) as info:
    onnx_export.export_module(Eigen(), np.ones((2, 3, 8, 8), np.float32), tmp_path / 'e.onnx', {}, what='eigen')
  message = str(info.value)
  assert '\n' not in message and message.startswith('cannot export eigen to ONNX:') and 'eigh' in message
  assert not (tmp_path / 'e.onnx').exists()


@pytest.mark.slow
def test_vgg11_logits_equal_tl_jax_below_224px(tmp_path):
  """VGG's AdaptiveAvgPool2d(7) at 32 px (1x1 -> 7x7): the legacy exporter refuses it; this one must not."""
  ckpt, model, variables = make_checkpoint(tmp_path, 'vgg11', 32)
  result = onnx_export.export_checkpoint(ckpt, tmp_path / 'vgg11.onnx', verify=False)
  _check_against_tl_jax(result['out'], model, variables, 32, 'vgg11')


# One arch of each family besides ResNet and VGG (above), the smallest of each.
ZOO = ('inception_v3', 'googlenet', 'densenet121', 'squeezenet1_1', 'alexnet', 'shufflenet_v2_x0_5', 'swin_t',
       'efficientnet_b0', 'convnext_tiny', 'regnet_y_400mf', 'vit_b_32', 'maxvit_t', 'mobilenet_v2',
       'mobilenet_v3_small', 'mnasnet0_5')


def test_zoo_names_one_arch_of_every_family():
  from tl_jax.models import FAMILIES
  assert {family_of(a).name for a in ZOO + ('resnet18', 'vgg11')} == {f.name for f in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize('arch', ZOO)
def test_each_family_exports_and_equals_tl_jax(tmp_path, arch):
  size = max(family_of(arch).init_size(arch), 64)
  ckpt, model, variables = make_checkpoint(tmp_path, arch, size)
  result = onnx_export.export_checkpoint(ckpt, tmp_path / f'{arch}.onnx', verify=False)
  _check_against_tl_jax(result['out'], model, variables, size, arch)
