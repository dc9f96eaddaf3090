"""Plain PyTorch implementations that tl_jax is measured against (the tutorial, as written)."""
