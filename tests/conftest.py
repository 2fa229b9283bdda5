"""Test set-up (before the first `import jax`): 8 fake CPU devices for the sharding tests, and
most XLA optimisations off: the tests' tiny programs compile faster than XLA can optimise them
(about half the suite's CPU time), as Flax's own tests do."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (after the XLA flags above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(params=[np.float64, np.float32], ids=["float64", "float32"])
def precision(request):
    """(dtype, rtol): float64 with x64 enabled (rtol 1e-9), float32 with a float32-sized rtol."""
    dtype = request.param
    with jax.enable_x64(dtype is np.float64):
        yield dtype, (1e-9 if dtype is np.float64 else 2e-5)
