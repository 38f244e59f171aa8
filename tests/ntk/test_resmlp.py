"""Finite residual MLP with block surgery, cross-kernels between a network and its surgically modified
copy, and the lazy-regime GD prediction."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import sphere_points

from nemojax import ntk




def loop_forward(p, x, alphas, replace):
    """One example, one block at a time, straight from the architecture's definition."""
    m = p["A"].shape[0]
    h = p["A"] @ x
    depth, i = len(alphas), 0
    while i < depth:
        op = replace.get(i)
        if op == "remove":
            i += 1
            continue
        run = range(i, op[1] + 1) if isinstance(op, tuple) else [i]
        u = h.copy()
        for b in run:
            z = p["W"][b] @ u / math.sqrt(m)
            act = z / 2 + np.linalg.norm(u) / math.sqrt(2 * math.pi * m) if op == "linear" else np.maximum(z, 0)
            h = h + alphas[b] * math.sqrt(2 / m) * p["V"][b] @ act
        i = run[-1] + 1
    return p["v"] @ h / math.sqrt(m)


@pytest.mark.parametrize("replace", [{}, {1: "remove"}, {2: "linear"}, {0: ("fuse", 1)}, {1: ("fuse", 3), 0: "linear"}])
def test_surgery_forward_matches_the_loop(replace):
    depth, m, alphas = 4, 16, np.array([0.9, 0.5, 1.3, 0.7])
    params = ntk.resmlp_init(jax.random.key(1), 3, m, depth, jnp.float64)
    X = sphere_points(5)
    spec = ntk.surgery_spec(depth, m, replace, dtype=jnp.float64)
    got = ntk.resmlp_apply(params, jnp.asarray(X), alpha=alphas, spec=spec)
    p = jax.tree.map(np.asarray, params)
    want = [loop_forward(p, x, alphas, replace) for x in X]
    np.testing.assert_allclose(got, want, rtol=1e-10)


CROSS_DEPTH, CROSS_WIDTH, CROSS_ALPHAS = 3, 1024, np.array([1.0, 0.7, 1.2])


@jax.jit
def wide_cross_kernels(params, spec_x, spec_z, X, Z):
    """Empirical (readout part <x_L, x'_L>/m, full NTK) between the network with spec_x at X and with
    spec_z at Z; the specs are arrays, so every case shares one compilation."""
    alphas = jnp.asarray(CROSS_ALPHAS, jnp.float32)

    def net(p, x, spec):
        return ntk.resmlp_apply(p, x[None], alpha=alphas, spec=spec)[0]

    fx, fz = (lambda p, x, s=s: net(p, x, s) for s in (spec_x, spec_z))
    gx, gz = (lambda v, x, s=s: net({**params, "v": v}, x, s) for s in (spec_x, spec_z))
    return ntk.empirical_ntk(gx, params["v"], X, Z, f_z=gz), ntk.empirical_ntk(fx, params, X, Z, f_z=fz)


@pytest.mark.parametrize("replace_x,replace_z", [
    (None, {1: "remove"}),
    (None, {2: "linear"}),  # the block with the largest alpha: linearising it moves the NTK by ~18%
    (None, {1: ("fuse", 2)}),
    ({0: "linear"}, {0: ("fuse", 1)}),
])
def test_cross_kernels_match_wide_networks(replace_x, replace_z):
    """The empirical cross-kernels of a wide network and its modified copy, averaged over 8
    initialisations (one network fluctuates by ~10% at this width and alpha), approach
    `resnet_cross_kernels`, and the NTK is further than the tolerance from the cross-kernel of the
    unmodified copy (the wrong operation: none)."""
    seeds = 8
    X, Z = jnp.asarray(sphere_points(3, seed=0)), jnp.asarray(sphere_points(3, seed=1))
    specs = [ntk.surgery_spec(CROSS_DEPTH, CROSS_WIDTH, r) for r in (replace_x, replace_z)]
    emp_nngp = emp_ntk = 0.0
    for seed in range(seeds):
        params = ntk.resmlp_init(jax.random.key(seed), 3, CROSS_WIDTH, CROSS_DEPTH, jnp.float32)
        s, t = wide_cross_kernels(params, *specs, X.astype(jnp.float32), Z.astype(jnp.float32))
        emp_nngp, emp_ntk = emp_nngp + s / seeds, emp_ntk + t / seeds
    nngp, ntk_ = ntk.resnet_cross_kernels(X, Z, depth=CROSS_DEPTH, alpha=CROSS_ALPHAS, replace_x=replace_x,
                                          replace_z=replace_z)
    for emp, ana in ((emp_nngp, nngp), (emp_ntk, ntk_)):
        np.testing.assert_allclose(emp, ana, rtol=0, atol=0.08 * float(jnp.max(jnp.abs(ana))))
    _, unmodified = ntk.resnet_cross_kernels(X, Z, depth=CROSS_DEPTH, alpha=CROSS_ALPHAS, replace_x=replace_x,
                                             replace_z=replace_x)
    assert float(jnp.max(jnp.abs(emp_ntk - unmodified))) > 0.15 * float(jnp.max(jnp.abs(ntk_)))


def test_cross_kernels_reduce_to_the_kernel_of_one_variant():
    X, Z = jnp.asarray(sphere_points(4, 5, 0)), jnp.asarray(sphere_points(3, 5, 1))
    rep = {0: ("fuse", 2), 3: "linear"}
    S, T = ntk.resnet_cross_kernels(X, Z, depth=5, alpha=0.6, replace_x=rep, replace_z=rep)
    np.testing.assert_allclose(T, ntk.resnet_ntk(X, Z, depth=5, alpha=0.6, replace=rep), rtol=1e-12)
    np.testing.assert_allclose(S, ntk.resnet_nngp(X, Z, depth=5, alpha=0.6, replace=rep), rtol=1e-12)
    # and swapping the sides transposes
    S2, T2 = ntk.resnet_cross_kernels(Z, X, depth=5, alpha=0.6, replace_x={1: "remove"}, replace_z=rep)
    S1, T1 = ntk.resnet_cross_kernels(X, Z, depth=5, alpha=0.6, replace_x=rep, replace_z={1: "remove"})
    np.testing.assert_allclose(T2, T1.T, rtol=1e-12)
    np.testing.assert_allclose(S2, S1.T, rtol=1e-12)


def test_lazy_prediction_matches_gd_on_the_linear_model():
    """Mean and variance of f_B(test) after GD on the linearised model, against running GD step by step
    on the affine map (y, f_A0(X), f_B0(test)) -> predictions."""
    rng = np.random.default_rng(0)
    n, t, p, steps, lr = 7, 5, 12, 40, 0.3
    PA, PB = rng.standard_normal((n, p)) / 3, rng.standard_normal((t, p)) / 3
    GA, GB = rng.standard_normal((n, p)) / 3, rng.standard_normal((t, p)) / 3
    K, K_test = PA @ PA.T, PB @ PA.T
    y = rng.standard_normal(n)
    mean, var = ntk.lazy_gd_prediction(jnp.asarray(K), jnp.asarray(K_test), jnp.asarray(y), lr=lr, steps=steps,
                                       nngp=jnp.asarray(GA @ GA.T), nngp_test=jnp.asarray(GB @ GA.T),
                                       nngp_test_diag=jnp.asarray(np.sum(GB * GB, 1)))
    # columns: constant (y) part, then coefficients on z = (f_A0(X), f_B0(test))
    FA = np.hstack([np.zeros((n, 1)), np.eye(n), np.zeros((n, t))])
    FB = np.hstack([np.zeros((t, 1 + n)), np.eye(t)])
    Y = np.hstack([y[:, None], np.zeros((n, n + t))])
    for _ in range(steps):
        R = FA - Y
        FA, FB = FA - lr * K @ R, FB - lr * K_test @ R
    G = np.vstack([GA, GB])
    np.testing.assert_allclose(mean, FB[:, 0], rtol=1e-10)
    np.testing.assert_allclose(var, np.einsum("ij,jk,ik->i", FB[:, 1:], G @ G.T, FB[:, 1:]), rtol=1e-9)
