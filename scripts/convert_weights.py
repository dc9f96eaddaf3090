#!/usr/bin/env python
"""`tl-jax convert` from a checkout; see tl_jax/commands/convert.py (--help lists the options)."""

from tl_jax import cli
from tl_jax.commands import convert

if __name__ == '__main__':
  cli.run(convert.main)
