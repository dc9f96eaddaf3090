"""XLA:CPU settings tl_jax applies before JAX starts its backend (on import of `tl_jax`).

jaxlib 0.10 hands every convolution to YNNPACK by default ("individual_convolution" fusions).
For the ResNet and VGG training steps on CPU that is the slow choice: with YNNPACK's
convolutions switched off (XLA's own Eigen kernels instead) the ResNet-18 fine-tune step at
batch 4 ran in 0.55-0.65x the time on 2 cores, the frozen step in 0.55x, and the tutorial's
epochs went from slower than PyTorch's to faster (scripts/bench_step.py, scripts/benchmark.py;
the README has the numbers). Numerics stay within float32 rounding (the parity tests run with
it). The flag is added to XLA_FLAGS only
- for jaxlib versions known to have it (an XLA flag the library does not know aborts the process);
- when XLA_FLAGS does not already set it (the user's choice wins);
- unless TL_JAX_XLA_DEFAULTS=0.
It takes effect only if JAX's backend has not started yet; importing tl_jax first is enough.
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Optional

FLAG = '--xla_cpu_experimental_ynn_fusion_type'
VALUE = '-individual_convolution'
OPT_OUT_ENV = 'TL_JAX_XLA_DEFAULTS'
# jaxlib releases whose XLA knows FLAG with the +/- list syntax (checked in each wheel).
MIN_JAXLIB = (0, 9, 0)


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


def apply(environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Adds the flag to `environ` (default os.environ) where `flags_to_add` says so; True if it did."""
  environ = os.environ if environ is None else environ
  try:
    from importlib.metadata import PackageNotFoundError, version
    jaxlib_version: Optional[str] = version('jaxlib')
  except PackageNotFoundError:
    jaxlib_version = None
  value = flags_to_add(environ, jaxlib_version)
  if value is None:
    return False
  environ['XLA_FLAGS'] = value
  return True
