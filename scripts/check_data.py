#!/usr/bin/env python
"""`tl-jax check-data` from a checkout; see tl_jax/commands/check_data.py (--help lists the options)."""

from tl_jax import cli
from tl_jax.commands import check_data

if __name__ == '__main__':
  cli.run(check_data.main)
