"""Test-wide settings: float32 parity needs JAX's most precise matmuls."""

import os
import sys
from pathlib import Path

import tl_jax  # noqa: F401  first: its XLA:CPU flags must be set before JAX starts a backend (tl_jax.xla_defaults)
import jax
import pytest

jax.config.update('jax_default_matmul_precision', 'highest')
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope='session', autouse=True)
def _session_compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache for the session, shared by pytest-xdist's workers: many tests
  compile the same step of the same tiny model through different jitted functions, which JAX's in-memory
  cache cannot share."""
  from helpers import persistent_compilation_cache
  base = tmp_path_factory.getbasetemp()
  directory = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'jax_cache'
  directory.mkdir(exist_ok=True)
  with persistent_compilation_cache(directory, min_compile_secs=0.2):
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Moves the parity errors a test phase recorded onto its report: under pytest-xdist (the default
  tier's `-n 2`) the tests run in worker processes and only the reports reach the process that prints."""
  from helpers import MEASURED
  report = (yield).get_result()
  report.user_properties.extend(('parity', entry) for entry in MEASURED)
  MEASURED.clear()


def pytest_terminal_summary(terminalreporter):
  """The measured parity errors: the worst value of each check next to its tolerance."""
  from helpers import TOL
  measured = [value for reports in terminalreporter.stats.values() for report in reports
              for name, value in getattr(report, 'user_properties', ()) if name == 'parity']
  if not measured:
    return
  worst: dict[tuple[str, str], tuple[float, str]] = {}
  for test_id, what, err, tol_key in measured:
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
