"""Test set-up: 8 fake CPU devices for sharding tests (must precede the first `import jax`)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the XLA flags above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(params=[np.float64, np.float32], ids=["float64", "float32"])
def precision(request):
    """(dtype, rtol): float64 with x64 enabled (rtol 1e-9), float32 with a float32-sized rtol."""
    dtype = request.param
    with jax.enable_x64(dtype is np.float64):
        yield dtype, (1e-9 if dtype is np.float64 else 2e-5)
