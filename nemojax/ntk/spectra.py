"""Eigenvalues of dot-product kernels on the sphere S^{d-1} (Funk-Hecke).

For kappa(<x, z>) on S^{d-1} with the uniform probability measure, the spherical harmonics of
degree k are eigenfunctions with eigenvalue
    mu_k = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * int_{-1}^{1} kappa(t) P_k(t) (1 - t^2)^{(d-3)/2} dt,
P_k the Gegenbauer (Legendre-in-dimension-d) polynomial normalised to P_k(1) = 1, and
multiplicity N(d, k). Quadrature: Gauss-Jacobi with alpha = beta = (d-3)/2 (nodes from scipy,
float64); NTK-type kernels are only Hoelder at t = +-1, so use n_quad >> kmax.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.special import gammaln, roots_jacobi


def multiplicity(d: int, k: int) -> int:
    """Number of linearly independent degree-k spherical harmonics on S^{d-1}."""
    if d < 2 or k < 0:
        raise ValueError(f"need d >= 2 and k >= 0; got d={d}, k={k}")
    if k == 0:
        return 1
    if d == 2:
        return 2
    return (2 * k + d - 2) * math.comb(k + d - 3, d - 2) // k


def gegenbauer(kmax: int, d: int, t):
    """[kmax+1, len(t)]: P_0..P_kmax in dimension d with P_k(1) = 1, by the stable three-term
    recurrence P_{k+1} = ((2k + d - 2) t P_k - k P_{k-1}) / (k + d - 2)."""
    t = np.asarray(t, np.float64)
    P = np.empty((kmax + 1,) + t.shape)
    P[0] = 1.0
    if kmax >= 1:
        P[1] = t
    for k in range(1, kmax):
        P[k + 1] = ((2 * k + d - 2) * t * P[k] - k * P[k - 1]) / (k + d - 2)
    return P


@lru_cache(maxsize=8)
def _gauss_jacobi(n: int, a: float):
    """Nodes and weights, cached: scipy's roots_jacobi takes ~1.6 s at n = 6000 and spectra of many
    kernels on one sphere reuse them."""
    t, w = roots_jacobi(n, a, a)
    t.flags.writeable = w.flags.writeable = False
    return t, w


def zonal_spectrum(kappa, d: int, kmax: int, n_quad: int | None = None) -> np.ndarray:
    """mu_0..mu_kmax of the zonal kernel `kappa` (a vectorised function of t in [-1, 1]) on S^{d-1}."""
    if d < 2 or kmax < 0:
        raise ValueError(f"need d >= 2 and kmax >= 0; got d={d}, kmax={kmax}")
    n = n_quad or max(4000, 40 * (kmax + 1))
    a = (d - 3) / 2
    t, w = _gauss_jacobi(n, a)
    ratio = math.exp(gammaln(d / 2) - 0.5 * math.log(math.pi) - gammaln((d - 1) / 2))
    k_t = np.asarray(kappa(t), np.float64)
    return ratio * gegenbauer(kmax, d, t) @ (w * k_t)
