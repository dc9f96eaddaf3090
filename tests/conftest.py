"""Test-wide settings: float32 parity needs JAX's most precise matmuls."""

import sys
from pathlib import Path

import tl_jax  # noqa: F401  first: its XLA:CPU flags must be set before JAX starts a backend (tl_jax.xla_defaults)
import jax
import pytest

jax.config.update('jax_default_matmul_precision', 'highest')
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_terminal_summary(terminalreporter):
  """The measured parity errors: the worst value of each check next to its tolerance."""
  from helpers import MEASURED, TOL
  if not MEASURED:
    return
  worst: dict[tuple[str, str], tuple[float, str]] = {}
  for test_id, what, err, tol_key in MEASURED:
    key = (what, tol_key)
    if key not in worst or err > worst[key][0]:
      worst[key] = (err, test_id)
  write = terminalreporter.write_line
  terminalreporter.section('parity: worst measured error per check')
  width = max(len(what) for what, _ in worst)
  for (what, tol_key), (err, test_id) in sorted(worst.items()):
    write(f'{what:<{width}}  {err:.3e}  <= {TOL[tol_key]:.0e} ({tol_key})  {test_id}')


# torch and torchvision for the transform parity tests; they skip cleanly where torch is missing.
@pytest.fixture(scope='module')
def torch():
  return pytest.importorskip('torch')


@pytest.fixture(scope='module')
def tvt(torch):
  pytest.importorskip('torchvision')
  from torchvision import transforms
  return transforms


@pytest.fixture(scope='module')
def tvf(torch):
  pytest.importorskip('torchvision')
  from torchvision.transforms import functional
  return functional
