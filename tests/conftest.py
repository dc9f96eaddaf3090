"""Test-wide settings: float32 parity needs JAX's most precise matmuls."""

import sys
from pathlib import Path

import jax

jax.config.update('jax_default_matmul_precision', 'highest')
sys.path.insert(0, str(Path(__file__).resolve().parent))
