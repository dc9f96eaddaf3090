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


# Models whose parity tests hold several GiB (hundreds of millions of parameters, or 384-600 px inputs):
# under pytest-xdist they share one group, so two of them never run at once in a 24 GiB machine (the README's
# slow tier runs in one process: some of its other tests hold ~12 GiB too).
LARGE_ARCHS = {'vit_h_14', 'vit_l_16', 'vit_l_32', 'regnet_y_128gf', 'regnet_y_32gf', 'efficientnet_b7',
               'efficientnet_v2_l'}


def pytest_collection_modifyitems(config, items):
  """Under `-n N --dist loadgroup` (the README's default-tier command) a test file runs in one worker, as
  `--dist loadfile` would place it (its module fixtures are built once), and the large models' tests in one."""
  if not config.pluginmanager.hasplugin('xdist'):
    return
  for item in items:
    if any(item.iter_markers('xdist_group')):
      continue
    arch = getattr(item, 'callspec', None) and item.callspec.params.get('arch')
    group = 'large_archs' if arch in LARGE_ARCHS else item.nodeid.split('::')[0]
    item.add_marker(pytest.mark.xdist_group(group))


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
