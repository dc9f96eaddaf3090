"""XLA:CPU settings tl_jax applies before JAX starts its backend (on import of `tl_jax`).

jaxlib 0.10 hands every convolution to YNNPACK by default ("individual_convolution" fusions).
For the ResNet and VGG training steps on CPU that is the slow choice: with YNNPACK's
convolutions switched off (XLA's own Eigen kernels instead) the ResNet-18 train steps take
markedly less time (benchmarks/bench_step.py measures it; the README has the numbers).
Numerics stay within float32 rounding (the parity tests run with it). The flag is added to XLA_FLAGS only
- for jaxlib versions known to have it (an XLA flag the library does not know aborts the process);
- when XLA_FLAGS does not already set it (the user's choice wins);
- unless TL_JAX_XLA_DEFAULTS=0.
It takes effect only if JAX's backend has not started yet; importing tl_jax first is enough.

Forward-only steps (evaluation, prediction) go one step further and compile
with YNNPACK's fusions off altogether (`forward_compiler_options`, per compiled step): there,
YNNPACK's "reduce" and "dot" fusions grow from the average pool and `fc` backwards over the
last convolutions (layer3/layer4 of a ResNet) and run them as YNNPACK convolutions, the slow
ones. Without them the ResNet-18 eval step at batch 32 ran in 0.88x the time and VGG11's at
batch 8 in 0.86x (one process, variants interleaved). Train steps keep the process setting:
there YNNPACK runs BatchNorm's reductions, and with it off the finetune step took 1.17x as long.
So does the cached-feature pass (tl_jax.training.features.cached_loaders), so that its features round as the
backbone inside the train step does.
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Optional

FLAG = '--xla_cpu_experimental_ynn_fusion_type'
VALUE = '-individual_convolution'
OPT_OUT_ENV = 'TL_JAX_XLA_DEFAULTS'
# jaxlib releases whose XLA knows FLAG with the +/- list syntax (checked in each wheel).
MIN_JAXLIB = (0, 9, 0)


# Per-step compiler options (jax.jit(..., compiler_options=...)): DebugOptions' own field, so
# the value is the enum list itself ('' = no YNNPACK fusions), not XLA_FLAGS' +/- syntax.
FORWARD_OPTIONS = {FLAG.lstrip('-'): ''}


def _version(text: str) -> tuple[int, ...]:
  parts = []
  for piece in text.split('.')[:3]:
    digits = ''.join(ch for ch in piece if ch.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts)


def flags_to_add(environ: Mapping[str, str], jaxlib_version: Optional[str]) -> Optional[str]:
  """The XLA_FLAGS value tl_jax would set, or None to leave the environment alone."""
  if environ.get(OPT_OUT_ENV, '1') == '0' or jaxlib_version is None:
    return None
  if _version(jaxlib_version) < MIN_JAXLIB:
    return None
  current = environ.get('XLA_FLAGS', '')
  if FLAG in current:
    return None
  return f'{current} {FLAG}={VALUE}'.strip()


def _installed_jaxlib() -> Optional[str]:
  try:
    from importlib.metadata import PackageNotFoundError, version
    return version('jaxlib')
  except PackageNotFoundError:
    return None


def forward_options_for(environ: Mapping[str, str], jaxlib_version: Optional[str], platform: str) -> dict:
  """The compiler options of a forward-only step: FORWARD_OPTIONS on CPU wherever `flags_to_add` would
  set tl_jax's flag (so not for a user's own value of it, an opt-out or an older jaxlib)."""
  # The flag `apply` already added is tl_jax's own, not the user's: judge XLA_FLAGS without it.
  others = ' '.join(f for f in environ.get('XLA_FLAGS', '').split() if f != f'{FLAG}={VALUE}')
  if platform != 'cpu' or flags_to_add({**environ, 'XLA_FLAGS': others}, jaxlib_version) is None:
    return {}
  return dict(FORWARD_OPTIONS)


def forward_compiler_options() -> dict:
  """`compiler_options` for jitting a forward-only step on JAX's default backend (see the module doc)."""
  import jax
  return forward_options_for(os.environ, _installed_jaxlib(), jax.default_backend())


def apply(environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Adds the flag to `environ` (default os.environ) where `flags_to_add` says so; True if it did."""
  environ = os.environ if environ is None else environ
  value = flags_to_add(environ, _installed_jaxlib())
  if value is None:
    return False
  environ['XLA_FLAGS'] = value
  return True
