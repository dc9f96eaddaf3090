#!/usr/bin/env python
"""`tl-jax export-onnx` from a checkout; see tl_jax/commands/export_onnx.py (--help lists the options)."""

from tl_jax import cli
from tl_jax.commands import export_onnx

if __name__ == '__main__':
  cli.run(export_onnx.main)
