"""Residual NTK and its block replacements against finite-width networks and perturbation orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import sphere_points

from nemojax import ntk



def points(n=4, d=3, seed=0):
    return jnp.asarray(sphere_points(n, d, seed))


def finite_resnet_ntk(X, depth, alpha, groups, m=1536, seed=0):
    """Empirical NTK of x_0 = A x, x_l = x_{l-1} + alpha sqrt(2/m) V relu(W x / sqrt(m)), f = v.x_L / sqrt(m);
    `groups` lists the block indices that read the same input (a fused run is one group)."""
    d = X.shape[1]
    keys = iter(jax.random.split(jax.random.key(seed), 2 * depth + 2))
    params = {"A": jax.random.normal(next(keys), (m, d)), "v": jax.random.normal(next(keys), (m,)),
              "W": [jax.random.normal(next(keys), (m, m)) for _ in range(depth)],
              "V": [jax.random.normal(next(keys), (m, m)) for _ in range(depth)]}

    def f(p, x):
        h = p["A"] @ x
        for group in groups:
            h = h + sum(alpha * jnp.sqrt(2 / m) * p["V"][b] @ jax.nn.relu(p["W"][b] @ h / jnp.sqrt(m)) for b in group)
        return p["v"] @ h / jnp.sqrt(m)

    grads = jax.vmap(jax.grad(f), in_axes=(None, 0))(params, X)
    flat = jnp.concatenate([g.reshape(len(X), -1) for g in jax.tree.leaves(grads)], axis=1)
    return flat @ flat.T


@pytest.mark.parametrize("replace,groups,wrong", [
    (None, [[0], [1], [2]], {0: ("fuse", 1)}),
    ({1: "remove"}, [[0], [2]], None),
    ({0: ("fuse", 1)}, [[0, 1], [2]], None),
], ids=["none", "remove", "fuse"])
def test_matches_wide_network(replace, groups, wrong):
    """The width-1536 network's NTK is within 12% of the analytic kernel of its own architecture, and
    further than that from the kernel of the `wrong` one (at alpha = 1 fusing changes the kernel by
    ~55% of its largest entry, removing by ~150%; one network fluctuates by 5-8%)."""
    X = points()
    analytic = ntk.resnet_ntk(X, depth=3, alpha=1.0, replace=replace)
    emp = finite_resnet_ntk(X, 3, 1.0, groups)
    tol = 0.12 * float(jnp.max(analytic))
    np.testing.assert_allclose(emp, analytic, rtol=0, atol=tol)
    assert float(jnp.max(jnp.abs(emp - ntk.resnet_ntk(X, depth=3, alpha=1.0, replace=wrong)))) > 2 * tol


def test_linear_block_keeps_the_first_two_hermite_terms():
    """With alpha -> 0 every variant tends to the linear model's kernel; a linearised block's GP
    increment is kappa1's Taylor polynomial 1/pi + rho/2 (exactly, at any alpha)."""
    X = points(5, 4)
    s_lin = ntk.resnet_nngp(X, depth=1, alpha=1.0, replace={0: "linear"})
    u = X @ X.T
    np.testing.assert_allclose(s_lin, u + 1 / jnp.pi + u / 2, rtol=1e-12)


@pytest.mark.parametrize("op,order", [("remove", 2), ("linear", 2), ("fuse", 4)])
def test_kernel_change_scales_with_alpha(op, order):
    """Removing or linearising a block changes the kernel at O(alpha^2); fusing two blocks only at
    O(alpha^4) (block 2 sees Sigma_0 instead of Sigma_1 = Sigma_0 + O(alpha^2))."""
    X = points(6, 3)
    replace = {1: ("fuse", 2)} if op == "fuse" else {1: op}
    alphas = np.array([0.02, 0.04, 0.08])
    diffs = [float(jnp.linalg.norm(ntk.resnet_ntk(X, depth=4, alpha=a, replace=replace)
                                   - ntk.resnet_ntk(X, depth=4, alpha=a))) for a in alphas]
    slope = np.polyfit(np.log(alphas), np.log(diffs), 1)[0]
    assert slope == pytest.approx(order, abs=0.1)


@pytest.mark.parametrize("replace,needle", [
    ({5: "remove"}, "block indices"),
    ({0: "prune"}, "must be 'remove'"),
    ({0: ("fuse", 0)}, "needs 0 < j"),
    ({0: ("fuse", 2), 1: "remove"}, "inside the fused run"),
])
def test_bad_replace_is_named(replace, needle):
    with pytest.raises(ValueError, match=needle):
        ntk.resnet_ntk(points(), depth=3, alpha=0.5, replace=replace)
