"""Optional dependencies (the `check` and `onnx` extras): imported where used, named in one line when missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, error: type[Exception], needed_by: str, install_hint: str) -> ModuleType:
  """`module` imported, or `error('<needed_by> needs <module>, which is not installed; <install_hint>')`."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise error(f'{needed_by} needs {module}, which is not installed; {install_hint}') from e
