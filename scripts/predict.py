#!/usr/bin/env python
"""`tl-jax predict` from a checkout; see tl_jax/commands/predict.py (--help lists the options)."""

from tl_jax import cli
from tl_jax.commands import predict

if __name__ == '__main__':
  cli.run(predict.main)
