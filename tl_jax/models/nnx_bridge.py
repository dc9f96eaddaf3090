"""Any tl_jax model as a Flax NNX module (`flax.nnx.bridge.ToNNX`), holding given variables.

NNX is Flax's API for new code: the module owns its parameters and BatchNorm statistics, and
is called directly, `nnx_model(images_bhwc, train=False)`. The Linen module inside computes,
so the logits are the Linen model's."""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
from flax import nnx
from flax.nnx.bridge import variables as bridge_variables


def to_nnx(model: nn.Module, variables: Mapping, seed: int = 0) -> nnx.Module:
  """An NNX module computing `model` with `variables` ({'params', 'batch_stats'}, e.g. converted
  torchvision weights or a checkpoint's); `seed` seeds its dropout.

  The variables are set as `ToNNX.lazy_init` would set the ones it initialises, so nothing is
  initialised (or computed) here.
  """
  nnx_model = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(seed))
  linen_variables = {k: v for k, v in variables.items() if v}   # no empty 'batch_stats' (plain VGG)
  for name, value in bridge_variables.linen_vars_to_nnx_attrs(linen_variables).items():
    setattr(nnx_model, name, nnx.data(value))
  return nnx_model
