"""Empirical NTK, gradient-flow predictions in the kernel's eigenbasis, the modified-spectrum
kernel (MSK) and the preconditioner S of preconditioned gradient descent (Geifman et al. 2023)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def empirical_ntk(f: Callable, params, X, Z=None, f_z: Callable | None = None):
    """Theta(x, z) = <df(params, x)/dparams, df_z(params, z)/dparams> for scalar-output f (and f_z,
    default f: a second network sharing the parameters, e.g. f after block surgery).

    Computed as J_X (J_Z^T 1-hot) products with `jax.linearize`/`vjp`: one JVP per column of
    the Gram block instead of materialising per-example Jacobians of size [n, #params].
    """
    Z = X if Z is None else Z
    f_z = f if f_z is None else f_z

    def f_batch(g, p, A):
        return jax.vmap(lambda a: g(p, a))(A)

    _, vjp_z = jax.vjp(lambda p: f_batch(f_z, p, Z), params)
    _, jvp_x = jax.linearize(lambda p: f_batch(f, p, X), params)

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


def lazy_gd_prediction(K, K_test, y, *, lr: float, steps: int, nngp=None, nngp_test=None, nngp_test_diag=None):
    """Mean and variance over initialisations of f_B(X_test) after `steps` GD steps on
    (1/2)|f_A(X) - y|^2 in the kernel (lazy) regime, where B shares A's parameters:
        f_B(x) = f_B0(x) + K_BA(x, X) M (y - f_A0(X)),   M = K^{-1} (I - (I - lr K)^steps).
    K = K_AA [n, n] and K_test = K_BA [t, n] on the same scale (e.g. both divided by n for a mean
    loss); B = A gives the trained network itself. f_A0, f_B0 are jointly Gaussian: nngp = Cov(f_A0(X))
    [n, n], nngp_test = Cov(f_B0(X_test), f_A0(X)) [t, n], nngp_test_diag = Var f_B0(X_test) [t];
    without them f_0 = 0 (a centred network) and the variance is 0. Returns (mean [t], variance [t])."""
    lam, V = jnp.linalg.eigh(K)
    a = lr * lam
    # 1 - (1 - a)^steps, through expm1/log1p where a is small (no cancellation); 1 - a < 0 needs the power
    fitted = jnp.where(a < 0.5, -jnp.expm1(steps * jnp.log1p(-jnp.minimum(a, 0.5))), 1 - (1 - a) ** steps)
    tiny = 1e-12 * jnp.max(jnp.abs(lam))
    gain = jnp.where(lam > tiny, fitted / jnp.where(lam > tiny, lam, 1.0), lr * steps)  # -> lr steps as lam -> 0
    B = (K_test @ V * gain) @ V.T
    mean = B @ y
    if nngp is None:
        return mean, jnp.zeros_like(mean)
    var = nngp_test_diag - 2 * jnp.sum(B * nngp_test, 1) + jnp.sum((B @ nngp) * B, 1)
    return mean, var


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
