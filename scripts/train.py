#!/usr/bin/env python
"""`tl-jax train` from a checkout; see tl_jax/commands/train.py (--help lists the options)."""

from tl_jax import cli
from tl_jax.commands import train

if __name__ == '__main__':
  cli.run(train.main)
