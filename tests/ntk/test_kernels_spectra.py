"""NTK kernels and spectra against Monte Carlo, finite-width networks and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import spherical_in

from conftest import sphere_points

from nemojax import ntk




def test_arc_cosine_kernels_equal_gaussian_expectations():
    x, z = sphere_points(2, 5, 0)
    w = np.random.default_rng(1).standard_normal((400_000, 5))
    a, b = w @ x, w @ z
    u = x @ z
    assert abs(2 * np.mean(np.maximum(a, 0) * np.maximum(b, 0)) - float(ntk.kappa1(u))) < 1e-2
    assert abs(2 * np.mean((a > 0) & (b > 0)) - float(ntk.kappa0(u))) < 1e-2
    np.testing.assert_allclose([ntk.kappa0(1.0), ntk.kappa1(1.0), ntk.kappa1(-1.0)], [1, 1, 0], atol=1e-12)


def test_ntk_depth_values_and_two_layer_closed_form():
    u = jnp.linspace(-1, 1, 11)
    for depth in (1, 2, 5):
        assert float(ntk.fc_ntk_dot(1.0, depth)) == pytest.approx(depth)
    np.testing.assert_allclose(ntk.fc_ntk_dot(u, 2), u * ntk.kappa0(u) + ntk.kappa1(u), rtol=1e-12)
    # Bietti-Bach two-layer kernel with bias 1: (u + 1) kappa0(u) + kappa1(u) + 1 (output bias)
    np.testing.assert_allclose(ntk.fc_ntk_dot(u, 2, bias=1.0), (u + 1) * ntk.kappa0(u) + ntk.kappa1(u) + 1,
                               rtol=1e-12)


def test_fc_ntk_matches_wide_finite_network():
    """Empirical NTK of f(x) = sqrt(2/m) v^T relu(sqrt(2/m) W2 relu(W1 x)) at width 4096."""
    d, m, depth = 4, 4096, 3
    X = jnp.asarray(sphere_points(5, d, 2) * np.array([[1.0], [2.0], [0.5], [1.0], [3.0]]))
    keys = jax.random.split(jax.random.key(0), 3)
    params = [jax.random.normal(keys[0], (m, d)), jax.random.normal(keys[1], (m, m)), jax.random.normal(keys[2], (m,))]

    def f(p, x):
        h = jax.nn.relu(p[0] @ x)
        h = jax.nn.relu(jnp.sqrt(2 / m) * p[1] @ h)
        return jnp.sqrt(2 / m) * p[2] @ h

    J = jax.vmap(jax.grad(f), in_axes=(None, 0))(params, X)
    flat = jnp.concatenate([j.reshape(len(X), -1) for j in J], axis=1)
    emp = flat @ flat.T
    np.testing.assert_allclose(emp, ntk.fc_ntk(X, depth=depth), rtol=0.08, atol=0.08)


def test_spectrum_of_exponential_kernel_is_modified_spherical_bessel():
    """exp(t) on S^2: mu_k = i_k(1) (Funk-Hecke with the normalised measure); and the sum rule."""
    mu = ntk.zonal_spectrum(np.exp, d=3, kmax=12, n_quad=200)
    # absolute floor ~1e-14 * kappa(1): float64 cancellation in the quadrature sum
    np.testing.assert_allclose(mu, spherical_in(np.arange(13), 1.0), rtol=1e-10, atol=3e-14)
    assert np.sum(mu * [ntk.multiplicity(3, k) for k in range(13)]) == pytest.approx(np.e, rel=1e-12)


@pytest.mark.parametrize("kernel", ["ntk", "laplace"])
def test_circle_spectrum_matches_gram_eigenvalues(kernel):
    """On n equispaced circle points the Gram matrix is circulant: its eigenvalues / n are the DFT
    of its first row, which approximate mu_k."""
    kappa = (lambda t: ntk.fc_ntk_dot(jnp.asarray(t), 3)) if kernel == "ntk" else \
        (lambda t: np.exp(-np.sqrt(np.maximum(2 - 2 * t, 0))))
    n = 4096
    theta = 2 * np.pi * np.arange(n) / n
    X = np.stack([np.cos(theta), np.sin(theta)], 1)
    K = np.asarray(ntk.fc_ntk(jnp.asarray(X), depth=3)) if kernel == "ntk" else np.asarray(ntk.laplace(jnp.asarray(X)))
    dft = np.real(np.fft.fft(K[0])) / n
    mu = ntk.zonal_spectrum(lambda t: np.asarray(kappa(t)), d=2, kmax=10, n_quad=20000)
    np.testing.assert_allclose(dft[:11], mu, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("d", [3, 5])
def test_ntk_and_laplace_decay_like_k_to_minus_d(d):
    k = np.arange(40, 81, 2)
    slopes = {}
    for name, kappa in [("ntk", lambda t: np.asarray(ntk.fc_ntk_dot(jnp.asarray(t), 3))),
                        ("laplace", lambda t: np.exp(-np.sqrt(np.maximum(2 - 2 * t, 0))))]:
        mu = ntk.zonal_spectrum(kappa, d=d, kmax=80, n_quad=8000)[k]
        slopes[name] = np.polyfit(np.log(k), np.log(mu), 1)[0]
    assert slopes["ntk"] == pytest.approx(-d, abs=0.2)
    assert slopes["laplace"] == pytest.approx(-d, abs=0.2)


def test_multiplicities():
    assert [ntk.multiplicity(2, k) for k in range(4)] == [1, 2, 2, 2]
    assert [ntk.multiplicity(3, k) for k in range(4)] == [1, 3, 5, 7]
    # S^3: (k+1)^2
    assert [ntk.multiplicity(4, k) for k in range(5)] == [1, 4, 9, 16, 25]


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth must be"):
        ntk.fc_ntk_dot(0.5, 0)
    with pytest.raises(ValueError, match="gamma must be"):
        ntk.gamma_exponential(jnp.ones((2, 3)), gamma=3.0)
