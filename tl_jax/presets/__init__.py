"""The --strategy presets (YAML recipes), shipped as package data; see tl_jax.config.load_recipe."""
