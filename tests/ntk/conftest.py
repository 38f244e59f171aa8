"""Every NTK test runs in float64 (the kernels are compared to closed forms at ~1e-10)."""

import numpy as np
import pytest
from jax import enable_x64


@pytest.fixture(autouse=True)
def x64():
    with enable_x64():
        yield


def sphere_points(n=4, d=3, seed=0):
    """n points drawn uniformly on the unit sphere S^{d-1}."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)
