"""NTK and NNGP of a residual ReLU MLP, and of its variants with blocks removed, linearised or
fused (run in parallel on a shared input, as FFN Fusion does).

Architecture (infinite width m, every weight standard normal and trained):
    x_0 = A x,   x_l = x_{l-1} + alpha_l sqrt(2/m) V_l relu(W_l x_{l-1} / sqrt(m)),   f = v^T x_L / sqrt(m),
so Sigma_0(x, z) = <x, z>. Per block, with rho the correlation of Sigma_{l-1}:
    N_l = sqrt(Sigma_xx Sigma_zz) kappa1(rho)        (GP increment of the block)
    J_l = kappa0(rho)                                (its Jacobian kernel)
    Sigma_l = Sigma_{l-1} + alpha_l^2 N_l
    Theta_l = (1 + alpha_l^2 J_l) Theta_{l-1} + alpha_l^2 (N_l + Sigma_{l-1} J_l),   Theta_0 = Sigma_0,
and NTK = Theta_L + Sigma_L (the readout). Replacements (`replace` maps a 0-based block index to):
  "remove"     the block is the identity: Sigma and Theta pass through unchanged;
  "linear"     relu replaced by its best L2 affine stand-in under the Gaussian pre-activation
               (its Hermite projection of degree <= 1): N = sqrt(Sigma_xx Sigma_zz)(1/pi + rho/2), J = 1/2;
  ("fuse", j)  blocks i..j all read x_{i-1} and their outputs are summed: every N_l, J_l is evaluated
               at Sigma_{i-1}, Sigma_j = Sigma_{i-1} + sum alpha_l^2 N_l,
               Theta_j = (1 + sum alpha_l^2 J_l) Theta_{i-1} + sum alpha_l^2 (N_l + Sigma_{i-1} J_l)
               (cross terms vanish: the blocks' V_l are independent and zero-mean).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from nemojax.ntk.kernels import kappa0, kappa1


def _block_terms(S, dxx, dzz, op):
    """(N, J, diag N_x, diag N_z) of one block at input kernel S with diagonals dxx [n], dzz [m]."""
    scale = jnp.sqrt(dxx[:, None] * dzz[None, :])
    rho = jnp.clip(S / scale, -1.0, 1.0)
    if op == "linear":
        return scale * (1 / jnp.pi + rho / 2), jnp.full_like(S, 0.5), dxx * (1 / jnp.pi + 0.5), \
            dzz * (1 / jnp.pi + 0.5)
    return scale * kappa1(rho), kappa0(rho), dxx, dzz  # kappa1(1) = 1: diagonal increments equal the input


def _plan(depth: int, replace: Mapping | None):
    """Groups of (block indices, op) in order: a fused run is one group."""
    replace = dict(replace or {})
    bad = [i for i in replace if not (isinstance(i, int) and 0 <= i < depth)]
    if bad:
        raise ValueError(f"replace: block indices must be ints in [0, {depth}); got {bad}")
    groups, i = [], 0
    while i < depth:
        op = replace.get(i)
        if isinstance(op, tuple) and len(op) == 2 and op[0] == "fuse":
            j = op[1]
            if not (isinstance(j, int) and i < j < depth):
                raise ValueError(f"replace[{i}] = ('fuse', j) needs {i} < j < {depth}; got j={j!r}")
            clash = [k for k in range(i + 1, j + 1) if k in replace]
            if clash:
                raise ValueError(f"replace: blocks {clash} are inside the fused run {i}..{j} and cannot be replaced too")
            groups.append((list(range(i, j + 1)), "relu"))
            i = j + 1
            continue
        if op not in (None, "remove", "linear"):
            raise ValueError(f"replace[{i}] must be 'remove', 'linear' or ('fuse', j); got {op!r}")
        if op != "remove":
            groups.append(([i], op or "relu"))
        i += 1
    return groups


def _resnet_kernels(X, Z, depth: int, alpha, replace):
    Z = X if Z is None else Z
    alphas = jnp.broadcast_to(jnp.asarray(alpha, X.dtype), (depth,))
    S = X @ Z.T
    dxx, dzz = jnp.sum(X * X, 1), jnp.sum(Z * Z, 1)
    T = S  # Theta_0 = Sigma_0: the input matrix A is trained
    for blocks, op in _plan(depth, replace):
        N_sum = J_sum = grad_sum = nx = nz = 0.0
        for b in blocks:  # every block of a (fused) group reads the group's input kernel
            N, J, Nx, Nz = _block_terms(S, dxx, dzz, op)
            a2 = alphas[b] ** 2
            N_sum, J_sum, nx, nz = N_sum + a2 * N, J_sum + a2 * J, nx + a2 * Nx, nz + a2 * Nz
            grad_sum = grad_sum + a2 * (N + S * J)
        T = (1.0 + J_sum) * T + grad_sum
        S, dxx, dzz = S + N_sum, dxx + nx, dzz + nz
    return S, T + S


def resnet_nngp(X, Z=None, *, depth: int, alpha, replace: Mapping | None = None):
    """Sigma_L: the GP kernel of the residual stream x_L (see the module docstring)."""
    return _resnet_kernels(X, Z, depth, alpha, replace)[0]


def resnet_ntk(X, Z=None, *, depth: int, alpha, replace: Mapping | None = None):
    """NTK of the residual ReLU MLP; `alpha` is a scalar or one value per block."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (number of residual blocks); got {depth!r}")
    return _resnet_kernels(X, Z, depth, alpha, replace)[1]
