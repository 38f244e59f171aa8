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
               (its Hermite projection of degree <= 1), relu(h) -> h/2 + |x_{l-1}| / sqrt(2 pi m):
               N = sqrt(Sigma_xx Sigma_zz)(1/pi + rho/2), J = 1/2;
  ("fuse", j)  blocks i..j all read x_{i-1} and their outputs are summed: every N_l, J_l is evaluated
               at Sigma_{i-1}, Sigma_j = Sigma_{i-1} + sum alpha_l^2 N_l,
               Theta_j = (1 + sum alpha_l^2 J_l) Theta_{i-1} + sum alpha_l^2 (N_l + Sigma_{i-1} J_l)
               (cross terms vanish: the blocks' V_l are independent and zero-mean).
`resnet_cross_kernels` gives the same quantities between two variants that share their weights
(e.g. a trained network and the same weights after surgery), which is what the lazy regime needs to
predict a trained network's output after a block is replaced.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from nemojax.ntk.kernels import kappa0, kappa1


def _check_depth(depth):
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (number of residual blocks); got {depth!r}")


def _pair_terms(C, ex, ez, op):
    """(N, J) of one block for a pair of inputs with cross-covariance C and variances ex [n], ez [m].
    A pair with a linearised side uses the linear terms: the stand-in psi is the L2 projection of
    relu, so E[relu psi] = E[psi psi] and E[relu' psi'] = E[psi' psi'] = 1/4."""
    scale = jnp.sqrt(ex[:, None] * ez[None, :])
    rho = jnp.clip(C / scale, -1.0, 1.0)
    if op == "linear":
        return scale * (1 / jnp.pi + rho / 2), jnp.full_like(C, 0.5)
    return scale * kappa1(rho), kappa0(rho)


_DIAG_GAIN = {"relu": 1.0, "linear": 1 / jnp.pi + 0.5}  # N(x, x) / Sigma(x, x): kappa1(1) = 1


def block_ops(depth: int, replace: Mapping | None):
    """Per block (op, start): op in {"relu", "linear", "remove"}; start = the block whose input it
    reads (itself, or the first block of its fused run)."""
    replace = dict(replace or {})
    bad = [i for i in replace if not (isinstance(i, int) and 0 <= i < depth)]
    if bad:
        raise ValueError(f"replace: block indices must be ints in [0, {depth}); got {bad}")
    ops, i = [], 0
    while i < depth:
        op = replace.get(i)
        if isinstance(op, tuple) and len(op) == 2 and op[0] == "fuse":
            j = op[1]
            if not (isinstance(j, int) and i < j < depth):
                raise ValueError(f"replace[{i}] = ('fuse', j) needs {i} < j < {depth}; got j={j!r}")
            clash = [k for k in range(i + 1, j + 1) if k in replace]
            if clash:
                raise ValueError(f"replace: blocks {clash} are inside the fused run {i}..{j} and cannot be replaced too")
            ops += [("relu", i)] * (j + 1 - i)
            i = j + 1
            continue
        if op not in (None, "remove", "linear"):
            raise ValueError(f"replace[{i}] must be 'remove', 'linear' or ('fuse', j); got {op!r}")
        ops.append((op or "relu", i))
        i += 1
    return ops


def resnet_cross_kernels(X, Z=None, *, depth: int, alpha, replace_x: Mapping | None = None,
                         replace_z: Mapping | None = None):
    """(Sigma, NTK) between two variants of one network with shared weights: Cov(f_x(X), f_z(Z)) and
    <df_x(X)/dtheta, df_z(Z)/dtheta> at infinite width, f_x the network with `replace_x` applied.
    With replace_x = None this is the lazy-regime link between a trained network and the same
    weights after surgery.

    The blocks are walked in lockstep; a block reads the state before its `start`, and the
    cross-covariance of the states before blocks p and q is the one before min(p, q): the blocks in
    between add zero-mean increments (independent V) that only one side sees."""
    _check_depth(depth)
    Z = X if Z is None else Z
    alphas = jnp.broadcast_to(jnp.asarray(alpha, X.dtype), (depth,))
    S = X @ Z.T
    T = S  # Theta_0 = Sigma_0: the input matrix A is trained
    hist = [(S, T, jnp.sum(X * X, 1), jnp.sum(Z * Z, 1))]  # state before block l
    for l, ((ox, sx), (oz, sz)) in enumerate(zip(block_ops(depth, replace_x), block_ops(depth, replace_z))):
        a2 = alphas[l] ** 2
        dx, dz = hist[-1][2], hist[-1][3]
        if ox != "remove" and oz != "remove":
            C_in, T_in = hist[min(sx, sz)][:2]
            N, J = _pair_terms(C_in, hist[sx][2], hist[sz][3], "linear" if "linear" in (ox, oz) else "relu")
            S, T = S + a2 * N, T + a2 * (J * T_in + N + C_in * J)
        if ox != "remove":
            dx = dx + a2 * _DIAG_GAIN[ox] * hist[sx][2]
        if oz != "remove":
            dz = dz + a2 * _DIAG_GAIN[oz] * hist[sz][3]
        hist.append((S, T, dx, dz))
    return S, T + S


def resnet_nngp(X, Z=None, *, depth: int, alpha, replace: Mapping | None = None):
    """Sigma_L: the GP kernel of the residual stream x_L (see the module docstring)."""
    return resnet_cross_kernels(X, Z, depth=depth, alpha=alpha, replace_x=replace, replace_z=replace)[0]


def resnet_ntk(X, Z=None, *, depth: int, alpha, replace: Mapping | None = None):
    """NTK of the residual ReLU MLP; `alpha` is a scalar or one value per block."""
    return resnet_cross_kernels(X, Z, depth=depth, alpha=alpha, replace_x=replace, replace_z=replace)[1]
