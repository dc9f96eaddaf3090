"""The torch <-> Flax name table: exact round trips and loud failures."""

import jax
import numpy as np
import pytest

from helpers import random_torchvision_model, state_dict_numpy
from tl_jax.convert import (ConversionError, flax_to_torch, guess_arch, head_num_classes, name_table,
                            replace_head, torch_to_flax)
from tl_jax.models import create_model, init_variables

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')


@pytest.mark.parametrize('arch', ['resnet18', pytest.param('resnet34', marks=pytest.mark.slow),
                                  pytest.param('resnet50', marks=pytest.mark.slow)])
def test_round_trip_is_identical_and_loads_strictly(arch):
  tmodel = random_torchvision_model(arch, 5)
  sd = state_dict_numpy(tmodel)
  model = create_model(arch, 5)
  reference = init_variables(model, jax.random.PRNGKey(0), 32)
  variables = torch_to_flax(sd, arch, reference=reference)
  # Same tree structure and shapes as the Flax model's own init.
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(reference)
  back = flax_to_torch(variables, arch)
  assert back.keys() == sd.keys()
  for name, value in sd.items():
    if name.endswith('num_batches_tracked'):
      # Dropped on import (torch only reads it when momentum=None); exported as 0.
      assert back[name].dtype == np.int64 and back[name].shape == ()
      continue
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  fresh = getattr(torchvision.models, arch)(num_classes=5)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  for name, tensor in fresh.state_dict().items():
    if not name.endswith('num_batches_tracked'):
      assert torch.equal(tensor, tmodel.state_dict()[name]), name


def test_name_table_covers_every_torchvision_tensor():
  for arch in ['resnet18', 'resnet34', 'resnet50', 'resnet101']:
    model = getattr(torchvision.models, arch)()
    expected = {k for k in model.state_dict() if not k.endswith('num_batches_tracked')}
    assert {e.torch_name for e in name_table(arch)} == expected, arch


def test_errors_list_every_missing_unexpected_and_misshaped_name():
  sd = state_dict_numpy(random_torchvision_model('resnet18', 5))
  del sd['layer2.0.downsample.0.weight']
  sd['extra.weight'] = np.zeros(3, np.float32)
  sd['layer1.0.conv1.weight'] = np.zeros((64, 64, 5, 5), np.float32)
  reference = init_variables(create_model('resnet18', 5), jax.random.PRNGKey(0), 32)
  with pytest.raises(ConversionError) as info:
    torch_to_flax(sd, 'resnet18', reference=reference)
  msg = str(info.value)
  assert 'layer2.0.downsample.0.weight' in msg and 'extra.weight' in msg
  assert 'layer1.0.conv1.weight' in msg and '(64, 64, 5, 5)' in msg and '(64, 64, 3, 3)' in msg


def test_weights_of_another_arch_are_rejected():
  sd = state_dict_numpy(random_torchvision_model('resnet34', 5))
  with pytest.raises(ConversionError, match='this looks like a resnet34 state dict; pass --arch resnet34'):
    torch_to_flax(sd, 'resnet18')
  assert guess_arch(sd) == 'resnet34'


def test_class_count_mismatch_is_named():
  sd = state_dict_numpy(random_torchvision_model('resnet18', 1000))
  reference = init_variables(create_model('resnet18', 2), jax.random.PRNGKey(0), 32)
  with pytest.raises(ConversionError, match=r'fc.weight: file has \(1000, 512\), resnet18 needs \(2, 512\)'):
    torch_to_flax(sd, 'resnet18', reference=reference)
  assert head_num_classes(sd) == 1000


@pytest.mark.slow
def test_replace_head_keeps_backbone_and_draws_fc_like_nn_linear():
  sd = state_dict_numpy(random_torchvision_model('resnet18', 1000))
  variables = torch_to_flax(sd, 'resnet18', include_head=False)
  assert 'fc' not in variables['params']
  fresh = init_variables(create_model('resnet18', 2), jax.random.PRNGKey(3), 32)
  merged = replace_head(variables, fresh)
  assert merged['params']['fc']['kernel'].shape == (512, 2)
  np.testing.assert_array_equal(merged['params']['conv1']['kernel'], variables['params']['conv1']['kernel'])
  # nn.Linear(512, K): weight and bias ~ U(-1/sqrt(512), 1/sqrt(512)); compare the spread
  # against torch's own draw of a wide layer.
  bound = 1 / np.sqrt(512)
  big = init_variables(create_model('resnet18', 4096), jax.random.PRNGKey(4), 32)['params']['fc']
  torch_fc = torch.nn.Linear(512, 4096)
  for ours, theirs in [(big['kernel'], torch_fc.weight.detach().numpy()),
                       (big['bias'], torch_fc.bias.detach().numpy())]:
    ours = np.asarray(ours)
    assert np.abs(ours).max() <= bound
    assert abs(ours.std() - theirs.std()) < 0.02 * theirs.std()
    assert abs(ours.mean()) < 0.01 * bound * 10


VGG_ARCHS = ['vgg11', 'vgg11_bn', 'vgg13', 'vgg13_bn', 'vgg16', 'vgg16_bn', 'vgg19', 'vgg19_bn']


@pytest.mark.slow   # the default tier converts VGG in test_vgg (vgg11_bn logits) and round-trips resnet18 here
@pytest.mark.parametrize('arch', VGG_ARCHS)
def test_vgg_round_trip_is_identical_and_loads_strictly(arch):
  tmodel = random_torchvision_model(arch, 3)
  sd = state_dict_numpy(tmodel)
  assert {e.torch_name for e in name_table(arch)} == {k for k in sd if not k.endswith('num_batches_tracked')}
  variables = torch_to_flax(sd, arch)
  back = flax_to_torch(variables, arch)
  assert back.keys() == sd.keys()
  for name, value in sd.items():
    if not name.endswith('num_batches_tracked'):
      assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  fresh = getattr(torchvision.models, arch)(num_classes=3)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  assert guess_arch(sd) == arch and head_num_classes(sd) == 3


@pytest.mark.slow
def test_vgg_tree_matches_the_flax_model_and_the_head_is_replaced():
  sd = state_dict_numpy(random_torchvision_model('vgg11_bn', 1000))
  fresh = init_variables(create_model('vgg11_bn', 4), jax.random.PRNGKey(0), 32)
  variables = torch_to_flax(sd, 'vgg11_bn', reference=fresh, include_head=False)
  assert 'classifier_6' not in variables['params']
  merged = replace_head(variables, fresh)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(fresh)
  assert merged['params']['classifier_6']['kernel'].shape == (4096, 4)
  np.testing.assert_array_equal(merged['params']['classifier_3']['kernel'], sd['classifier.3.weight'].T)
  # nn.Linear(4096, 4)'s init: U(-1/64, 1/64); torchvision's from-scratch N(0, 0.01) would exceed it.
  assert np.abs(merged['params']['classifier_6']['kernel']).max() <= 1 / 64
  plain = init_variables(create_model('vgg11', 4), jax.random.PRNGKey(0), 32)
  assert plain['batch_stats'] == {}


@pytest.mark.slow
def test_a_state_dict_of_the_other_vgg_family_names_the_right_arch():
  sd = state_dict_numpy(random_torchvision_model('vgg11_bn', 3))
  with pytest.raises(ConversionError) as info:
    torch_to_flax(sd, 'vgg11')
  assert 'this looks like a vgg11_bn state dict; pass --arch vgg11_bn' in str(info.value)
  assert len(str(info.value).splitlines()) == 1
  # Within one family, a damaged file still lists every name.
  del sd['features.4.weight']
  sd['classifier.0.weight'] = sd['classifier.0.weight'][:, :100]
  reference = init_variables(create_model('vgg11_bn', 3), jax.random.PRNGKey(0), 32)
  with pytest.raises(ConversionError, match=r'missing \(1\): features.4.weight') as info:
    torch_to_flax(sd, 'vgg11_bn', reference=reference)
  assert 'classifier.0.weight: file has (4096, 100), vgg11_bn needs (4096, 25088)' in str(info.value)
