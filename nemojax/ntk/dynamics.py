"""Empirical NTK, gradient-flow predictions in the kernel's eigenbasis, the modified-spectrum
kernel (MSK) and the preconditioner S of preconditioned gradient descent (Geifman et al. 2023)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def empirical_ntk(f: Callable, params, X, Z=None):
    """Theta(x, z) = <df(params, x)/dparams, df(params, z)/dparams> for scalar-output f.

    Computed as J_X (J_Z^T 1-hot) products with `jax.linearize`/`vjp`: one JVP per column of
    the Gram block instead of materialising per-example Jacobians of size [n, #params].
    """
    Z = X if Z is None else Z

    def f_batch(p, A):
        return jax.vmap(lambda a: f(p, a))(A)

    _, vjp_z = jax.vjp(lambda p: f_batch(p, Z), params)
    _, jvp_x = jax.linearize(lambda p: f_batch(p, X), params)

    def column(e):  # J_X J_Z^T e
        return jvp_x(vjp_z(e)[0])

    return jax.lax.map(column, jnp.eye(Z.shape[0], dtype=X.dtype)).T


def empirical_ntk_nnx(module: nnx.Module, X, Z=None):
    """`empirical_ntk` of a scalar-output Flax NNX module with respect to its nnx.Param leaves."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def f(p, x):
        return nnx.merge(graphdef, p, rest)(x[None])[0].reshape(())

    return empirical_ntk(f, params, X, Z)


def gd_residuals(K, y, lr: float, steps):
    """Residual coefficients per eigendirection under GD on the squared loss (1/2)||f - y||^2 in the
    kernel regime: r_t = (I - lr K)^t y. Returns (eigenvalues desc [n], coefficients [len(steps), n])."""
    lam, V = jnp.linalg.eigh(K)
    lam, V = lam[::-1], V[:, ::-1]
    c = V.T @ y
    steps = jnp.asarray(steps)
    return lam, (1 - lr * lam)[None, :] ** steps[:, None] * c[None, :]


def iterations_to_fit(eigenvalue, lr: float, tol: float = 1e-2):
    """GD steps for a direction with kernel eigenvalue lambda to shrink by `tol`: log(tol)/log(1 - lr lambda)."""
    return jnp.log(tol) / jnp.log1p(-lr * eigenvalue)


def msk(K, g: Callable):
    """Modified-spectrum kernel on the sample: V g(Lambda) V^T (eigenvalues mapped by g)."""
    lam, V = jnp.linalg.eigh(K)
    return (V * g(lam)) @ V.T


def pgd_preconditioner(K, k: int, g: Callable | None = None):
    """S = I - sum_{i<=k} (1 - g(lambda_i)/lambda_i) v_i v_i^T over the top-k eigenpairs of K, so that
    K S has eigenvalues g(lambda_1..k), lambda_{k+1}, ... Default g flattens the top k to lambda_{k+1}."""
    n = K.shape[0]
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, n-1] = [1, {n - 1}]; got {k}")
    lam, V = jnp.linalg.eigh(K)
    lam, V = lam[::-1], V[:, ::-1]
    target = jnp.full((k,), lam[k]) if g is None else g(lam[:k])
    shrink = 1 - target / lam[:k]
    return jnp.eye(n, dtype=K.dtype) - (V[:, :k] * shrink) @ V[:, :k].T
