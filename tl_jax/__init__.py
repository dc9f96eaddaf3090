"""tl_jax: transfer learning for image classification in JAX/Flax, equal to the torchvision recipe."""

from tl_jax import xla_defaults as _xla_defaults

# Before JAX creates its CPU backend: see tl_jax/xla_defaults.py.
_xla_defaults.apply()
