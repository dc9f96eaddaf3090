"""The package's shape: imports point down (each module imports only from its own layer or lower
ones), no two modules import each other directly or around a loop (function-level imports count),
and no function is longer than 80 lines."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'tl_jax'

# Low to high. A module belongs to the first layer that names it or a package above it.
LAYERS = (
    ('tl_jax', 'tl_jax.xla_defaults', 'tl_jax.cli', 'tl_jax.extras', 'tl_jax.fetch', 'tl_jax.losses', 'tl_jax.metrics',
     'tl_jax.calibration', 'tl_jax.plots', 'tl_jax.presets'),  # runtime settings, leaf helpers, package data
    ('tl_jax.models',),                                 # Flax modules; nothing outside models/
    ('tl_jax.optim',),                                  # stage labels -> optax
    ('tl_jax.data',),                                   # files -> transforms -> loader -> caches
    ('tl_jax.weight_files', 'tl_jax.weights', 'tl_jax.convert'),               # torch files and name tables: models meet weights
    ('tl_jax.config',),                                 # the recipe schema: checks against all of the above
    ('tl_jax.checkpoint', 'tl_jax.parallel', 'tl_jax.rundir', 'tl_jax.feature_cache',
     'tl_jax.inference', 'tl_jax.export'),
    ('tl_jax.evaluate', 'tl_jax.predict', 'tl_jax.onnx_export', 'tl_jax.data_check'),
    ('tl_jax.training',),                               # state, steps, stages, the run loop
    ('tl_jax.commands',),                               # the command line
)


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path) -> set[str]:
  """tl_jax modules `path` imports anywhere in its body ('from tl_jax.x import y' counts x.y when
  x.y is a module, else x)."""
  module = _module_name(path)
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      for alias in node.names:
        candidate = f'{base}.{alias.name}'
        found.add(candidate if candidate in _all_modules() else base)
  return {name for name in found if name == 'tl_jax' or name.startswith('tl_jax.')}


def _all_modules() -> set[str]:
  return {_module_name(p) for p in PACKAGE.rglob('*.py')}


def _layer(module: str) -> int:
  for index, names in enumerate(LAYERS):
    if any(module == name or (name != 'tl_jax' and module.startswith(name + '.')) for name in names):
      return index
  raise AssertionError(f'{module} is in no layer of test_layering.LAYERS: add it where it belongs')


def _graph() -> dict[str, set[str]]:
  return {_module_name(p): _imports(p) - {_module_name(p)} for p in PACKAGE.rglob('*.py')}


def test_every_import_points_down_or_sideways():
  upward = [f'{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})'
            for module, targets in sorted(_graph().items()) for target in sorted(targets)
            if _layer(target) > _layer(module)]
  assert not upward, '\n'.join(upward)


def test_no_import_cycles():
  graph = _graph()
  # Importing a package runs its __init__, so a module that imports tl_jax.models.x also imports
  # tl_jax.models; the edge from a package to its own submodules is what makes a package, not a cycle.
  state: dict[str, str] = {}
  cycles = []

  def visit(module, path):
    state[module] = 'open'
    for target in sorted(graph.get(module, ())):
      if state.get(target) == 'open':
        cycles.append(' -> '.join(path[path.index(target):] + [target]))
      elif target not in state:
        visit(target, path + [target])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, '\n'.join(cycles)


def test_the_checks_see_a_bad_edge(tmp_path, monkeypatch):
  # The scan itself must find an upward, function-level import and a cycle.
  fake = tmp_path / 'tl_jax'
  (fake / 'models').mkdir(parents=True)
  (fake / '__init__.py').write_text('')
  (fake / 'models' / '__init__.py').write_text('def f():\n  from tl_jax import training\n')
  (fake / 'training.py').write_text('from tl_jax import models\n')
  monkeypatch.setattr(__import__(__name__), 'PACKAGE', fake)
  graph = _graph()
  assert graph['tl_jax.models'] == {'tl_jax.training'} and graph['tl_jax.training'] == {'tl_jax.models'}
  with pytest.raises(AssertionError, match=re.escape('tl_jax.models (layer 1) imports tl_jax.training (layer 8)')):
    test_every_import_points_down_or_sideways()
  with pytest.raises(AssertionError, match=re.escape('tl_jax.models -> tl_jax.training -> tl_jax.models')):
    test_no_import_cycles()
  (fake / 'training.py').write_text('def f():\n' + '  pass\n' * 80)
  with pytest.raises(AssertionError, match=re.escape('tl_jax/training.py:1 f (81 lines)')):
    test_no_function_in_the_package_is_over_80_lines()


def test_no_function_in_the_package_is_over_80_lines():
  long = []
  for path in sorted(PACKAGE.rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
        long.append(f'{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} '
                    f'({node.end_lineno - node.lineno + 1} lines)')
  assert not long, '\n'.join(long)
