"""Speed comparisons with PyTorch and the plain PyTorch tutorial they run against; not part of the package."""

import json
import os
from pathlib import Path


def write_json(path, data, indent: int = 2) -> None:
  """Writes a benchmark's report as JSON and says where."""
  Path(path).write_text(json.dumps(data, indent=indent))
  print(f'wrote {os.path.abspath(path)}')
