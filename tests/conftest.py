"""Test set-up: 8 fake CPU devices for sharding tests (must precede the first `import jax`)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
