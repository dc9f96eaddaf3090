#!/usr/bin/env python
"""`tl-jax evaluate` from a checkout; see tl_jax/commands/evaluate.py (--help lists the options)."""

from tl_jax import cli
from tl_jax.commands import evaluate

if __name__ == '__main__':
  cli.run(evaluate.main)
