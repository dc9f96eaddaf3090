"""tl_jax.models.nnx_bridge: the NNX module holds the given variables and gives the Linen module's logits."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

from tl_jax.models import TransferModel, create_model, head_name, init_variables
from tl_jax.models.nnx_bridge import to_nnx


def _logits(nnx_model, images):
  return np.asarray(nnx.jit(lambda m, x: m(x, train=False))(nnx_model, images))


def _linen_logits(model, variables, images):
  # Jitted too: the same computation compiled the same way (eager op-by-op rounds differently).
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['resnet18', 'vgg11_bn'])
def test_nnx_module_gives_the_linen_logits(arch):
  model = create_model(arch, 3)
  variables = init_variables(model, jax.random.PRNGKey(0), image_size=32)
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  nnx_model = to_nnx(model, variables, seed=1)   # its own initialisation draws other numbers
  held = nnx.state(nnx_model)
  head = head_name(arch)
  np.testing.assert_array_equal(np.asarray(held[head]['kernel'][...]), np.asarray(variables['params'][head]['kernel']))
  np.testing.assert_allclose(_logits(nnx_model, images), _linen_logits(model, variables, images), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_transfer_model_with_its_own_head():
  model = TransferModel('resnet18', nn.Dense(4))
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  images = np.ones((1, 32, 32, 3), np.float32)
  np.testing.assert_allclose(_logits(to_nnx(model, variables, seed=1), images),
                             _linen_logits(model, variables, images), rtol=1e-6, atol=1e-7)
