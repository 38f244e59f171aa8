"""Closed-form ReLU kernels: arc-cosine kernels, deep fully-connected NTK / NNGP, Laplace.

Convention (`depth` = L layers): the NTK of f(x) = sqrt(2/m) v^T relu(z^{L-1}), z^1 = W^1 x,
z^{l+1} = sqrt(2/m) W^{l+1} relu(z^l), all weights standard normal and all trained, in the
infinite-width limit. On the unit sphere the kernels are zonal: functions of u = <x, z>, with
NNGP(1) = 1 and bias-free NTK(1) = L. `bias` adds the gradient of zero-initialised biases of
scale beta: +beta^2 at every layer (the forward kernel is unchanged). Works in the dtype it is
given (pass float64 arrays under `jax.experimental.enable_x64()` for spectral work).
"""

from __future__ import annotations

import jax.numpy as jnp


def kappa0(u):
    """Arc-cosine kernel of degree 0: 2 E[1{w.x>0} 1{w.z>0}] = (pi - arccos u) / pi."""
    u = jnp.clip(u, -1.0, 1.0)
    return (jnp.pi - jnp.arccos(u)) / jnp.pi


def kappa1(u):
    """Arc-cosine kernel of degree 1: 2 E[relu(w.x) relu(w.z)] = (u (pi - arccos u) + sqrt(1 - u^2)) / pi."""
    u = jnp.clip(u, -1.0, 1.0)
    return (u * (jnp.pi - jnp.arccos(u)) + jnp.sqrt(jnp.maximum(1.0 - u * u, 0.0))) / jnp.pi


def _check_depth(depth):
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (number of layers); got {depth!r}")


def _fc_dot(u, depth: int, bias: float):
    """(NNGP, NTK) of the depth-L ReLU net at cosine u, on the sphere."""
    _check_depth(depth)
    b2 = bias * bias
    nngp, ntk = u, u + b2
    for _ in range(depth - 1):
        ntk = ntk * kappa0(nngp) + kappa1(nngp) + b2
        nngp = kappa1(nngp)
    return nngp, ntk


def fc_nngp_dot(u, depth: int, bias: float = 0.0):
    """Zonal NNGP (forward GP kernel of the last hidden layer's readout) of the depth-L ReLU net."""
    return _fc_dot(u, depth, bias)[0]


def fc_ntk_dot(u, depth: int, bias: float = 0.0):
    """Zonal NTK of the depth-L ReLU net: Theta^1 = u + b^2, Theta^l = Theta^{l-1} kappa0(S^{l-1}) + S^l + b^2."""
    return _fc_dot(u, depth, bias)[1]


def _gram_parts(X, Z):
    Z = X if Z is None else Z
    if X.ndim != 2 or Z.ndim != 2 or X.shape[1] != Z.shape[1]:
        raise ValueError(f"X and Z must be [n, d] and [m, d]; got {X.shape} and {None if Z is None else Z.shape}")
    nx = jnp.linalg.norm(X, axis=1)
    nz = jnp.linalg.norm(Z, axis=1)
    scale = nx[:, None] * nz[None, :]
    u = (X @ Z.T) / jnp.where(scale > 0, scale, 1.0)
    return u, scale


def fc_ntk(X, Z=None, *, depth: int, bias: float = 0.0):
    """NTK Gram matrix [n, m] for inputs of any norm (ReLU nets are 1-homogeneous without bias:
    K(x, z) = |x||z| kappa(<x, z> / |x||z|); with bias the zonal form is applied to the cosines)."""
    u, scale = _gram_parts(X, Z)
    return (scale if bias == 0.0 else 1.0) * fc_ntk_dot(u, depth, bias)


def fc_nngp(X, Z=None, *, depth: int, bias: float = 0.0):
    u, scale = _gram_parts(X, Z)
    return (scale if bias == 0.0 else 1.0) * fc_nngp_dot(u, depth, bias)


def laplace(X, Z=None, *, c: float = 1.0):
    """exp(-c |x - z|)."""
    return gamma_exponential(X, Z, c=c, gamma=1.0)


def gamma_exponential(X, Z=None, *, c: float = 1.0, gamma: float = 1.0):
    """exp(-c |x - z|^gamma), 0 < gamma <= 2."""
    if not 0.0 < gamma <= 2.0:
        raise ValueError(f"gamma must be in (0, 2]; got {gamma}")
    Z = X if Z is None else Z
    d2 = jnp.sum(X * X, 1)[:, None] + jnp.sum(Z * Z, 1)[None, :] - 2 * X @ Z.T
    return jnp.exp(-c * jnp.maximum(d2, 0.0) ** (gamma / 2))
