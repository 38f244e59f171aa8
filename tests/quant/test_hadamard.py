"""random_hadamard / hadamard_transform against a NumPy Sylvester recursion and block loop, and the
weight-gradient identity (H x)^T (H g) = x^T g with and without NVFP4 quantisation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nemojax.quant import hadamard_transform, quantize, random_hadamard


def sylvester(n: int):
    s = np.ones((1, 1))
    while len(s) < n:
        s = np.block([[s, s], [s, -s]])
    return s


@pytest.mark.parametrize("n", [1, 2, 16, 64])
def test_random_hadamard_is_orthogonal_sylvester_times_signs(n):
    h = np.asarray(random_hadamard(jax.random.key(0), n), np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    signs = h * np.sqrt(n) / sylvester(n)  # H = S D / sqrt(n): each column of S scaled by one sign
    np.testing.assert_allclose(np.abs(signs), 1, atol=1e-6)
    np.testing.assert_allclose(signs, np.broadcast_to(signs[:1], (n, n)), atol=1e-6)


def test_random_hadamard_depends_on_key():
    a, b = (np.asarray(random_hadamard(jax.random.key(s))) for s in (0, 1))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(random_hadamard(jax.random.key(0))), a)


@pytest.mark.parametrize("axis", [0, -1])
def test_transform_is_blockwise_h(axis):
    rng = np.random.default_rng(0)
    h = np.asarray(random_hadamard(jax.random.key(2)), np.float64)
    x = rng.standard_normal((48, 32)).astype(np.float32)
    xm = np.moveaxis(x.astype(np.float64), axis, 0)
    expected = np.concatenate([h @ xm[i:i + 16] for i in range(0, len(xm), 16)])
    np.testing.assert_allclose(np.asarray(hadamard_transform(x, h, axis=axis)),
                               np.moveaxis(expected, 0, axis), rtol=0, atol=1e-5)


def _wgrad_operands():
    """Activations with a few large outliers (what the RHT spreads) and gradients correlated with them,
    tokens on axis 0; the correlation makes x^T g large against the quantisation noise, so a wrong
    product cannot hide inside the error bound."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 24)).astype(np.float32)
    x[rng.integers(0, 256, 8), rng.integers(0, 24, 8)] *= 30
    g = (x @ rng.standard_normal((24, 40)) / 5 + rng.standard_normal((256, 40))).astype(np.float32)
    return x, g


def test_weight_gradient_unchanged_without_quantisation():
    x, g = _wgrad_operands()
    h = random_hadamard(jax.random.key(3))
    hx, hg = (np.asarray(hadamard_transform(a, h, axis=0), np.float64) for a in (x, g))
    exact = x.astype(np.float64).T @ g
    assert np.abs(hx.T @ hg - exact).max() <= 1e-5 * np.abs(x).max() * np.abs(g).max() * len(x)
    assert np.abs(hx - x).max() > 1  # the transform did change the operands


def test_weight_gradient_with_quantisation_within_the_quantisation_error():
    """dW = Q(Hx)^T Q(Hg) (NVFP4 1x16 blocks along tokens, stochastic rounding on the gradient) differs
    from x^T g = (Hx)^T (Hg) by at most ||Q(Hx) - Hx||_F ||Q(Hg)||_2 + ||Hx||_2 ||Q(Hg) - Hg||_F."""
    x, g = _wgrad_operands()
    h = random_hadamard(jax.random.key(4))
    hx, hg = hadamard_transform(x, h, axis=0), hadamard_transform(g, h, axis=0)
    qx = quantize(hx, "nvfp4", axis=0)
    qg = quantize(hg, "nvfp4", axis=0, rounding="stochastic", key=jax.random.key(5))
    hx, hg, qx, qg = (np.asarray(a, np.float64) for a in (hx, hg, qx, qg))
    norm = np.linalg.norm
    exact = x.astype(np.float64).T @ g
    error = norm(qx.T @ qg - exact)
    assert error <= (norm(qx - hx) * norm(qg, 2) + norm(hx, 2) * norm(qg - hg)) * (1 + 1e-5)
    # measured: 0.06 of ||x^T g|| (0.07 without the RHT); a product missing H on one side is off by ~1
    assert error < 0.15 * norm(exact)


def test_bad_arguments():
    for n in (0, 3, 12, True):
        with pytest.raises(ValueError, match="n must be a power of two"):
            random_hadamard(jax.random.key(0), n)
    h = random_hadamard(jax.random.key(0))
    with pytest.raises(ValueError, match=r"x.shape\[0\] = 40 must be a multiple of the Hadamard size 16"):
        hadamard_transform(np.ones((40, 3), np.float32), h, axis=0)
    with pytest.raises(ValueError, match="h must be a square matrix"):
        hadamard_transform(np.ones((32,), np.float32), h[:8])
    with pytest.raises(ValueError, match=r"axis must be in \[-2, 2\)"):
        hadamard_transform(np.ones((32, 16), np.float32), h, axis=2)
