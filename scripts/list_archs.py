#!/usr/bin/env python
"""`tl-jax archs` from a checkout; see tl_jax/commands/archs.py (--help lists the options)."""

from tl_jax import cli
from tl_jax.commands import archs

if __name__ == '__main__':
  cli.run(archs.main)
