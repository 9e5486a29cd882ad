"""Test set-up: 4 fake CPU devices so sharding tests run anywhere; small, real tests only."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
