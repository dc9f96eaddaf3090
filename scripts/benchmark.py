#!/usr/bin/env python
"""benchmarks/benchmark.py under its earlier path: tl_jax against the PyTorch tutorial, same data, same run."""

import runpy
from pathlib import Path

if __name__ == '__main__':
  runpy.run_path(str(Path(__file__).resolve().parents[1] / 'benchmarks' / 'benchmark.py'), run_name='__main__')
